//! The `heatmap` stage: which tiles made a trained MIL model decide what it decided.
//!
//! It reads a slide's embeddings (all of its tiles, from `embed` or `features`) and a trained
//! checkpoint, scores every tile for every class ([`tessera_mil::importance`]: class
//! activation mapping on the sparse map for SparseConvMIL, attention weights for attention
//! models, instance scores or gradient x input for the other baselines) and writes, per slide,
//! under `OUT/heatmaps/`:
//! - `<slide>.parquet`: `slide_id, x, y, tile_size, score_<class>...` (one row per tile);
//! - `<slide>.<class>.png`: the scores drawn over the slide's thumbnail;
//! - `<slide>.<class>.top<k>.png`: the `k` highest-scoring tiles side by side;
//! - `<slide>.geojson`: one QuPath `tile` feature per tile, scores as measurements.

pub mod geojson;
pub mod heatmap;
pub mod render;
pub mod scores;
pub mod settings;
pub mod stage;
pub mod table;

pub use heatmap::{DrawClasses, HeatmapParams};
pub use scores::TileScores;

/// Why a heatmap could not be made; every message names the file or slide concerned.
#[derive(Debug, thiserror::Error)]
pub enum HeatmapError {
    #[error(transparent)]
    Importance(Box<tessera_mil::importance::ImportanceError>),
    #[error(transparent)]
    Mil(Box<tessera_mil::MilError>),
    #[error(transparent)]
    Tile(Box<tessera_tile::TileError>),
    #[error(transparent)]
    Arrow(Box<arrow::error::ArrowError>),
    #[error("writing {path}: {message}")]
    Write { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl From<tessera_mil::importance::ImportanceError> for HeatmapError {
    fn from(e: tessera_mil::importance::ImportanceError) -> Self {
        HeatmapError::Importance(Box::new(e))
    }
}

impl From<tessera_mil::MilError> for HeatmapError {
    fn from(e: tessera_mil::MilError) -> Self {
        HeatmapError::Mil(Box::new(e))
    }
}

impl From<tessera_tile::TileError> for HeatmapError {
    fn from(e: tessera_tile::TileError) -> Self {
        HeatmapError::Tile(Box::new(e))
    }
}

impl From<arrow::error::ArrowError> for HeatmapError {
    fn from(e: arrow::error::ArrowError) -> Self {
        HeatmapError::Arrow(Box::new(e))
    }
}

impl From<HeatmapError> for tessera_pipeline::StageError {
    fn from(e: HeatmapError) -> Self {
        tessera_pipeline::StageError::msg(e)
    }
}

/// A slide id made safe as a file name.
pub fn file_stem(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
