//! `kind: embed`: tiles in, embeddings out. Rows are gathered per slide into batches of
//! `batch_size`, embedded, and emitted as soon as a batch is full, so embedding overlaps with
//! tiling and memory holds at most one batch per slide in flight.

use crate::columns::{embed_output_schema, embedding_column};
use crate::embedder::{
    candle_device, load_embedder, Architecture, ComputeDtype, EmbedderSpec, TileEmbedder,
};
use crate::error::EmbedError;
use crate::preprocess::{Preprocess, IMAGENET_MEAN, IMAGENET_STD};
use crate::presets::Preset;
use crate::vit::VitPooling;
use crate::weights::{WeightsSource, HF_SCHEME};
use arrow::array::{Array, BinaryArray, Int32Array, Int64Array};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tessera_pipeline::schema::{tile_key_columns, PIXELS, PIXELS_SIZE, X, Y};
use tessera_pipeline::{
    BuildContext, Column, InputSpec, ParamIssue, SlideHandle, Stage, StageContext, StageError,
    StageKind, StageResult, TILES,
};

/// The `weights` value that asks for seeded random parameters.
pub const RANDOM_WEIGHTS: &str = "random";

/// How a ViT's tokens become the embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The class token.
    #[default]
    Cls,
    /// The mean of the patch tokens (register tokens excluded).
    Mean,
    /// The class token concatenated with the mean patch token (twice as wide).
    ClsMean,
}

impl From<Pooling> for VitPooling {
    fn from(p: Pooling) -> Self {
        match p {
            Pooling::Cls => VitPooling::Cls,
            Pooling::Mean => VitPooling::Mean,
            Pooling::ClsMean => VitPooling::ClsMean,
        }
    }
}

impl From<VitPooling> for Pooling {
    fn from(p: VitPooling) -> Self {
        match p {
            VitPooling::Cls => Pooling::Cls,
            VitPooling::Mean => Pooling::Mean,
            VitPooling::ClsMean => Pooling::ClsMean,
        }
    }
}

/// Parameters of `kind: embed`, as resolved: with a `preset`, the preprocessing, pooling and
/// weights it implies are filled in (so they enter the cache key), explicit values win.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "EmbedParamsInput")]
pub struct EmbedParams {
    /// Network: resnet18 | resnet34 | resnet50 (torchvision) | vit_s14 | vit_b14 | vit_l14
    /// (DINOv2) | vit_b16 | vit_l16 (timm).
    pub arch: Architecture,
    /// The model's parameters: a `.safetensors` file or a PyTorch `.pth`/`.pt`/`.bin`
    /// checkpoint (relative to the experiment file), with torchvision/DINOv2/timm names; or
    /// `random` for seeded random weights (tests and demos only: the output is flagged).
    pub weights: String,
    /// Prefix of the parameter names inside the weights file, e.g. `module.` or `backbone.`.
    pub weights_prefix: String,
    /// Seed of `weights: random`.
    pub seed: u64,
    /// Side, in pixels, of the images the model sees; tiles of another size are resized
    /// (antialiased bilinear). Must be a multiple of the patch size for ViTs.
    pub input_size: usize,
    /// Per-channel mean (RGB, on 0..1 values) subtracted before the model. ImageNet's by default.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB) divided by before the model. ImageNet's by default.
    pub std: [f32; 3],
    /// Tiles per forward pass.
    pub batch_size: usize,
    /// Store embeddings as Float16 (half the cache size) instead of Float32.
    pub half: bool,
    /// ViTs only: `cls`, or `cls_mean` (class token and mean patch token, concatenated).
    pub pooling: Pooling,
    /// What the network computes in: `f32` (default); `f16` / `bf16` on a GPU (tensor
    /// cores; about three significant digits); `bf16` on a CPU with AVX512-BF16 or AMX
    /// (products of bf16-rounded operands, f32 sums: cosine to f32 >= 0.9999; an error on
    /// CPUs without it). Part of the cache key (left out of it when f32, so caches
    /// made before this option stay valid).
    #[serde(skip_serializing_if = "ComputeDtype::is_f32")]
    pub compute: ComputeDtype,
    /// A pathology foundation model by name (replaces `arch`); see [`EmbedParamsInput::preset`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
}

