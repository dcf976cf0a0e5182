//! The `tile` stage kind: a dataset source that tiles each slide at a physical resolution,
//! keeps tissue tiles, writes a thumbnail, and streams coordinates (and pixels) downstream in
//! batches.

use crate::batch::{build_batch, rows_of, tile_schema, TileRow};
use crate::error::TileError;
use crate::plan::{plan_slide, PlanOptions, SlidePlan};
use crate::pool::{read_tiles_ordered, PoolOptions, TileRequest};
use crate::reader::{ReaderMode, SlideReader};
use crate::resolution::Target;
use crate::thumbnail;
use crate::tissue::TissueParams;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tessera_pipeline::schema::{PIXELS, PIXELS_SIZE};
use tessera_pipeline::TILES;
use tessera_pipeline::{
    BuildContext, InputSpec, ParamIssue, SlideHandle, Stage, StageContext, StageError, StageKind,
    StageResult,
};

impl From<TileError> for StageError {
    fn from(e: TileError) -> Self {
        StageError::msg(e)
    }
}

/// Parameters of the `tile` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TileParams {
    /// Side of the tiles in pixels at the target resolution (`mpp` or `magnification`; level-0
    /// pixels when neither is set). The `tile_size` column holds the side in level-0 pixels.
    pub tile_size: u32,
    /// Target resolution in microns per pixel (e.g. 0.5 for "20x", 1.0 for "10x"). Tiles are read
    /// from the best pyramid level and resampled when no level matches (within 1%). Needs the
    /// slide's mpp: metadata, or the dataset CSV's `mpp` column. Exclusive with `magnification`.
    pub mpp: Option<f64>,
    /// Target objective magnification (e.g. 10): converted to mpp as 10 / magnification
    /// through the slide's mpp, or through its objective power when the slide has no mpp.
    pub magnification: Option<f64>,
    /// Overlap between neighbouring tiles, in pixels at the target resolution
    /// (SparseConvMIL: 512 px tiles, 128 px overlap, at 10x).
    pub overlap: u32,
    /// Keep tiles whose tissue fraction on the tissue mask is at least this (0 keeps all).
    pub min_tissue: f64,
    /// Tissue detection on a low-resolution overview (HSV saturation, median blur, Otsu,
    /// closing).
    pub tissue: TissueParams,
    /// Emit each tile's RGB pixels (`pixels`, `pixels_size`) for embedding; false for
    /// coordinate-only runs. Pixels are never cached: a cached run re-reads them.
    pub emit_pixels: bool,
    /// Threads reading one slide's tiles, each with its own OpenSlide handle.
    pub read_threads: usize,
    /// Pixel decoder: `auto` reads JPEG-compressed tiled TIFF / Aperio SVS tiles directly
    /// with libjpeg-turbo (same pixels as OpenSlide, about twice as fast) and uses OpenSlide
    /// for everything else; `openslide` decodes everything through OpenSlide.
    pub reader: ReaderMode,
    /// Tiles per emitted batch (bounds memory: batch_size x tile_size² x 3 bytes).
    pub batch_size: usize,
    /// Write `<out_dir>/thumbnails/<slide_id>.png`: the slide with its tissue mask and kept
    /// tiles drawn on it.
    pub thumbnails: bool,
    /// Longest side of the thumbnail PNG, in pixels.
    pub thumbnail_size: u32,
}

impl Default for TileParams {
    fn default() -> Self {
        TileParams {
            tile_size: 256,
            mpp: None,
            magnification: None,
            overlap: 0,
            min_tissue: 0.5,
            tissue: TissueParams::default(),
            emit_pixels: true,
            read_threads: 2,
            reader: ReaderMode::Auto,
            batch_size: 64,
            thumbnails: true,
            thumbnail_size: 1024,
        }
    }
}

impl TileParams {
    fn target(&self) -> Target {
        match (self.mpp, self.magnification) {
            (Some(mpp), _) => Target::Mpp(mpp),
            (None, Some(mag)) => Target::Magnification(mag),
            (None, None) => Target::Native,
        }
    }

    fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            target: self.target(),
            tile_px: self.tile_size,
            overlap_px: self.overlap,
            min_tissue: self.min_tissue,
            tissue: self.tissue.clone(),
            picture_max_side: self.thumbnails.then_some(self.thumbnail_size),
        }
    }

    fn pool_options(&self) -> PoolOptions {
        PoolOptions {
            threads: self.read_threads,
            mode: self.reader,
            ..PoolOptions::default()
        }
    }
}

fn positive(field: &str, v: Option<f64>) -> Result<(), ParamIssue> {
    match v {
        Some(v) if !(v.is_finite() && v > 0.0) => Err(ParamIssue::new(
            field,
            format!("must be a positive number, got {v}"),
        )),
        _ => Ok(()),
    }
}

