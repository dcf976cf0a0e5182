//! From a physical target (microns per pixel or objective magnification) to tile geometry in
//! level-0 pixels. Tiles then cover the same tissue area on every slide whatever its scanner,
//! which is what makes a model trained on 40x and 20x scans comparable.

use crate::error::{TileError, TileResult};
use crate::reader::LevelInfo;
use std::path::Path;

/// Microns per pixel that the field calls "10x"; `mpp = MAGNIFICATION_MPP / magnification`
/// (10x = 1.0 µm/px, 20x = 0.5, 40x = 0.25).
pub const MAGNIFICATION_MPP: f64 = 10.0;

/// A target that lies within this relative distance of a pyramid level's resolution is
/// snapped to the level: a 0.499 µm/px scan tiled "at 0.5 µm/px" is read as is rather than
/// resampled by 0.2%.
pub const SNAP_TOLERANCE: f64 = 0.01;

/// The resolution the tiles should have.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Level-0 pixels, whatever their physical size.
    Native,
    /// Microns per pixel.
    Mpp(f64),
    /// Objective magnification (converted through the slide's mpp, or through its objective
    /// power when the metadata has no mpp).
    Magnification(f64),
}

/// Where the tiles of one slide lie and how big they are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileGeometry {
    /// Side of the output tiles, in pixels at the target resolution.
    pub tile_px: u32,
    /// Side of a tile in level-0 pixels.
    pub size0: u64,
    /// Step between neighbouring tiles in level-0 pixels (`size0` minus the overlap).
    pub stride0: u64,
    /// Level-0 pixels per output pixel, after snapping to a level.
    pub downsample: f64,
    /// Microns per output pixel, when the slide's mpp is known.
    pub mpp: Option<f64>,
}

/// Computes the geometry for `target` on a slide with `levels`, level-0 `slide_mpp` (dataset
/// override or metadata) and `objective_power`; errors when the target needs an mpp the slide
/// does not have.
pub fn plan_geometry(
    target: Target,
    tile_px: u32,
    overlap_px: u32,
    levels: &[LevelInfo],
    slide_mpp: Option<f64>,
    objective_power: Option<f64>,
    path: &Path,
) -> TileResult<TileGeometry> {
    let missing = || TileError::MissingMpp {
        path: path.to_path_buf(),
        objective_power,
    };
    let raw = match target {
        Target::Native => 1.0,
        Target::Mpp(mpp) => mpp / slide_mpp.ok_or_else(missing)?,
        Target::Magnification(mag) => match (slide_mpp, objective_power) {
            (Some(mpp), _) => MAGNIFICATION_MPP / mag / mpp,
            (None, Some(power)) => power / mag,
            (None, None) => return Err(missing()),
        },
    };
    let downsample = levels
        .iter()
        .map(|l| l.downsample)
        .find(|&ds| ((ds - raw) / raw).abs() <= SNAP_TOLERANCE)
        .unwrap_or(raw);
    let size0 = ((f64::from(tile_px) * downsample).round() as u64).max(1);
    let stride_px = tile_px.saturating_sub(overlap_px).max(1);
    let stride0 = ((f64::from(stride_px) * downsample).round() as u64).max(1);
    let mpp = slide_mpp.map(|m| m * size0 as f64 / f64::from(tile_px));
    Ok(TileGeometry {
        tile_px,
        size0,
        stride0,
        downsample,
        mpp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pyramid() -> Vec<LevelInfo> {
        [1.0, 4.0003, 16.001]
            .iter()
            .map(|&downsample| LevelInfo {
                width: 1000,
                height: 1000,
                downsample,
            })
            .collect()
    }

    #[test]
    fn native_tiles_are_level_zero_pixels_with_overlap_stride() {
        let g = plan_geometry(
            Target::Native,
            512,
            128,
            &pyramid(),
            None,
            None,
            Path::new("s"),
        )
        .unwrap();
        assert_eq!(
            (g.size0, g.stride0, g.downsample, g.mpp),
            (512, 384, 1.0, None)
        );
    }

    #[test]
    fn mpp_target_scales_through_the_slide_mpp() {
        // 0.25 µm/px scan, 1.0 µm/px target: 4x, snapped to the 4.0003x level.
        let g = plan_geometry(
            Target::Mpp(1.0),
            256,
            0,
            &pyramid(),
            Some(0.25),
            None,
            Path::new("s"),
        )
        .unwrap();
        assert_eq!(g.downsample, 4.0003);
        assert_eq!(g.size0, 1024);
        assert_eq!(g.stride0, 1024);
        assert!((g.mpp.unwrap() - 1.0).abs() < 1e-12);
        // Between levels: 2x, no snapping; 128 px overlap -> 384 px stride at 2x = 768.
        let g = plan_geometry(
            Target::Mpp(0.5),
            512,
            128,
            &pyramid(),
            Some(0.25),
            None,
            Path::new("s"),
        )
        .unwrap();
        assert_eq!((g.size0, g.stride0, g.downsample), (1024, 768, 2.0));
    }

    #[test]
    fn magnification_uses_mpp_then_objective_power() {
        // Paper setting: 10x on a 0.499 µm/px scan, snapped to nothing (2.004x, no 2x level).
        let g = plan_geometry(
            Target::Magnification(10.0),
            512,
            128,
            &pyramid(),
            Some(0.499),
            Some(20.0),
            Path::new("s"),
        )
        .unwrap();
        assert_eq!(g.size0, (512.0f64 * 1.0 / 0.499).round() as u64);
        // No mpp: 40x objective at 10x is 4x.
        let g = plan_geometry(
            Target::Magnification(10.0),
            256,
            0,
            &pyramid(),
            None,
            Some(40.0),
            Path::new("s"),
        )
        .unwrap();
        assert_eq!((g.size0, g.mpp), (1024, None));
    }

    #[test]
    fn missing_mpp_is_a_clear_error() {
        let err = plan_geometry(
            Target::Mpp(0.5),
            256,
            0,
            &pyramid(),
            None,
            None,
            Path::new("/d/boxes.tiff"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/d/boxes.tiff") && err.contains("`mpp` column"),
            "{err}"
        );
    }
}