/// Parameters of `kind: embed` as an experiment file writes them.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedParamsInput {
    /// Network: resnet18 | resnet34 | resnet50 (torchvision) | vit_s14 | vit_b14 | vit_l14
    /// (DINOv2) | vit_b16 | vit_l16 (timm). Default resnet18. Not with `preset`.
    #[schemars(extend("default" = "resnet18"))]
    pub arch: Option<Architecture>,
    /// A pathology foundation model by name, with the architecture, weights naming,
    /// preprocessing and output its model card prescribes: uni (1024) | uni2_h (1536) |
    /// virchow (2560) | virchow2 (2560) | h_optimus_0 (1536) | h_optimus_1 (1536) | h0_mini
    /// (1536) | prov_gigapath (1536) | phikon (768) | phikon_v2 (1024) | gpfm (1024) | hibou_b
    /// (768) | hibou_l (1024) | midnight (3072) | conch_v1_5_trunk (1024). `weights` then
    /// defaults to `hf:<its repository>`; `input_size`, `mean`, `std`, `pooling` to its own.
    pub preset: Option<Preset>,
    /// The model's parameters: a `.safetensors` file or a PyTorch `.pth`/`.pt`/`.bin`
    /// checkpoint (relative to the experiment file), with torchvision/DINOv2/timm names (or
    /// Hugging Face ones for the presets that come from `transformers`); `hf:ORG/NAME` (also
    /// `hf:ORG/NAME/FILE`, `hf:ORG/NAME@REVISION`) for a model already in the local Hugging
    /// Face cache (`$HF_HOME/hub`; nothing is downloaded); or `random` for seeded random
    /// weights (tests and demos only: the output is flagged).
    pub weights: String,
    /// Prefix of the parameter names inside the weights file, e.g. `module.` or `backbone.`.
    pub weights_prefix: String,
    /// Seed of `weights: random`.
    pub seed: u64,
    /// Side, in pixels, of the images the model sees; tiles of another size are resized
    /// (antialiased bilinear). Must be a multiple of the patch size for ViTs. Default 224, or
    /// the preset's.
    #[schemars(extend("default" = 224))]
    pub input_size: Option<usize>,
    /// Per-channel mean (RGB, on 0..1 values) subtracted before the model. ImageNet's by
    /// default, or the preset's.
    #[schemars(extend("default" = [0.485, 0.456, 0.406]))]
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation (RGB) divided by before the model. ImageNet's by
    /// default, or the preset's.
    #[schemars(extend("default" = [0.229, 0.224, 0.225]))]
    pub std: Option<[f32; 3]>,
    /// Tiles per forward pass (default 32).
    #[schemars(extend("default" = 32))]
    pub batch_size: Option<usize>,
    /// Store embeddings as Float16 (half the cache size) instead of Float32.
    pub half: bool,
    /// ViTs only: `cls` (class token), `mean` (mean patch token, registers excluded), or
    /// `cls_mean` (both, concatenated). Default `cls`, or the preset's model card's.
    #[schemars(extend("default" = "cls"))]
    pub pooling: Option<Pooling>,
    /// What the network computes in: `f32` (default); `f16` / `bf16` on a GPU (tensor
    /// cores; about three significant digits); `bf16` on a CPU with AVX512-BF16 or AMX
    /// (products of bf16-rounded operands, f32 sums: cosine to f32 >= 0.9999; an error on
    /// CPUs without it). Part of the cache key (left out of it when f32, so caches
    /// made before this option stay valid).
    pub compute: ComputeDtype,
}

impl TryFrom<EmbedParamsInput> for EmbedParams {
    type Error = String;

    fn try_from(i: EmbedParamsInput) -> Result<Self, String> {
        let d = EmbedParams::default();
        let info = i.preset.map(Preset::info);
        if let (Some(info), Some(arch)) = (&info, i.arch) {
            return Err(format!(
                "give either `arch` ({}) or `preset` ({}), not both: a preset fixes the architecture",
                serde_json::to_value(arch).map(|v| v.to_string()).unwrap_or_default(),
                info.name
            ));
        }
        let weights = match (&info, i.weights.trim().is_empty()) {
            (Some(info), true) => format!("{HF_SCHEME}{}", info.hf_repo),
            _ => i.weights,
        };
        Ok(EmbedParams {
            arch: i.arch.unwrap_or(d.arch),
            weights,
            weights_prefix: i.weights_prefix,
            seed: i.seed,
            input_size: i
                .input_size
                .or(info.as_ref().map(|p| p.input_size))
                .unwrap_or(d.input_size),
            mean: i.mean.or(info.as_ref().map(|p| p.mean)).unwrap_or(d.mean),
            std: i.std.or(info.as_ref().map(|p| p.std)).unwrap_or(d.std),
            batch_size: i.batch_size.unwrap_or(d.batch_size),
            half: i.half,
            pooling: i
                .pooling
                .or(info.as_ref().map(|p| p.pooling.into()))
                .unwrap_or(d.pooling),
            compute: i.compute,
            preset: i.preset,
        })
    }
}