impl StageKind for TileParams {
    const KIND: &'static str = "tile";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "Tiles slides with OpenSlide at a physical resolution (mpp or magnification), keeps tissue tiles, writes thumbnails";

    fn input_spec(&self) -> InputSpec {
        InputSpec::Dataset
    }

    fn output_schema(&self, _inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        Ok(tile_schema(self.emit_pixels))
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        if self.tile_size < 8 || self.tile_size > 16384 {
            return Err(ParamIssue::new(
                "tile_size",
                format!("must be in 8..=16384 pixels, got {}", self.tile_size),
            ));
        }
        if self.overlap >= self.tile_size {
            return Err(ParamIssue::new(
                "overlap",
                format!(
                    "must be smaller than tile_size ({}), got {}",
                    self.tile_size, self.overlap
                ),
            ));
        }
        if self.mpp.is_some() && self.magnification.is_some() {
            return Err(ParamIssue::new(
                "magnification",
                "set either `mpp` or `magnification`, not both",
            ));
        }
        positive("mpp", self.mpp)?;
        positive("magnification", self.magnification)?;
        if !(0.0..=1.0).contains(&self.min_tissue) {
            return Err(ParamIssue::new(
                "min_tissue",
                format!("must be in [0, 1], got {}", self.min_tissue),
            ));
        }
        if !(self.tissue.downsample.is_finite() && self.tissue.downsample >= 1.0) {
            return Err(ParamIssue::new(
                "tissue.downsample",
                "must be a number >= 1",
            ));
        }
        if self.tissue.median_kernel > 101 || self.tissue.close_kernel > 101 {
            return Err(ParamIssue::new(
                "tissue",
                "kernel sizes must be at most 101 overview pixels",
            ));
        }
        if !(1..=64).contains(&self.read_threads) {
            return Err(ParamIssue::new(
                "read_threads",
                format!("must be in 1..=64, got {}", self.read_threads),
            ));
        }
        if self.batch_size == 0 {
            return Err(ParamIssue::new("batch_size", "must be at least 1"));
        }
        if self.thumbnails && self.thumbnail_size < 16 {
            return Err(ParamIssue::new(
                "thumbnail_size",
                "must be at least 16 pixels",
            ));
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(Box::new(TileStage {
            params: self.clone(),
            schema: tile_schema(self.emit_pixels),
            out_dir: ctx.out_dir.clone(),
        }))
    }

    /// How the tiles are read and drawn, not which tiles: same table.
    fn key_neutral_params() -> &'static [&'static str] {
        &[
            "read_threads",
            "reader",
            "batch_size",
            "thumbnails",
            "thumbnail_size",
        ]
    }

    fn uncached_columns(&self) -> Vec<String> {
        if self.emit_pixels {
            vec![PIXELS.to_string(), PIXELS_SIZE.to_string()]
        } else {
            Vec::new()
        }
    }
}

/// The running `tile` stage.
pub struct TileStage {
    params: TileParams,
    schema: SchemaRef,
    out_dir: PathBuf,
}

impl TileStage {
    /// Checks the slide whole ([`SlideReader::verify`]), plans it (geometry, tissue, kept
    /// tiles) and writes its thumbnail.
    pub fn plan(&self, slide: &SlideHandle) -> StageResult<(SlidePlan, PathBuf)> {
        let path = slide_path(slide)?;
        let reader = SlideReader::open(&path)?;
        reader.verify()?;
        let plan = plan_slide(&reader, slide.mpp, &self.params.plan_options())?;
        if let Some(picture) = &plan.picture {
            let file = self.thumbnail_path(slide);
            thumbnail::write(&file, picture, &plan.mask, &plan.tiles, plan.geometry.size0)?;
        }
        Ok((plan, path))
    }

    /// Where the slide's thumbnail goes in this run's output folder.
    fn thumbnail_path(&self, slide: &SlideHandle) -> PathBuf {
        self.out_dir
            .join("thumbnails")
            .join(format!("{}.png", file_stem(&slide.id)))
    }

    /// The table rows of a plan.
    pub fn rows(plan: &SlidePlan) -> Vec<TileRow> {
        plan.tiles
            .iter()
            .map(|t| TileRow {
                x: t.x as i64,
                y: t.y as i64,
                size0: plan.geometry.size0 as i64,
                level: plan.level as i32,
                mpp: plan.geometry.mpp,
                tissue: t.tissue as f32,
            })
            .collect()
    }

