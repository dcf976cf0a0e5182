//! Everything decided about one slide before any tile pixel is read: the resolution and tile
//! geometry, the tissue mask, and the kept tile positions.

use crate::error::TileResult;
use crate::grid::{grid_positions, tissue_tiles, GridTile, MaskScale};
use crate::reader::{Overview, SlideReader};
use crate::resample::{resize, Window};
use crate::resolution::{plan_geometry, Target, TileGeometry};
use crate::tissue::{detect_tissue, Mask, TissueParams};
use std::path::Path;

/// What to plan for.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub target: Target,
    pub tile_px: u32,
    pub overlap_px: u32,
    pub min_tissue: f64,
    pub tissue: TissueParams,
    /// Longest side of the thumbnail picture to keep; `None` keeps none.
    pub picture_max_side: Option<u32>,
}

/// The outcome of planning one slide.
#[derive(Debug, Clone)]
pub struct SlidePlan {
    /// Level-0 width and height.
    pub dimensions: (u64, u64),
    pub geometry: TileGeometry,
    /// Pyramid level the tiles are read from.
    pub level: u32,
    /// Grid positions before the tissue filter.
    pub candidates: usize,
    /// Kept tiles, row-major.
    pub tiles: Vec<GridTile>,
    pub mask: Mask,
    pub mask_scale: MaskScale,
    /// The picture for the thumbnail, when asked for.
    pub picture: Option<Overview>,
}

/// Plans `reader`'s slide. `mpp_override` (the dataset's `mpp` column) wins over metadata.
pub fn plan_slide(
    reader: &SlideReader,
    mpp_override: Option<f64>,
    options: &PlanOptions,
) -> TileResult<SlidePlan> {
    let slide_mpp = mpp_override.or(reader.mpp());
    let geometry = plan_geometry(
        options.target,
        options.tile_px,
        options.overlap_px,
        reader.levels(),
        slide_mpp,
        reader.objective_power(),
        reader.path(),
    )?;
    let level = reader.tile_level(geometry.size0, geometry.tile_px);
    let (w0, h0) = reader.dimensions();
    let mask_ds = options.tissue.downsample.max(1.0);
    let picture_ds = options
        .picture_max_side
        .map(|side| (w0.max(h0) as f64 / f64::from(side.max(1))).max(1.0));
    // The mask is always computed from an overview read at its own scale, so that tiling
    // results do not depend on the thumbnail settings.
    let overview = reader.read_overview(mask_ds)?;
    let (mw, mh) = (overview.width, overview.height);
    let mask = detect_tissue(&overview.rgb, mw, mh, &options.tissue);
    let mask_scale = MaskScale {
        x: w0 as f64 / mw as f64,
        y: h0 as f64 / mh as f64,
    };
    let positions = grid_positions(reader.bounds(), geometry.size0, geometry.stride0);
    let tiles = tissue_tiles(
        &positions,
        geometry.size0,
        &mask,
        mask_scale,
        options.min_tissue,
    );
    let picture = match picture_ds {
        None => None,
        // A picture finer than the mask needs its own read; a coarser one is the overview resized.
        Some(ds) if ds < mask_ds => Some(reader.read_overview(ds)?),
        Some(ds) => Some(picture_from(overview, w0, h0, ds)),
    };
    Ok(SlidePlan {
        dimensions: (w0, h0),
        geometry,
        level,
        candidates: positions.len(),
        tiles,
        mask,
        mask_scale,
        picture,
    })
}

/// The thumbnail picture at `ds`, from an overview read at `ds` or finer.
fn picture_from(overview: Overview, w0: u64, h0: u64, ds: f64) -> Overview {
    let (pw, ph) = (
        ((w0 as f64 / ds).round() as usize).max(1),
        ((h0 as f64 / ds).round() as usize).max(1),
    );
    if (pw, ph) == (overview.width, overview.height) {
        return overview;
    }
    let full = Window::full(overview.width, overview.height);
    let rgb = resize(
        &overview.rgb,
        overview.width,
        overview.height,
        3,
        full,
        pw,
        ph,
    );
    Overview {
        rgb,
        width: pw,
        height: ph,
        scale_x: w0 as f64 / pw as f64,
        scale_y: h0 as f64 / ph as f64,
    }
}

/// Convenience for callers holding only a path.
pub fn plan_slide_at(
    path: &Path,
    mpp_override: Option<f64>,
    options: &PlanOptions,
) -> TileResult<SlidePlan> {
    plan_slide(&SlideReader::open(path)?, mpp_override, options)
}
