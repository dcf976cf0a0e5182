//! tessera's tiling stage (`kind: tile`) and the slide reading it is built on.
//!
//! A slide is opened with OpenSlide (any format it reads), tiled at a **physical** resolution
//! (`mpp` or `magnification`, through the slide's mpp or the dataset's `mpp` override),
//! tissue is detected on a low-resolution overview (HSV saturation, median blur, Otsu,
//! closing), tiles with enough tissue are kept, a thumbnail with the mask and the grid is
//! written, and the tile table (`slide_id, x, y, tile_size, level, mpp, tissue_fraction`, plus
//! `pixels, pixels_size`) streams downstream in batches read by a pool of threads.
//!
//! DICOM WSI slides (a folder of instances, or one instance file) open when the build links
//! OpenSlide 4 ([`library::openslide_version`]); [`dicom`] resolves and checks them.
//!
//! [`SlideReader`] is the reusable part for other stages: open a slide, ask its geometry and
//! mpp, read a tile of any level-0 size at any output size.

pub mod batch;
pub mod dicom;
pub mod direct;
pub mod error;
pub mod grid;
pub mod library;
pub mod pixels;
pub mod plan;
pub mod pool;
pub mod reader;
pub mod resample;
pub mod resolution;
pub mod thumbnail;
pub mod tiff_dir;
pub mod tile;
pub mod tissue;
pub mod turbo;

pub use error::{TileError, TileResult};
pub use library::{openslide_reads_dicom, openslide_version};
pub use reader::{LevelInfo, Overview, ReaderMode, Rect, SlideReader};
pub use resolution::{Target, TileGeometry};
pub use tile::{TileParams, TileStage};
pub use tissue::{Mask, TissueParams};

#[cfg(test)]
pub(crate) mod test_data {
    use std::path::PathBuf;

    /// The shared test slides (see /work/shared/data/slides/README.md); `TESSERA_TEST_SLIDES`
    /// points elsewhere.
    pub fn slide_path(name: &str) -> PathBuf {
        let dir = std::env::var_os("TESSERA_TEST_SLIDES")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/slides")
            });
        dir.join(name)
    }

    /// The DICOM WSI test slide (`examples/dicom/CMU-1-crop/`, made from CMU-1-Small-Region.svs
    /// by scripts/make-dicom-slide.py).
    pub fn dicom_slide() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/dicom/CMU-1-crop")
    }

    /// Whether a DICOM test can run: true on OpenSlide 4. On OpenSlide 3 it says loudly that
    /// the test is skipped, and fails instead when `TESSERA_REQUIRE_OPENSLIDE4` is set (CI sets
    /// it: `scripts/setup.sh` installs OpenSlide 4 there).
    pub fn openslide4_or_skip(test: &str) -> bool {
        if crate::openslide_reads_dicom() {
            return true;
        }
        let message = format!(
            "{test}: this build links OpenSlide {}, which cannot read DICOM; run \
             scripts/setup.sh and rebuild (README: OpenSlide)",
            crate::openslide_version()
        );
        if std::env::var_os("TESSERA_REQUIRE_OPENSLIDE4").is_some() {
            panic!("{message} (TESSERA_REQUIRE_OPENSLIDE4 is set)");
        }
        // Straight to the terminal: the test harness captures eprintln! of passing tests.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {message} ***\n");
        false
    }
}
