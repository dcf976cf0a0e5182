//! The running `heatmap` stage, a per-slide stage ([`PerSlide`]). With an explicit
//! `checkpoint` it scores each slide as soon as its embeddings have arrived (memory: one
//! slide). Without one, its second input is the training stage: it holds every slide's
//! embeddings until training is over (the engine calls `finish` when both inputs are closed),
//! then reads `OUT/checkpoints/best` and scores them all.
//!
//! SparseConvMIL models place the tiles on the sparse map as their training did: with the
//! placement their checkpoint records ([`tessera_mil::placement`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use candle_core::Device;
use tessera_mil::importance::LoadedModel;
use tessera_mil::placement::Placement;
use tessera_pipeline::{
    check_running, BuildContext, PerSlide, SlideHandle, SlideOutput, StageContext, StageError,
    StageResult,
};
use tessera_tile::SlideReader;

use crate::heatmap::{DrawClasses, HeatmapParams};
use crate::render::{blank_canvas, overlay, save_png, strip, thumbnail, ColorScale, ScoredTile};
use crate::scores::{score_slide, SlideTiles, TileScores};
use crate::settings::locate_checkpoint;
use crate::table::{to_stream, write_parquet, SCORE_PREFIX};
use crate::{file_stem, HeatmapError};

/// The model and the placement it was trained with.
struct Scorer {
    model: LoadedModel,
    placement: Option<Placement>,
    checkpoint: PathBuf,
}

/// The running stage.
pub struct HeatmapStage {
    params: HeatmapParams,
    device: Device,
    out: PathBuf,
    /// Where the checkpoint is (explicit, or the run's own `checkpoints/`).
    checkpoint: PathBuf,
    scorer: Option<Scorer>,
    /// When the stage was built: in the waiting mode, the checkpoint must be newer (written by
    /// this run's training, not left by an earlier run).
    started: std::time::SystemTime,
    /// Slides whose embeddings are complete, waiting for the checkpoint (held: ended in
    /// `finish`).
    complete: BTreeMap<usize, (SlideHandle, Option<RecordBatch>)>,
    /// The note about slides without a file was given.
    warned_no_file: bool,
}

impl HeatmapStage {
    /// Opens the device; with an explicit checkpoint, loads it now so a wrong path fails
    /// before any slide is read.
    pub fn new(params: HeatmapParams, ctx: &BuildContext) -> StageResult<Self> {
        let device = tessera_embed::candle_device(&ctx.device)
            .map_err(|e| StageError::other("choosing the device", e))?;
        let checkpoint = match &params.checkpoint {
            Some(p) => ctx.resolve(p),
            None => ctx.out_dir.join("checkpoints"),
        };
        let mut stage = HeatmapStage {
            out: ctx.out_dir.join(&params.folder),
            params,
            device,
            checkpoint,
            scorer: None,
            started: std::time::SystemTime::now(),
            complete: BTreeMap::new(),
            warned_no_file: false,
        };
        if stage.params.checkpoint.is_some() {
            stage.scorer = Some(stage.load()?);
        }
        Ok(stage)
    }

    fn load(&self) -> Result<Scorer, HeatmapError> {
        let files = locate_checkpoint(&self.checkpoint)?;
        if self.params.checkpoint.is_none() {
            let written = std::fs::metadata(&files.meta).and_then(|m| m.modified());
            // Slack for file systems with coarse timestamps.
            let slack = std::time::Duration::from_secs(2);
            if written.map_or(true, |t| t + slack < self.started) {
                return Err(HeatmapError::Invalid(format!(
                    "checkpoint {} predates this run: training wrote no checkpoint (see the `train` stage's errors)",
                    files.meta.display()
                )));
            }
        }
        let model = LoadedModel::load(&files, &self.device)?;
        let placement = if model.meta.model.pooling.is_spatial() {
            Some(self.placement_of(&model, &files.meta)?)
        } else {
            None
        };
        tracing::info!(
            checkpoint = %files.weights.display(),
            pooling = model.meta.model.pooling.name(),
            epoch = model.meta.epoch,
            "heatmaps by {}",
            model.method().name()
        );
        Ok(Scorer {
            model,
            placement,
            checkpoint: files.weights,
        })
    }

    /// Where a spatial model's tiles land (see [`choose_placement`]).
    fn placement_of(&self, model: &LoadedModel, meta: &Path) -> Result<Placement, HeatmapError> {
        let given = self.params.sparse_map.as_ref().map(|p| p.placement());
        choose_placement(model.meta.placement, given, meta)
    }