impl Default for EmbedParams {
    fn default() -> Self {
        EmbedParams {
            arch: Architecture::Resnet18,
            weights: String::new(),
            weights_prefix: String::new(),
            seed: 0,
            input_size: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            batch_size: 32,
            half: false,
            pooling: Pooling::Cls,
            compute: ComputeDtype::F32,
            preset: None,
        }
    }
}

impl EmbedParams {
    /// The parameters of `preset` with everything it implies (weights from the local Hugging
    /// Face cache, its preprocessing and pooling), as `preset: NAME` alone in an experiment.
    pub fn with_preset(preset: Preset) -> Self {
        EmbedParamsInput {
            preset: Some(preset),
            ..Default::default()
        }
        .try_into()
        .unwrap_or_default()
    }

    fn is_random(&self) -> bool {
        self.weights == RANDOM_WEIGHTS
    }

    /// The embedder this configuration describes, with paths resolved by `ctx`.
    pub fn spec(&self, ctx: &BuildContext) -> EmbedderSpec {
        let weights = WeightsSource::parse(&self.weights, self.seed, |p| ctx.resolve(p));
        EmbedderSpec {
            arch: self.arch,
            weights,
            weights_prefix: self.weights_prefix.clone(),
            preprocess: Preprocess {
                input_size: self.input_size,
                mean: self.mean,
                std: self.std,
            },
            pooling: self.pooling.into(),
            compute: self.compute,
            preset: self.preset,
        }
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        match self.preset {
            Some(p) => VitPooling::from(self.pooling).width(p.info().vit.dim),
            None => self.arch.dim(self.pooling.into()),
        }
    }

    /// Patch size of the network (input sizes must be multiples of it); 1 for CNNs.
    fn patch_size(&self) -> usize {
        match self.preset {
            Some(p) => p.info().vit.patch_size,
            None => self.arch.patch_size(),
        }
    }

    /// What the output's schema metadata (and so every cache file) says about the model.
    fn provenance(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert(
            "tessera.embed.arch".to_string(),
            serde_json::to_value(self.arch)
                .map(|v| v.to_string())
                .unwrap_or_default()
                .trim_matches('"')
                .to_string(),
        );
        let weights = if self.is_random() {
            format!(
                "random (seed {}): NOT a trained model, embeddings are for tests and demos only",
                self.seed
            )
        } else {
            self.weights.clone()
        };
        m.insert("tessera.embed.weights".to_string(), weights);
        if let Some(p) = self.preset {
            m.insert(
                "tessera.embed.preset".to_string(),
                p.info().name.to_string(),
            );
        }
        if !self.compute.is_f32() {
            m.insert(
                "tessera.embed.compute".to_string(),
                self.compute.name().to_string(),
            );
        }
        m
    }
}

impl StageKind for EmbedParams {
    const KIND: &'static str = "embed";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "Embeds tiles with a CNN or ViT on candle (ResNet-18/34/50, DINOv2/timm ViT, or a pathology foundation model by `preset`: uni, uni2_h, virchow, virchow2, h_optimus_0/1, h0_mini, prov_gigapath, phikon, phikon_v2, gpfm, hibou_b/l, midnight, conch_v1_5_trunk)";

    /// The foundation models `preset:` knows, with width, weights and licence.
    fn notes() -> String {
        let mut s = String::from(
            "presets (`preset: NAME`; weights default to hf:REPO, read offline from the Hugging Face cache):\n",
        );
        for p in Preset::ALL {
            let i = p.info();
            s += &format!(
                "  {:<17} {:>4}  {}; {} px ({}); hf:{}; {}\n",
                i.name,
                i.dim(),
                i.about,
                i.input_size,
                i.resize_note(),
                i.hf_repo,
                i.licence
            );
        }
        s
    }

