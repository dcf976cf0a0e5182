//! Parameters of the `heatmap` stage and its description to the engine.

use std::path::PathBuf;

use arrow::datatypes::{DataType, SchemaRef};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tessera_mil::predictions::PREDICTED_INDEX;
use tessera_mil::sparse_map::SparseMapParams;
use tessera_pipeline::schema::{tile_key_columns, EMBEDDING, SLIDE_ID};
use tessera_pipeline::{
    per_slide, BuildContext, Column, InputSpec, ParamIssue, Stage, StageKind, StageResult,
};

use crate::stage::HeatmapStage;
use crate::table::stream_schema;

/// Which classes get a heatmap PNG and a top-k strip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DrawClasses {
    /// The class the model predicts for the slide (on all its tiles).
    #[default]
    Predicted,
    /// Every class.
    All,
}

/// Parameters of the `heatmap` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HeatmapParams {
    /// The trained checkpoint: a `.safetensors`/`.json` file of one, a `checkpoints` folder
    /// (its `best`, else `last`) or a run folder; relative to the experiment file. With it the
    /// stage takes one input (embeddings) and streams slide by slide. Without it, the stage
    /// takes a second input, the experiment's `train` (or `evaluate`) stage, waits for training
    /// to finish and uses the best checkpoint it wrote (`OUT/checkpoints/best`).
    pub checkpoint: Option<PathBuf>,
    /// SparseConvMIL only: where tiles land on the sparse map. The checkpoint records the
    /// placement its training used, and that is what heatmaps use; this parameter is for
    /// checkpoints written before that record (give the settings of the `sparse_map` stage
    /// the model was trained with) and must otherwise agree with the checkpoint.
    pub sparse_map: Option<SparseMapParams>,
    /// Heatmap PNGs and top-k strips for the `predicted` class (default) or `all` classes.
    pub draw: DrawClasses,
    /// Number of top-scoring tiles in the strip (0: no strip).
    pub top_k: usize,
    /// Side of each strip tile, in pixels.
    pub top_k_px: u32,
    /// Longest side of the heatmap PNG (the slide's thumbnail), in pixels.
    pub thumbnail_size: u32,
    /// Opacity of the tile colours over the thumbnail, in [0, 1].
    pub alpha: f32,
    /// Draw PNGs (slides without a file in the dataset are drawn on a blank canvas, without
    /// top-k strip).
    pub png: bool,
    /// Write the QuPath GeoJSON.
    pub geojson: bool,
    /// Folder under the run's output folder.
    pub folder: String,
}

impl Default for HeatmapParams {
    fn default() -> Self {
        HeatmapParams {
            checkpoint: None,
            sparse_map: None,
            draw: DrawClasses::Predicted,
            top_k: 8,
            top_k_px: 128,
            thumbnail_size: 1024,
            alpha: 0.5,
            png: true,
            geojson: true,
            folder: "heatmaps".into(),
        }
    }
}

impl StageKind for HeatmapParams {
    const KIND: &'static str = "heatmap";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "Per-tile importance of a trained model (class activation maps on the sparse map, attention weights): Parquet, PNG heatmaps, top-k strips, QuPath GeoJSON";

    fn input_spec(&self) -> InputSpec {
        let mut embeddings = tile_key_columns();
        embeddings.push(Column::embedding(EMBEDDING));
        if self.checkpoint.is_some() {
            InputSpec::Tables(vec![embeddings])
        } else {
            InputSpec::Tables(vec![
                embeddings,
                vec![
                    Column::exact(SLIDE_ID, DataType::Utf8),
                    Column::exact(PREDICTED_INDEX, DataType::Int64),
                ],
            ])
        }
    }

    fn output_schema(&self, _inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        Ok(stream_schema())
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(ParamIssue::new("alpha", "must lie in [0, 1]"));
        }
        if self.thumbnail_size < 16 {
            return Err(ParamIssue::new("thumbnail_size", "must be at least 16"));
        }
        if self.top_k > 0 && self.top_k_px == 0 {
            return Err(ParamIssue::new("top_k_px", "must be positive"));
        }
        if self.folder.trim().is_empty() {
            return Err(ParamIssue::new("folder", "must not be empty"));
        }
        if let Some(p) = &self.checkpoint {
            if p.as_os_str().is_empty() {
                return Err(ParamIssue::new("checkpoint", "must not be empty"));
            }
        }
        if let Some(m) = &self.sparse_map {
            m.validate()
                .map_err(|i| ParamIssue::new(format!("sparse_map.{}", i.field), i.message))?;
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(per_slide(HeatmapStage::new(self.clone(), ctx)?))
    }

    fn cacheable(&self) -> bool {
        false
    }
}
