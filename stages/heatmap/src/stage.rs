//! The running `heatmap` stage. With an explicit `checkpoint` it scores each slide as soon as
//! its embeddings have arrived (memory: one slide). Without one, its second input is the
//! training stage: it keeps every slide's embeddings until training is over (the engine calls
//! `finish` when both inputs are closed), then reads `OUT/checkpoints/best` and scores them all.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use candle_core::Device;
use tessera_mil::importance::LoadedModel;
use tessera_mil::sparse_map::SparseMapParams;
use tessera_pipeline::{
    check_running, BuildContext, SlideHandle, Stage, StageContext, StageError, StageResult,
};
use tessera_tile::SlideReader;

use crate::params::{DrawClasses, HeatmapParams};
use crate::render::{blank_canvas, overlay, save_png, strip, thumbnail, ColorScale, ScoredTile};
use crate::scores::{score_slide, SlideTiles, TileScores};
use crate::settings::{locate_checkpoint, run_experiment_of, sparse_map_of};
use crate::table::{to_stream, write_parquet, SCORE_PREFIX};
use crate::{file_stem, HeatmapError};

/// The model and the placement it was trained with.
struct Scorer {
    model: LoadedModel,
    sparse_map: Option<SparseMapParams>,
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
    /// Embedding batches per slide (dataset index).
    pending: HashMap<usize, Vec<RecordBatch>>,
    /// When the stage was built: in the waiting mode, the checkpoint must be newer (written by
    /// this run's training, not left by an earlier run).
    started: std::time::SystemTime,
    /// Slides whose embeddings are complete, waiting for the checkpoint.
    complete: BTreeMap<usize, SlideHandle>,
    /// Every slide seen on any input, to end each once.
    seen: BTreeMap<usize, SlideHandle>,
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
            pending: HashMap::new(),
            complete: BTreeMap::new(),
            seen: BTreeMap::new(),
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
        let sparse_map = if !model.meta.model.pooling.is_spatial() {
            None
        } else if let Some(p) = &self.params.sparse_map {
            Some(p.clone())
        } else {
            let exp = run_experiment_of(&files).ok_or_else(|| {
                HeatmapError::Invalid(format!(
                    "checkpoint {}: no experiment.yaml in its run folder to read the sparse-map settings from; set the heatmap's `sparse_map` parameter",
                    files.meta.display()
                ))
            })?;
            Some(sparse_map_of(&exp)?)
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
            sparse_map,
            checkpoint: files.weights,
        })
    }

    /// Scores one slide, writes its files and returns the rows to emit.
    fn process(
        &self,
        scorer: &Scorer,
        slide: &SlideHandle,
        batches: &[RecordBatch],
    ) -> Result<RecordBatch, HeatmapError> {
        let tiles = SlideTiles::from_batches(&slide.id, batches)?;
        let scores = score_slide(&scorer.model, &tiles, scorer.sparse_map.as_ref())?;
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

    fn emit_slide(
        &mut self,
        ctx: &mut StageContext,
        scorer: &Scorer,
        slide: &SlideHandle,
        batches: &[RecordBatch],
    ) -> StageResult {
        if slide.path.is_none() && self.params.png && !self.warned_no_file {
            self.warned_no_file = true;
            ctx.warn(
                None,
                "slides without a file in the dataset get their heatmap on a blank canvas and no top-k strip",
            );
        }
        let rows = self.process(scorer, slide, batches)?;
        ctx.emit(slide, rows)
    }
}

impl Stage for HeatmapStage {
    fn on_batch(
        &mut self,
        _ctx: &mut StageContext,
        input: usize,
        slide: &SlideHandle,
        batch: RecordBatch,
    ) -> StageResult {
        self.seen
            .entry(slide.index)
            .or_insert_with(|| slide.clone());
        if input == 0 {
            self.pending.entry(slide.index).or_default().push(batch);
        }
        Ok(())
    }

    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        self.seen
            .entry(slide.index)
            .or_insert_with(|| slide.clone());
        if input != 0 {
            return Ok(());
        }
        if self.scorer.is_none() {
            self.complete.insert(slide.index, slide.clone());
            return Ok(());
        }
        let batches = self.pending.remove(&slide.index).unwrap_or_default();
        self.seen.remove(&slide.index);
        let scorer = self.scorer.take();
        let result = match &scorer {
            Some(s) => self.emit_slide(ctx, s, slide, &batches),
            None => Ok(()),
        };
        self.scorer = scorer;
        result?;
        ctx.end_slide(slide)
    }

    fn on_slide_failed(&mut self, _ctx: &mut StageContext, slide: &SlideHandle) {
        self.pending.remove(&slide.index);
        self.complete.remove(&slide.index);
    }

    fn finish(&mut self, ctx: &mut StageContext) -> StageResult {
        if !self.complete.is_empty() {
            let scorer = self.load().map_err(StageError::from)?;
            let complete = std::mem::take(&mut self.complete);
            ctx.set_progress_len(complete.len() as u64);
            let mut failed = 0;
            for (index, slide) in complete {
                check_running(ctx)?;
                let batches = self.pending.remove(&index).unwrap_or_default();
                match self.emit_slide(ctx, &scorer, &slide, &batches) {
                    Ok(()) => {}
                    Err(StageError::Stopped) => return Err(StageError::Stopped),
                    Err(e) => {
                        failed += 1;
                        ctx.warn(Some(&slide), format!("no heatmap: {e}"));
                    }
                }
            }
            if failed > 0 {
                tracing::warn!(stage = %ctx.stage_name(), "{failed} slides got no heatmap");
            }
            self.scorer = Some(scorer);
        }
        let slides: Vec<SlideHandle> = std::mem::take(&mut self.seen).into_values().collect();
        for slide in &slides {
            ctx.end_slide(slide)?;
        }
        let n = self.out.display().to_string();
        tracing::info!(stage = %ctx.stage_name(), "heatmaps in {n} ({SCORE_PREFIX}<class> per tile)");
        Ok(())
    }
}