    /// Emits `rows` in batches of `batch_size`, with their pixels read by the thread pool when
    /// the stage emits pixels. `emit` returning an error stops reading.
    pub fn stream(
        &self,
        slide_id: &str,
        path: &Path,
        rows: &[TileRow],
        emit: &mut dyn FnMut(RecordBatch) -> StageResult,
    ) -> StageResult {
        let batch_size = self.params.batch_size;
        if !self.params.emit_pixels {
            for chunk in rows.chunks(batch_size) {
                emit(build_batch(&self.schema, slide_id, chunk, None)?)?;
            }
            return Ok(());
        }
        let requests: Vec<TileRequest> = rows
            .iter()
            .map(|r| {
                let (x, y, size0) = (
                    u64::try_from(r.x),
                    u64::try_from(r.y),
                    u64::try_from(r.size0),
                );
                match (x, y, size0) {
                    (Ok(x), Ok(y), Ok(size0)) => Ok(TileRequest { x, y, size0 }),
                    _ => Err(StageError::msg(format!(
                        "negative tile coordinate ({}, {}, {})",
                        r.x, r.y, r.size0
                    ))),
                }
            })
            .collect::<StageResult<_>>()?;
        let tile_px = self.params.tile_size;
        let mut pending: Vec<Vec<u8>> = Vec::with_capacity(batch_size);
        let mut done = 0;
        read_tiles_ordered::<StageError>(
            path,
            &requests,
            tile_px,
            self.params.pool_options(),
            &mut |pixels| {
                for tile in pixels {
                    pending.push(tile);
                    if pending.len() == batch_size {
                        let batch = build_batch(
                            &self.schema,
                            slide_id,
                            &rows[done..done + batch_size],
                            Some((&pending, tile_px)),
                        )?;
                        done += batch_size;
                        pending.clear();
                        emit(batch)?;
                    }
                }
                Ok(())
            },
        )?;
        if !pending.is_empty() {
            emit(build_batch(
                &self.schema,
                slide_id,
                &rows[done..],
                Some((&pending, tile_px)),
            )?)?;
        }
        Ok(())
    }
}

impl Stage for TileStage {
    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        record_library(ctx);
        let (plan, path) = self.plan(slide)?;
        let rows = Self::rows(&plan);
        if rows.is_empty() {
            let why = if plan.candidates == 0 {
                format!(
                    "no tiles: the slide ({}x{} px) is smaller than one tile ({} level-0 px)",
                    plan.dimensions.0, plan.dimensions.1, plan.geometry.size0
                )
            } else {
                format!(
                    "no tissue tiles: none of {} tiles reaches min_tissue {} (tissue covers {:.1}% of the slide)",
                    plan.candidates,
                    self.params.min_tissue,
                    100.0 * plan.mask.coverage()
                )
            };
            ctx.warn(Some(slide), why);
            return ctx.end_slide(slide);
        }
        ctx.plan_items(TILES, rows.len() as u64);
        self.stream(&slide.id, &path, &rows, &mut |batch| {
            let n = batch.num_rows() as u64;
            ctx.emit(slide, batch)?;
            ctx.items_done(TILES, n);
            Ok(())
        })?;
        ctx.end_slide(slide)
    }

    fn replay(
        &mut self,
        ctx: &mut StageContext,
        slide: &SlideHandle,
        cached: Vec<RecordBatch>,
    ) -> StageResult {
        record_library(ctx);
        if !self.params.emit_pixels {
            for batch in cached {
                ctx.emit(slide, batch)?;
            }
            return ctx.end_slide(slide);
        }
        let mut rows = Vec::new();
        for batch in &cached {
            rows.extend(rows_of(batch)?);
        }
        if !rows.is_empty() {
            ctx.plan_items(TILES, rows.len() as u64);
            let path = slide_path(slide)?;
            // The slide is open for its pixels anyway: give this run's output its thumbnail
            // too (tissue detection on the overview, a few tens of ms).
            if self.params.thumbnails && !self.thumbnail_path(slide).exists() {
                self.plan(slide)?;
            }
            self.stream(&slide.id, &path, &rows, &mut |batch| {
                let n = batch.num_rows() as u64;
                ctx.emit(slide, batch)?;
                ctx.items_done(TILES, n);
                Ok(())
            })?;
        }
        ctx.end_slide(slide)
    }
}

/// Puts the OpenSlide version the slides were read with into run.json (`details.openslide`):
/// which formats open depends on it (DICOM needs 4).
fn record_library(ctx: &StageContext) {
    ctx.set_detail(
        "openslide",
        serde_json::Value::String(crate::openslide_version().to_string()),
    );
}

fn slide_path(slide: &SlideHandle) -> StageResult<PathBuf> {
    slide.path.clone().ok_or_else(|| {
        TileError::NoPath {
            slide_id: slide.id.clone(),
        }
        .into()
    })
}

/// A file name for a slide id (ids may hold path separators).
fn file_stem(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
