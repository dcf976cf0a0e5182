//! Errors of the tiling crate. Every variant names the slide file, so a run over thousands of
//! slides says which one failed and why without digging through logs.

use std::path::PathBuf;

/// What went wrong while reading or tiling a slide.
#[derive(Debug, thiserror::Error)]
pub enum TileError {
    /// OpenSlide refused the file (unknown format, truncated header, missing file).
    #[error("cannot open slide {}: {message}", path.display())]
    Open { path: PathBuf, message: String },
    /// OpenSlide opened the file but failed to decode a region of it.
    #[error(
        "cannot read slide {}: region at level-0 ({x}, {y}), level {level}, {w}x{h} px: {message}",
        path.display()
    )]
    Read {
        path: PathBuf,
        x: i64,
        y: i64,
        level: u32,
        w: u32,
        h: u32,
        message: String,
    },
    /// A DICOM slide's series is incomplete or damaged (a missing level 0, an instance cut
    /// off), or its folder holds no or several series.
    #[error("DICOM slide {}: {message}", path.display())]
    Dicom { path: PathBuf, message: String },
    /// A target resolution was asked for but the slide's pixel size is unknown.
    #[error(
        "slide {} has no microns-per-pixel in its metadata (openslide.mpp-x/mpp-y){}; \
         add an `mpp` column to the dataset CSV with its level-0 mpp, or tile at native resolution \
         (no `mpp`/`magnification` parameter)",
        path.display(),
        objective_hint(*.objective_power)
    )]
    MissingMpp {
        path: PathBuf,
        objective_power: Option<f64>,
    },
    /// The dataset row has no slide file.
    #[error("slide `{slide_id}` has no `path` in the dataset CSV")]
    NoPath { slide_id: String },
    /// A coordinate or size does not fit what OpenSlide accepts.
    #[error("slide {}: {message}", path.display())]
    Geometry { path: PathBuf, message: String },
    /// Writing the thumbnail PNG failed.
    #[error("writing thumbnail {}: {message}", path.display())]
    Thumbnail { path: PathBuf, message: String },
}

fn objective_hint(objective_power: Option<f64>) -> String {
    match objective_power {
        Some(p) => format!(" (it reports an objective power of {p}x, usable with `magnification`)"),
        None => String::new(),
    }
}

/// Result type of this crate.
pub type TileResult<T> = Result<T, TileError>;