    /// Each tile's embedding does not depend on which tiles share its forward pass.
    fn key_neutral_params() -> &'static [&'static str] {
        &["batch_size"]
    }

    fn input_spec(&self) -> InputSpec {
        let mut cols = tile_key_columns();
        cols.push(Column::exact(PIXELS, DataType::Binary));
        cols.push(Column::exact(PIXELS_SIZE, DataType::Int32));
        InputSpec::Tables(vec![cols])
    }

    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        let input = inputs
            .first()
            .ok_or_else(|| StageError::msg("embed needs one input (the tiles)"))?;
        Ok(embed_output_schema(
            input,
            self.dim(),
            self.half,
            self.provenance(),
        ))
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        if self.weights.trim().is_empty() {
            return Err(ParamIssue::new(
                "weights",
                "required: a .safetensors or .pth file, hf:ORG/NAME (local Hugging Face cache), or `random` (tests and demos only)",
            ));
        }
        if self.batch_size == 0 {
            return Err(ParamIssue::new("batch_size", "must be at least 1"));
        }
        if self.preset.is_some() && self.arch != Architecture::Resnet18 {
            return Err(ParamIssue::new(
                "arch",
                "give either `arch` or `preset`: a preset fixes the architecture",
            ));
        }
        if self.preset.is_none() && self.pooling == Pooling::Mean && self.arch.patch_size() == 1 {
            return Err(ParamIssue::new("pooling", "`mean` is for ViTs"));
        }
        let patch = self.patch_size();
        if self.input_size == 0 || !self.input_size.is_multiple_of(patch) {
            return Err(ParamIssue::new(
                "input_size",
                format!("must be a positive multiple of {patch} for this architecture"),
            ));
        }
        if let Some(i) = self.std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(ParamIssue::new(
                format!("std[{i}]"),
                "must be a positive number",
            ));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return Err(ParamIssue::new("mean", "must be finite numbers"));
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        let device =
            candle_device(&ctx.device).map_err(|e| StageError::other("choosing the device", e))?;
        let embedder = load_embedder(&self.spec(ctx), &device)
            .map_err(|e| StageError::other("loading the model", e))?;
        let random_warning = self.is_random().then(|| {
            let msg = format!(
                "embed uses random weights (seed {}): embeddings carry no trained features; use them for tests and demos only",
                self.seed
            );
            tracing::warn!(stage = %ctx.stage_name, "{msg}");
            msg
        });
        Ok(Box::new(EmbedStage {
            embedder,
            params: self.clone(),
            pending: HashMap::new(),
            random_warning,
        }))
    }

    fn cache_salt(&self, ctx: &BuildContext) -> StageResult<String> {
        let source = WeightsSource::parse(&self.weights, self.seed, |p| ctx.resolve(p));
        let Some(path) = source
            .file()
            .map_err(|e| StageError::other("finding the weights", e))?
        else {
            return Ok(RANDOM_WEIGHTS.to_string());
        };
        tessera_pipeline::cache::file_hash(&path)
            .map_err(|e| StageError::other("hashing the weights file", e))
    }
}

/// The running `embed` stage.
struct EmbedStage {
    embedder: Box<dyn TileEmbedder>,
    params: EmbedParams,
    /// Rows received but not yet embedded, per slide (dataset index).
    pending: HashMap<usize, Vec<RecordBatch>>,
    /// Said once, in run.json, when the weights are random.
    random_warning: Option<String>,
}

impl EmbedStage {
    /// Embeds every full batch waiting for `slide`, and the partial rest when `flush`.
    fn drain(&mut self, ctx: &mut StageContext, slide: &SlideHandle, flush: bool) -> StageResult {
        let Some(waiting) = self.pending.remove(&slide.index) else {
            return Ok(());
        };
        let rows: usize = waiting.iter().map(RecordBatch::num_rows).sum();
        let bs = self.params.batch_size;
        if rows == 0 || (rows < bs && !flush) {
            self.pending.insert(slide.index, waiting);
            return Ok(());
        }
        let all = concat_batches(&waiting[0].schema(), &waiting)?;
        let mut start = 0;
        while rows - start >= bs || (flush && start < rows) {
            let len = bs.min(rows - start);
            let out = embed_batch(self.embedder.as_ref(), &self.params, &all.slice(start, len))
                .map_err(|e| StageError::other("embedding tiles", e))?;
            ctx.emit(slide, out)?;
            ctx.items_done(TILES, len as u64);
            start += len;
        }
        if start < rows {
            self.pending
                .insert(slide.index, vec![all.slice(start, rows - start)]);
        }
        Ok(())
    }
}