    /// Scores one slide, writes its files and returns the rows to emit.
    fn process(
        &self,
        scorer: &Scorer,
        slide: &SlideHandle,
        table: Option<&RecordBatch>,
    ) -> Result<RecordBatch, HeatmapError> {
        let tiles = SlideTiles::from_batches(
            &slide.id,
            table.map(std::slice::from_ref).unwrap_or_default(),
        )?;
        let scores = score_slide(&scorer.model, &tiles, scorer.placement.as_ref())?;
        std::fs::create_dir_all(&self.out).map_err(|e| HeatmapError::Write {
            path: self.out.display().to_string(),
            message: e.to_string(),
        })?;
        let stem = file_stem(&slide.id);
        let mut metadata = HashMap::new();
        metadata.insert("tessera.heatmap.method".into(), scores.method.name().into());
        metadata.insert(
            "tessera.heatmap.checkpoint".into(),
            scorer.checkpoint.display().to_string(),
        );
        metadata.insert(
            "tessera.heatmap.classes".into(),
            serde_json::to_string(&scores.classes).unwrap_or_default(),
        );
        metadata.insert(
            "tessera.heatmap.predicted".into(),
            scores.classes[scores.predicted()].clone(),
        );
        metadata.insert(
            "tessera.heatmap.probs".into(),
            serde_json::to_string(&scores.probs).unwrap_or_default(),
        );
        write_parquet(
            &self.out.join(format!("{stem}.parquet")),
            &scores,
            &metadata,
        )?;
        if self.params.geojson {
            let path = self.out.join(format!("{stem}.geojson"));
            let text =
                serde_json::to_vec(&crate::geojson::feature_collection(&scores)).map_err(|e| {
                    HeatmapError::Write {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    }
                })?;
            std::fs::write(&path, text).map_err(|e| HeatmapError::Write {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        }
        if self.params.png {
            self.draw(&scores, slide.path.as_deref(), &stem)?;
        }
        to_stream(&scores)
    }

    /// The heatmap and top-k strip PNGs of the chosen classes.
    fn draw(
        &self,
        scores: &TileScores,
        slide: Option<&Path>,
        stem: &str,
    ) -> Result<(), HeatmapError> {
        let reader = slide.map(SlideReader::open).transpose()?;
        let picture = match &reader {
            Some(r) => Some(thumbnail(r, self.params.thumbnail_size)?),
            None => None,
        };
        let classes: Vec<usize> = match self.params.draw {
            DrawClasses::Predicted => vec![scores.predicted()],
            DrawClasses::All if scores.method.class_specific() => {
                (0..scores.classes.len()).collect()
            }
            // Class-agnostic scores: one picture says it all.
            DrawClasses::All => vec![scores.predicted()],
        };
        for c in classes {
            let values = scores.class_scores(c);
            let scale = ColorScale::for_scores(&values);
            let tiles: Vec<ScoredTile> = (0..scores.len())
                .map(|i| ScoredTile {
                    x: scores.xs[i],
                    y: scores.ys[i],
                    size: scores.sizes[i],
                    score: values[i],
                })
                .collect();
            let name = file_stem(&scores.classes[c]);
            let (rgb, w, h) = match &picture {
                Some(p) => overlay(p, &tiles, scale, self.params.alpha),
                None => {
                    let (p, shifted) = blank_canvas(&tiles, self.params.thumbnail_size);
                    overlay(&p, &shifted, scale, 1.0)
                }
            };
            save_png(&self.out.join(format!("{stem}.{name}.png")), &rgb, w, h)?;
            if let (Some(reader), true) = (&reader, self.params.top_k > 0) {
                let mut ranked = tiles.clone();
                ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
                ranked.truncate(self.params.top_k);
                let (rgb, w, h) = strip(reader, &ranked, scale, self.params.top_k_px)?;
                let file = format!("{stem}.{name}.top{}.png", self.params.top_k);
                save_png(&self.out.join(file), &rgb, w, h)?;
            }
        }
        Ok(())
    }

    /// The slide's rows, once its heatmap files are written.
    fn score(
        &mut self,
        ctx: &StageContext,
        scorer: &Scorer,
        slide: &SlideHandle,
        table: Option<&RecordBatch>,
    ) -> StageResult<RecordBatch> {
        if slide.path.is_none() && self.params.png && !self.warned_no_file {
            self.warned_no_file = true;
            ctx.warn(
                None,
                "slides without a file in the dataset get their heatmap on a blank canvas and no top-k strip",
            );
        }
        Ok(self.process(scorer, slide, table)?)
    }
}

/// Where a spatial model's tiles land: as its checkpoint (`meta`) records. The heatmap's
/// `sparse_map` parameter (`given`) stands in for the record with checkpoints written before
/// it existed, and must otherwise agree with it.
fn choose_placement(
    recorded: Option<Placement>,
    given: Option<Placement>,
    meta: &Path,
) -> Result<Placement, HeatmapError> {
    match (recorded, given) {
        (Some(recorded), None) => Ok(recorded),
        (Some(recorded), Some(given)) if recorded == given => Ok(recorded),
        (Some(recorded), Some(given)) => Err(HeatmapError::Invalid(format!(
            "checkpoint {}: the model was trained on tiles placed by {recorded}, the heatmap's `sparse_map` parameter says {given}; remove the parameter (the checkpoint's placement is used)",
            meta.display()
        ))),
        (None, Some(given)) => Ok(given),
        (None, None) => Err(HeatmapError::Invalid(format!(
            "checkpoint {} does not record where its sparse map placed the tiles (it predates that record): retrain the model, or set the heatmap's `sparse_map` parameter to the `sparse_map` settings it was trained with",
            meta.display()
        ))),
    }
}

impl PerSlide for HeatmapStage {
    fn process_slide(
        &mut self,
        ctx: &mut StageContext,
        slide: &SlideHandle,
        table: Option<RecordBatch>,
    ) -> StageResult<SlideOutput> {
        let Some(scorer) = self.scorer.take() else {
            self.complete.insert(slide.index, (slide.clone(), table));
            return Ok(SlideOutput::Held);
        };
        let rows = self.score(ctx, &scorer, slide, table.as_ref());
        self.scorer = Some(scorer);
        Ok(SlideOutput::Rows(vec![rows?]))
    }

    fn forget_slide(&mut self, slide: &SlideHandle) {
        self.complete.remove(&slide.index);
    }

    /// In the waiting mode, scores the held slides with the checkpoint training wrote (a
    /// slide that fails is reported and gets no heatmap), then ends them.
    fn finish(&mut self, ctx: &mut StageContext) -> StageResult {
        let complete = std::mem::take(&mut self.complete);
        if !complete.is_empty() {
            let scorer = self.load().map_err(StageError::from)?;
            ctx.set_progress_len(complete.len() as u64);
            let mut failed = 0;
            for (slide, table) in complete.values() {
                check_running(ctx)?;
                match self.score(ctx, &scorer, slide, table.as_ref()) {
                    Ok(rows) => ctx.emit(slide, rows)?,
                    Err(StageError::Stopped) => return Err(StageError::Stopped),
                    Err(e) => {
                        failed += 1;
                        ctx.warn(Some(slide), format!("no heatmap: {e}"));
                    }
                }
            }
            if failed > 0 {
                tracing::warn!(stage = %ctx.stage_name(), "{failed} slides got no heatmap");
            }
            self.scorer = Some(scorer);
        }
        for (slide, _) in complete.values() {
            ctx.end_slide(slide)?;
        }
        let n = self.out.display().to_string();
        tracing::info!(stage = %ctx.stage_name(), "heatmaps in {n} ({SCORE_PREFIX}<class> per tile)");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_mil::sparse_map::SparseMapParams;

    #[test]
    fn the_placement_comes_from_the_checkpoint_and_old_ones_need_retraining() {
        let meta = Path::new("run/checkpoints/best.json");
        let recorded = SparseMapParams {
            downsample: Some(2.0),
            ..Default::default()
        }
        .placement();
        let other = SparseMapParams::default().placement();
        assert_eq!(
            choose_placement(Some(recorded), None, meta).unwrap(),
            recorded
        );
        assert_eq!(
            choose_placement(Some(recorded), Some(recorded), meta).unwrap(),
            recorded
        );
        let err = choose_placement(Some(recorded), Some(other), meta)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("best.json") && err.contains("sparse_map"),
            "{err}"
        );
        assert_eq!(choose_placement(None, Some(other), meta).unwrap(), other);
        let err = choose_placement(None, None, meta).unwrap_err().to_string();
        assert!(
            err.contains("run/checkpoints/best.json") && err.contains("retrain"),
            "{err}"
        );
    }
}