impl Stage for EmbedStage {
    fn on_batch(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
        batch: RecordBatch,
    ) -> StageResult {
        if let Some(msg) = self.random_warning.take() {
            ctx.warn(None, msg);
        }
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.pending.entry(slide.index).or_default().push(batch);
        self.drain(ctx, slide, false)
    }

    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        self.drain(ctx, slide, true)?;
        ctx.end_slide(slide)
    }

    fn on_slide_failed(&mut self, _ctx: &mut StageContext, slide: &SlideHandle) {
        self.pending.remove(&slide.index);
    }
}

/// Embeds the tiles of one batch and returns the output rows (tile keys, `embedding`, and
/// the input's other columns but the pixels).
pub fn embed_batch(
    embedder: &dyn TileEmbedder,
    params: &EmbedParams,
    batch: &RecordBatch,
) -> Result<RecordBatch, EmbedError> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| EmbedError::Pixels {
                row: 0,
                message: format!("input lacks column `{name}`"),
            })
    };
    let pixels = column(PIXELS)?
        .as_any()
        .downcast_ref::<BinaryArray>()
        .ok_or_else(|| EmbedError::Pixels {
            row: 0,
            message: format!("column `{PIXELS}` is not Binary"),
        })?;
    let sizes = column(PIXELS_SIZE)?
        .as_any()
        .downcast_ref::<Int32Array>()
        .ok_or_else(|| EmbedError::Pixels {
            row: 0,
            message: format!("column `{PIXELS_SIZE}` is not Int32"),
        })?;
    let coord = |name: &str| {
        column(name)
            .ok()
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned())
    };
    let (xs, ys) = (coord(X), coord(Y));
    let at = |row: usize| match (&xs, &ys) {
        (Some(x), Some(y)) => format!("tile at (x={}, y={})", x.value(row), y.value(row)),
        _ => format!("row {row}"),
    };
    let mut images = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        if pixels.is_null(row) || sizes.is_null(row) || sizes.value(row) <= 0 {
            return Err(EmbedError::Pixels {
                row,
                message: format!("{}: no pixels or no pixels_size", at(row)),
            });
        }
        images.push((pixels.value(row), sizes.value(row) as usize));
    }
    let embeddings = embedder.embed_sized(&images).map_err(|e| match e {
        EmbedError::Pixels { row, message } => EmbedError::Pixels {
            row,
            message: format!("{}: {message}", at(row)),
        },
        other => other,
    })?;
    let dim = embedder.dim();
    let values = embeddings
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let embedding = embedding_column(values, dim, params.half)?;
    let schema = embed_output_schema(&batch.schema(), dim, params.half, params.provenance());
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            if f.name() == tessera_pipeline::schema::EMBEDDING {
                Ok(embedding.clone())
            } else {
                batch
                    .column_by_name(f.name())
                    .cloned()
                    .ok_or_else(|| EmbedError::Pixels {
                        row: 0,
                        message: format!("input lacks column `{}`", f.name()),
                    })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema, columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache key is made from the serialised parameters: f32 (the default) must leave
    /// them as they were before `compute` existed, half precision must change them.
    #[test]
    fn compute_enters_the_key_only_when_not_f32() {
        let f32_params = serde_json::to_value(EmbedParams::default()).expect("json");
        assert!(f32_params.get("compute").is_none(), "{f32_params}");
        let f16_params = serde_json::to_value(EmbedParams {
            compute: ComputeDtype::F16,
            ..Default::default()
        })
        .expect("json");
        assert_eq!(f16_params["compute"], "f16");
        let parsed: EmbedParams =
            serde_json::from_value(serde_json::json!({"compute": "bf16"})).expect("parse");
        assert_eq!(parsed.compute, ComputeDtype::Bf16);
    }
}
