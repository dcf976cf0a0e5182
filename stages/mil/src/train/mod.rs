//! The `train` stage: SparseConvMIL or a MIL baseline trained on the bags that `sample` (+
//! `sparse_map`, `augment`) emits every epoch. At each `EndOfEpoch` it trains one epoch on
//! the epoch's train bags, validates on its val bags, writes `checkpoints/{last,best}` and
//! `train_log.json` into the run's output folder, and closes its inputs when the last epoch is
//! done (or early stopping triggers). It then emits one prediction per val/test slide from the
//! best model, for `evaluate`.
//!
//! Fed by a stage that sends each slide once without epoch markers (e.g. features straight
//! into `sparse_map`), it trains every epoch on those same bags.

pub mod checkpoint;
pub mod epoch_bags;
#[path = "loop.rs"]
pub mod epochs;
pub mod error;
pub mod finetune;
pub mod input;
pub mod objective;
pub mod optim;
pub mod outcomes;
pub mod record;
pub mod schedule;
pub mod synthetic;
pub mod tasks;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use candle_core::Device;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tessera_pipeline::{
    check_running, BuildContext, Column, InputSpec, ParamIssue, SlideHandle, Stage, StageContext,
    StageError, StageKind, StageResult,
};

use crate::columns::{require_instances, InstanceColumn};
use crate::models::{
    Bag, ClamDsmilOptions, GlobalPool, ModelConfig, Pooling, Split, Standardization,
};
use crate::placement::Placement;
use crate::predictions::{predictions_schema, to_batch, Prediction};
use crate::sample::{LABEL, SPLIT};
use crate::sparse_map::{MAP_I, MAP_J};
use epoch_bags::EpochBags;
use epochs::{write_log, TrainConfig, Trainer};
use error::TrainError;
use finetune::{EmbedderConfig, EmbedderSetup};
use input::BagRows;
use objective::{Objective, ObjectiveConfig, RegressionLoss, SurvivalLoss};
use optim::AdamConfig;
use record::Monitor;
use schedule::LrSchedule;
use tessera_embed::embed::RANDOM_WEIGHTS;
use tessera_embed::{Architecture, WeightsSource, IMAGENET_MEAN, IMAGENET_STD};
use tessera_pipeline::schema::SLIDE_ID;
use tessera_pipeline::{SlideTarget, Task};

/// Parameters of the `train` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    /// The model: `sparseconvmil` (needs `map_i`, `map_j` from a `sparse_map` stage),
    /// instance-level `instance_max` / `instance_mean` / `instance_lse`, embedding-level
    /// `max` / `mean` / `lse`, `attention` or `gated_attention` (Ilse et al. 2018), `abmil`
    /// (gated attention as CLAM/TRIDENT configure it), `clam_sb` / `clam_mb` (CLAM with
    /// instance-level clustering, Lu et al. 2021), `dsmil` (Li et al. 2021), `transmil` (Shao
    /// et al. 2021) or `transmil_map` (TransMIL with its position encoding on the sparse map;
    /// needs `map_i`, `map_j`).
    pub pooling: Pooling,
    /// sparseconvmil: output channels of each 2D submanifold convolution (with bias, each
    /// followed by ReLU). The original uses two layers of 32 or 128.
    pub sparse_channels: Vec<usize>,
    /// sparseconvmil: kernel side of the submanifold convolutions (odd).
    pub sparse_kernel: usize,
    /// sparseconvmil: batch-norm over active sites after each convolution (off, as in the
    /// original code: the study found it lifts SparseConvMIL on presence-type labels but
    /// blurs its Grad-CAM heatmaps, which then also credit background tiles).
    pub sparse_batch_norm: bool,
    /// sparseconvmil: global pooling of the sparse map, `avg` (original) or `max`.
    pub sparse_pool: GlobalPool,
    /// attention / gated_attention: hidden units of the attention network (128, 512, 2048).
    pub attention_hidden: usize,
    /// abmil / clam_sb / clam_mb: hidden units of the gated attention network (CLAM's
    /// "small" size, 256). For CLAM's exact sizes also set `instance_encoder: [512]`,
    /// `encoder_dropout: 0.25` (CLAM's `fc`) and `head_hidden: 0` (its linear classifier).
    pub abmil_hidden: usize,
    /// abmil / clam_sb / clam_mb: dropout in the attention branches while training (0.25).
    pub abmil_dropout: f32,
    /// clam_sb / clam_mb: instances pseudo-labelled on each side by the instance-level
    /// clustering (CLAM's `k_sample`, 8; fewer when a bag is smaller).
    pub clam_k: usize,
    /// clam_sb / clam_mb: weight of the bag loss; the instance-clustering loss gets
    /// `1 - clam_bag_weight` (CLAM: 0.7). Clustering needs class labels: with other tasks
    /// only the bag loss trains.
    pub clam_bag_weight: f64,
    /// clam_sb / clam_mb: CLAM's `subtyping` — the other classes' instance classifiers also
    /// learn their branch's most attended instances as negatives (for mutually exclusive
    /// subtypes), the loss averaged over classes.
    pub clam_subtyping: bool,
    /// dsmil: units of the query network that measures distances to the critical instance.
    pub dsmil_query: usize,
    /// instance_lse / lse: sharpness r of `(1/r) log mean exp(r x)`.
    pub lse_r: f64,
    /// Hidden units of the classifier head shared by every model (0: one linear layer).
    /// The original SparseConvMIL head has 32. DSMIL keeps its own linear bag classifier
    /// (its per-class representation is already C x D wide).
    pub head_hidden: usize,
    /// Widths of the instance encoder every model shares (per layer Linear + ReLU, then
    /// `encoder_dropout`), applied to each instance before the pooling (for sparseconvmil
    /// before its first sparse convolution), so frozen embeddings reach every pooling through
    /// the same trainable transform. `[]`: the paper's raw setting (pooling sees the
    /// embeddings themselves, which handicaps max / mean / LSE).
    pub instance_encoder: Vec<usize>,
    /// Dropout after each instance-encoder layer while training.
    pub encoder_dropout: f32,
    /// Standardise every input dimension with the mean and standard deviation of the
    /// **training** slides' instances (computed from the first epoch's training bags, stored
    /// in the checkpoint, applied to validation, test and heatmaps). Ignored with
    /// `finetune_embedder` (the embedder's output changes while training).
    pub standardize: bool,
    /// Dropout before the head while training (0 disables; dropout is not seeded).
    pub dropout: f32,
    /// Number of epochs (a resumed run continues up to this total).
    pub epochs: usize,
    /// Peak Adam learning rate (reached after the warm-up).
    pub lr: f64,
    /// Learning-rate shape after the warm-up: `cosine` (down to 1% of `lr` at the last step)
    /// or `constant`; evaluated per step.
    pub lr_schedule: LrSchedule,
    /// Epochs of linear learning-rate warm-up (at most a quarter of `epochs`: shorter runs
    /// warm up less).
    pub warmup_epochs: usize,
    /// Clip the global gradient norm of each step to this value (0 disables).
    pub grad_clip: f64,
    /// L2 weight decay added to the gradients (torch.optim.Adam semantics, not AdamW's
    /// decoupled decay).
    pub weight_decay: f64,
    /// Bags per optimizer step (the original uses 2).
    pub batch_size: usize,
    /// Weight the cross-entropy by inverse class frequency of the training slides
    /// (classification only).
    pub class_weighted: bool,
    /// What selects the best checkpoint and drives early stopping: `auto` (default: the
    /// task's own, `val_c_index` for survival, `val_loss` otherwise), `val_loss` (every
    /// task), `val_auc` or `val_balanced_accuracy` (classification), `val_c_index` (survival:
    /// Harrell's C-index of the validation slides).
    pub monitor: Monitor,
    /// `task: survival`: `cox` (default), the Cox partial likelihood with Breslow ties on
    /// one output, risk sets within each batch of `batch_size` slides (a larger batch
    /// approximates the cohort's likelihood better), or `nll`, the discrete-time negative
    /// log-likelihood over `survival_bins` bins at the quantiles of the uncensored training
    /// times (Zadeh & Schmid 2021, as Patch-GCN / PORPOISE; the model has `survival_bins`
    /// outputs, risk = -sum of the survival curve). The default is the one that let every
    /// model rank the non-spatial survival cohorts of docs/defaults-study.md; with `nll`
    /// the attention models overfit it and stayed near chance.
    pub survival_loss: SurvivalLoss,
    /// `task: survival`, `nll`: number of discrete time bins (Patch-GCN: 4).
    pub survival_bins: usize,
    /// `task: survival`, `nll`: extra weight of the uncensored slides' term,
    /// `(1 - alpha) * nll + alpha * uncensored` (Patch-GCN's `alpha_surv`; 0 = the plain NLL).
    pub survival_alpha: f64,
    /// `task: regression`: `mse` or `huber`, on the target standardised by the training
    /// slides' mean and standard deviation (predictions are mapped back to its unit).
    pub regression_loss: RegressionLoss,
    /// `task: regression`, `huber`: where the loss turns linear, in standard deviations of
    /// the training target.
    pub huber_delta: f64,
    /// Stop after this many epochs without improvement of `monitor` (0: never stop early).
    pub patience: usize,
    /// Continue training from a checkpoint (`.../checkpoints/last.safetensors`, its `.json`,
    /// or the `checkpoints` folder): weights, optimizer state and epoch counter are restored
    /// and training runs from the saved epoch + 1 up to `epochs`. Relative to the experiment
    /// file.
    pub resume: Option<PathBuf>,
    /// End-to-end training, the paper's own setting: the bags carry tile pixels (`tile ->
    /// sample -> sparse_map (collision: first) -> augment -> train`, no `embed` stage) and a
    /// trainable ResNet embeds them in every step, back-propagating through the sparse map
    /// into the CNN (batch-norm in training mode; its running statistics are saved and used
    /// for validation and predictions). Practical on GPU; on CPU only for tiny runs.
    pub finetune_embedder: bool,
    /// finetune_embedder: the network (resnet18, resnet34 or resnet50; torchvision names).
    pub embedder: Architecture,
    /// finetune_embedder: its initial parameters, a `.safetensors` or `.pth` file with
    /// torchvision names (relative to the experiment file), or `random` (seeded by the
    /// experiment's seed).
    pub embedder_weights: String,
    /// finetune_embedder: prefix of the parameter names inside the weights file (`module.`).
    pub embedder_weights_prefix: String,
    /// finetune_embedder: side of the images the network sees (tiles of another size are
    /// resized); ImageNet mean/std normalisation.
    pub embedder_input_size: usize,
    /// MiB of an epoch's bag embeddings kept in memory; the rest go to an unlinked spill
    /// file under `spill_dir` that the kernel pages in as batches are built (the bags read
    /// back bit for bit: results do not change). Bounds `train`'s memory on large cohorts,
    /// where each epoch's bags are `tiles_per_slide / tiles` of all embeddings.
    pub bag_memory_mb: usize,
    /// Folder of that spill file (relative to the experiment); default `OUT/.spill`. Put it
    /// on a local disk.
    pub spill_dir: Option<PathBuf>,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            pooling: Pooling::Sparseconvmil,
            sparse_channels: vec![32, 32],
            sparse_kernel: 3,
            sparse_batch_norm: false,
            sparse_pool: GlobalPool::Avg,
            attention_hidden: 128,
            abmil_hidden: DEFAULT_CLAM_DSMIL.abmil_hidden,
            abmil_dropout: DEFAULT_CLAM_DSMIL.abmil_dropout,
            clam_k: DEFAULT_CLAM_DSMIL.clam_k,
            clam_bag_weight: DEFAULT_CLAM_DSMIL.clam_bag_weight,
            clam_subtyping: DEFAULT_CLAM_DSMIL.clam_subtyping,
            dsmil_query: DEFAULT_CLAM_DSMIL.dsmil_query,
            lse_r: 1.0,
            head_hidden: 32,
            instance_encoder: vec![DEFAULT_ENCODER_WIDTH],
            encoder_dropout: 0.0,
            standardize: true,
            dropout: 0.0,
            epochs: DEFAULT_EPOCHS,
            lr: DEFAULT_LR,
            lr_schedule: LrSchedule::Cosine,
            warmup_epochs: DEFAULT_WARMUP_EPOCHS,
            grad_clip: DEFAULT_GRAD_CLIP,
            weight_decay: DEFAULT_WEIGHT_DECAY,
            batch_size: 2,
            class_weighted: false,
            monitor: Monitor::Auto,
            survival_loss: SurvivalLoss::Cox,
            survival_bins: 4,
            survival_alpha: 0.0,
            regression_loss: RegressionLoss::Mse,
            huber_delta: 1.0,
            patience: 0,
            resume: None,
            finetune_embedder: false,
            embedder: Architecture::Resnet18,
            embedder_weights: String::new(),
            embedder_weights_prefix: String::new(),
            embedder_input_size: 224,
            bag_memory_mb: DEFAULT_BAG_MEMORY_MB,
            spill_dir: None,
        }
    }
}

/// Enough for the bags of a few hundred slides at K = 100 and 512-d (`bag_memory_mb`), and
/// small next to the embeddings that `sample` holds for a cohort of thousands.
pub const DEFAULT_BAG_MEMORY_MB: usize = 64;

/// Defaults of the optimisation, chosen by the study in docs/defaults-study.md (several
/// synthetic data sets, spatial and not, 2 to many classes, small and large bags, every
/// pooling model), not on the shipped example.
pub const DEFAULT_LR: f64 = 1e-3;
pub const DEFAULT_WEIGHT_DECAY: f64 = 1e-4;
pub const DEFAULT_EPOCHS: usize = 40;
pub const DEFAULT_WARMUP_EPOCHS: usize = 2;
pub const DEFAULT_GRAD_CLIP: f64 = 1.0;
pub const DEFAULT_ENCODER_WIDTH: usize = 128;
/// ABMIL / CLAM / DSMIL settings as their authors configure them.
const DEFAULT_CLAM_DSMIL: ClamDsmilOptions = ClamDsmilOptions::DEFAULT;

impl TrainParams {
    /// The defaults with `sets` applied by their YAML names (through serde, so names and types
    /// are checked as in an experiment file) and `pooling` chosen: how the defaults studies
    /// (`defaults_study`, `outcome_study` examples) state the configuration they try.
    pub fn with_overrides(
        sets: &[(String, serde_json::Value)],
        pooling: Pooling,
    ) -> Result<TrainParams, String> {
        let mut v = serde_json::to_value(TrainParams::default()).map_err(|e| e.to_string())?;
        if let serde_json::Value::Object(map) = &mut v {
            for (k, val) in sets {
                map.insert(k.clone(), val.clone());
            }
            map.insert(
                "pooling".into(),
                serde_json::Value::String(pooling.name().into()),
            );
        }
        serde_json::from_value(v).map_err(|e| format!("--set: {e}"))
    }

    /// The architecture for embeddings of width `input_dim` and `n_classes` classes, with the
    /// training slides' statistics when the inputs are standardised.
    pub fn model_config(
        &self,
        input_dim: usize,
        n_classes: usize,
        standardize: Option<Standardization>,
    ) -> ModelConfig {
        ModelConfig {
            pooling: self.pooling,
            input_dim,
            n_classes,
            head_hidden: self.head_hidden,
            dropout: self.dropout,
            sparse_channels: self.sparse_channels.clone(),
            sparse_kernel: self.sparse_kernel,
            sparse_batch_norm: self.sparse_batch_norm,
            sparse_pool: self.sparse_pool,
            attention_hidden: self.attention_hidden,
            lse_r: self.lse_r,
            instance_encoder: self.instance_encoder.clone(),
            encoder_dropout: self.encoder_dropout,
            standardize,
            clam_dsmil: ClamDsmilOptions {
                abmil_hidden: self.abmil_hidden,
                abmil_dropout: self.abmil_dropout,
                clam_k: self.clam_k,
                clam_bag_weight: self.clam_bag_weight,
                clam_subtyping: self.clam_subtyping,
                dsmil_query: self.dsmil_query,
            },
        }
    }

    /// The task settings of these parameters.
    pub fn objective_config(&self) -> ObjectiveConfig {
        ObjectiveConfig {
            survival_loss: self.survival_loss,
            survival_bins: self.survival_bins,
            survival_alpha: self.survival_alpha,
            regression_loss: self.regression_loss,
            huber_delta: self.huber_delta,
        }
    }

    /// Checks the parameters that depend on the experiment's task.
    pub fn check_task(&self, task: Task) -> Result<(), String> {
        let classification_only = |what: &str| {
            format!("{what} is for `task: classification`; this experiment's task is {task}")
        };
        match (task, self.monitor) {
            (Task::Classification, Monitor::ValCIndex) => {
                return Err("`monitor: val_c_index` is for `task: survival`".into())
            }
            (Task::Survival | Task::Regression, Monitor::ValAuc) => {
                return Err(classification_only("`monitor: val_auc`"))
            }
            (Task::Survival | Task::Regression, Monitor::ValBalancedAccuracy) => {
                return Err(classification_only("`monitor: val_balanced_accuracy`"))
            }
            (Task::Regression, Monitor::ValCIndex) => {
                return Err("`monitor: val_c_index` is for `task: survival`".into())
            }
            _ => {}
        }
        if self.class_weighted && task != Task::Classification {
            return Err(classification_only("`class_weighted`"));
        }
        Ok(())
    }

    /// Whether this run standardises its inputs (never on pixels).
    pub fn standardizes(&self) -> bool {
        self.standardize && !self.finetune_embedder
    }

    /// The fine-tuned embedder's architecture and input, in end-to-end training.
    pub fn embedder_config(&self) -> Option<EmbedderConfig> {
        self.finetune_embedder.then_some(EmbedderConfig {
            arch: self.embedder,
            input_size: self.embedder_input_size,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        })
    }

    /// Checks the input's instances against `finetune_embedder`: pixels need it, embeddings
    /// exclude it.
    fn check_instances(&self, input: &Schema) -> StageResult<()> {
        match (require_instances(input, "train")?, self.finetune_embedder) {
            (InstanceColumn::Embedding, true) => Err(StageError::msg(
                "finetune_embedder: true needs tile pixels, but the input carries embeddings: \
                 feed `sample` straight from the `tile` stage (tile -> sample -> sparse_map -> \
                 augment -> train), without an `embed` stage",
            )),
            (InstanceColumn::Pixels, false) => Err(StageError::msg(
                "the input carries tile pixels, not embeddings: set `finetune_embedder: true` \
                 to train a ResNet end to end on them, or put an `embed` stage between `tile` \
                 and `sample`",
            )),
            _ => Ok(()),
        }
    }

    /// The optimisation settings, seeded by the experiment's seed.
    pub fn train_config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            optimizer: AdamConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                ..AdamConfig::default()
            },
            class_weighted: self.class_weighted,
            monitor: self.monitor,
            patience: self.patience,
            seed,
            schedule: self.lr_schedule,
            warmup_epochs: self.warmup_epochs,
            grad_clip: self.grad_clip,
        }
    }
}

impl StageKind for TrainParams {
    const KIND: &'static str = "train";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "Trains SparseConvMIL or a MIL baseline (max/mean/LSE, attention, ABMIL, CLAM, DSMIL, TransMIL) on per-epoch bags; writes checkpoints and train_log.json, emits val/test predictions";

    fn input_spec(&self) -> InputSpec {
        // The instances (embeddings, or pixels with finetune_embedder) are checked by
        // `output_schema`.
        let mut columns = vec![
            Column::exact(SLIDE_ID, DataType::Utf8),
            Column::exact(SPLIT, DataType::Utf8),
            Column::exact(LABEL, DataType::Utf8),
        ];
        if self.pooling.is_spatial() {
            columns.push(Column::exact(MAP_I, DataType::Int64));
            columns.push(Column::exact(MAP_J, DataType::Int64));
        }
        InputSpec::Tables(vec![columns])
    }

    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        if let Some(input) = inputs.first() {
            self.check_instances(input)?;
        }
        Ok(predictions_schema())
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        let positive = |field: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(ParamIssue::new(field, "must be positive"))
            }
        };
        positive("epochs", self.epochs > 0)?;
        positive("batch_size", self.batch_size > 0)?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(ParamIssue::new("lr", "must be a positive number"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(ParamIssue::new("weight_decay", "must be zero or positive"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ParamIssue::new("dropout", "must lie in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.encoder_dropout) {
            return Err(ParamIssue::new("encoder_dropout", "must lie in [0, 1)"));
        }
        if let Some(n) = self.instance_encoder.iter().position(|&w| w == 0) {
            return Err(ParamIssue::new(
                "instance_encoder",
                format!(
                    "layer {n} has width 0: give each layer a positive width (e.g. [128]), or [] for no encoder"
                ),
            ));
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return Err(ParamIssue::new(
                "grad_clip",
                "must be zero (no clipping) or a positive norm",
            ));
        }

        if !(0.0..1.0).contains(&self.abmil_dropout) {
            return Err(ParamIssue::new("abmil_dropout", "must lie in [0, 1)"));
        }
        positive("abmil_hidden", self.abmil_hidden > 0)?;
        positive("clam_k", self.clam_k > 0)?;
        positive("dsmil_query", self.dsmil_query > 0)?;
        if !(self.clam_bag_weight.is_finite() && (0.0..=1.0).contains(&self.clam_bag_weight)) {
            return Err(ParamIssue::new("clam_bag_weight", "must lie in [0, 1]"));
        }
        if !(self.lse_r.is_finite() && self.lse_r > 0.0) {
            return Err(ParamIssue::new("lse_r", "must be a positive number"));
        }
        positive("attention_hidden", self.attention_hidden > 0)?;
        if self.survival_bins < 2 {
            return Err(ParamIssue::new(
                "survival_bins",
                "needs at least 2 time bins",
            ));
        }
        if !(0.0..=1.0).contains(&self.survival_alpha) {
            return Err(ParamIssue::new("survival_alpha", "must lie in [0, 1]"));
        }
        if !(self.huber_delta.is_finite() && self.huber_delta > 0.0) {
            return Err(ParamIssue::new("huber_delta", "must be a positive number"));
        }
        if self.finetune_embedder {
            if finetune::resnet_depth(self.embedder).is_none() {
                return Err(ParamIssue::new(
                    "embedder",
                    "only resnet18, resnet34 and resnet50 can be fine-tuned",
                ));
            }
            if self.embedder_weights.trim().is_empty() {
                return Err(ParamIssue::new(
                    "embedder_weights",
                    "required with finetune_embedder: a .safetensors or .pth file with torchvision names, or `random`",
                ));
            }
            positive("embedder_input_size", self.embedder_input_size > 0)?;
        } else if !self.embedder_weights.is_empty() {
            return Err(ParamIssue::new(
                "embedder_weights",
                "is only used with `finetune_embedder: true`",
            ));
        }
        if self.pooling == Pooling::Sparseconvmil {
            if self.sparse_channels.is_empty() || self.sparse_channels.contains(&0) {
                return Err(ParamIssue::new(
                    "sparse_channels",
                    "needs at least one layer, each with a positive channel count",
                ));
            }
            if self.sparse_kernel.is_multiple_of(2) {
                return Err(ParamIssue::new(
                    "sparse_kernel",
                    "submanifold kernels must be odd (3 is usual)",
                ));
            }
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        let device = tessera_embed::candle_device(&ctx.device)
            .map_err(|e| StageError::other("choosing the device", e))?;
        self.check_task(ctx.task).map_err(StageError::msg)?;
        let classes = crate::splits::task_classes(ctx.task, &ctx.slides);
        if ctx.task == Task::Classification && classes.len() < 2 {
            return Err(StageError::msg(format!(
                "training needs at least two classes in the dataset's `label` column, found {classes:?}"
            )));
        }
        let targets: HashMap<String, SlideTarget> = ctx
            .slides
            .iter()
            .filter_map(|s| tessera_pipeline::slide_target(ctx.task, s).map(|t| (s.id.clone(), t)))
            .collect();
        let embedder = self.embedder_config().map(|config| EmbedderSetup {
            config,
            weights: if self.embedder_weights == RANDOM_WEIGHTS {
                WeightsSource::Random { seed: ctx.seed }
            } else {
                WeightsSource::File(ctx.resolve(&self.embedder_weights))
            },
            weights_prefix: self.embedder_weights_prefix.clone(),
        });
        Ok(Box::new(TrainStage {
            params: self.clone(),
            embedder,
            resume: self.resume.as_ref().map(|p| ctx.resolve(p)),
            classes,
            task: ctx.task,
            targets,
            device,
            trainer: None,
            rows: HashMap::new(),
            epoch_bags: EpochBags::new(
                self.bag_memory_mb.saturating_mul(1 << 20),
                crate::spill::spill_folder(ctx, self.spill_dir.as_deref()),
            ),
            last_bags: Vec::new(),
            seen: BTreeMap::new(),
            epochs_received: 0,
            placement: None,
        }))
    }

    fn parallel(&self) -> bool {
        false
    }

    /// Stops the epochs upstream once its own epoch limit or early stopping is reached.
    fn closes_inputs(&self) -> bool {
        true
    }

    fn cacheable(&self) -> bool {
        false
    }

    fn key_neutral_params() -> &'static [&'static str] {
        &["bag_memory_mb", "spill_dir"]
    }
}

/// The alert for held-out predictions that are all one class although their labels are not
/// (a model that ignores its input), `None` otherwise.
fn one_class_predictions(bags: &[&Bag], probs: &[Vec<f32>], classes: &[String]) -> Option<String> {
    let predicted: std::collections::BTreeSet<usize> =
        probs.iter().map(|p| epochs::argmax(p)).collect();
    let labels: std::collections::BTreeSet<usize> = bags.iter().map(|b| b.label_index).collect();
    if bags.len() < 2 || predicted.len() != 1 || labels.len() < 2 {
        return None;
    }
    let only = predicted.first().and_then(|&c| classes.get(c))?;
    Some(format!(
        "training collapsed: every one of the {} validation/test slides is predicted `{only}` although they hold {} classes; the model ignores its input. Likely causes: a learning rate too high or too low, unscaled inputs (`standardize: true`), too few epochs, or a strong class imbalance (`class_weighted: true`)",
        bags.len(),
        labels.len()
    ))
}

/// A survival or regression prediction's columns from the model's outputs.
fn task_values(
    objective: &Objective,
    slide: &str,
    outputs: &[f32],
) -> crate::predictions::TaskValues {
    let score = objective.score(outputs);
    match objective {
        Objective::Survival { .. } => {
            let (time, event) = objective.survival_target(slide).unzip();
            crate::predictions::TaskValues {
                time,
                event,
                risk: score,
                ..Default::default()
            }
        }
        _ => crate::predictions::TaskValues {
            target: objective.regression_target(slide),
            predicted_value: score,
            ..Default::default()
        },
    }
}

/// The running stage.
struct TrainStage {
    params: TrainParams,
    /// The trainable embedder of end-to-end training.
    embedder: Option<EmbedderSetup>,
    resume: Option<PathBuf>,
    classes: Vec<String>,
    /// The experiment's task, and every slide's survival / regression target by id.
    task: Task,
    targets: HashMap<String, SlideTarget>,
    device: Device,
    /// Created with the first bag (its embedding width fixes the model).
    trainer: Option<Trainer>,
    /// Rows of slides still arriving, by dataset index.
    rows: HashMap<usize, BagRows>,
    /// Bags completed in the current epoch (in memory up to `bag_memory_mb`, then spilled).
    epoch_bags: EpochBags,
    /// The bags of the last epoch trained on (for predictions and for upstreams that stop),
    /// until the next epoch's first bag arrives.
    last_bags: Vec<Bag>,
    /// Every slide received, to end each exactly once.
    seen: BTreeMap<usize, SlideHandle>,
    epochs_received: u64,
    /// Where the upstream `sparse_map` placed the tiles (from the bags' schema metadata),
    /// stored in the checkpoints of spatial models for the heatmap.
    placement: Option<Placement>,
}

impl TrainStage {
    fn trainer(
        &mut self,
        ctx: &StageContext,
        dim: usize,
        bags: &[Bag],
    ) -> Result<&mut Trainer, TrainError> {
        if self.trainer.is_none() {
            let standardize = self.standardization(ctx, bags)?;
            let objective_config = self.params.objective_config();
            let train_ids: Vec<&str> = bags
                .iter()
                .filter(|b| b.split == Split::Train)
                .map(|b| b.slide_id.as_str())
                .collect();
            let objective = Objective::fit(self.task, &objective_config, &self.targets, &train_ids)
                .map_err(|e| TrainError::Slide {
                    slide: "(training slides)".into(),
                    message: e.to_string(),
                })?;
            if let Objective::Survival {
                cuts,
                loss: SurvivalLoss::Nll,
                ..
            } = &objective
            {
                ctx.set_detail("survival_bin_edges", serde_json::json!(cuts));
            }
            let width = Objective::width(self.task, &objective_config, self.classes.len());
            let model = self.params.model_config(dim, width, standardize);
            let config = self.params.train_config(ctx.seed());
            // The trainer names the model's outputs (classification: the classes).
            let classes = Objective::output_names(self.task, &objective_config, &self.classes);
            let trainer = match &self.embedder {
                None => Trainer::new(model, config, classes, self.device.clone())?,
                Some(setup) => {
                    Trainer::new_finetuning(model, config, classes, self.device.clone(), setup)?
                }
            };
            let placement = self.placement.filter(|_| self.params.pooling.is_spatial());
            let mut trainer = trainer
                .with_objective(objective)
                .with_placement(placement)
                .with_checkpoints(ctx.out_dir().join("checkpoints"));
            if let Some(path) = &self.resume {
                let meta = trainer.resume(path)?;
                tracing::info!(stage = ctx.stage_name(), checkpoint = %path.display(), epoch = meta.epoch + 1, "resuming training at epoch {}", meta.epoch + 1);
            }
            let parameters = trainer.parameters();
            ctx.set_detail(
                "parameters",
                serde_json::to_value(parameters).unwrap_or_default(),
            );
            tracing::info!(
                stage = ctx.stage_name(),
                "{}: {} parameters (encoder {}, pooling {}, head {}{})",
                self.params.pooling.name(),
                parameters.total,
                parameters.encoder,
                parameters.pooling,
                parameters.head,
                if parameters.embedder > 0 {
                    format!(", embedder {}", parameters.embedder)
                } else {
                    String::new()
                }
            );
            self.trainer = Some(trainer);
        }
        self.trainer
            .as_mut()
            .ok_or_else(|| TrainError::NoTrainingBags(0))
    }

    /// The statistics inputs are standardised with: a resumed run keeps its checkpoint's,
    /// a new one fits them on the training bags of its first epoch (never on val/test).
    fn standardization(
        &self,
        ctx: &StageContext,
        bags: &[Bag],
    ) -> Result<Option<Standardization>, TrainError> {
        if !self.params.standardizes() {
            return Ok(None);
        }
        if let Some(path) = &self.resume {
            let files = checkpoint::CheckpointFiles::locate(path)?;
            return Ok(checkpoint::read_meta(&files)?.model.standardize);
        }
        let Some(fitted) = Standardization::fit(bags) else {
            return Err(TrainError::NoTrainingBags(0));
        };
        if !fitted.constant_dims.is_empty() {
            let shown: Vec<String> = fitted
                .constant_dims
                .iter()
                .take(8)
                .map(|d| d.to_string())
                .collect();
            ctx.warn(
                None,
                format!(
                    "standardize: {} of {} embedding dimensions are constant over the {} training instances (dimension {}{}); they are centred, not scaled, and carry no information",
                    fitted.constant_dims.len(),
                    fitted.stats.dim(),
                    fitted.instances,
                    shown.join(", "),
                    if fitted.constant_dims.len() > shown.len() { ", ..." } else { "" }
                ),
            );
        }
        Ok(Some(fitted.stats))
    }

    /// Trains one epoch on `bags` unless training is already over.
    fn train_on(&mut self, ctx: &mut StageContext, bags: &[Bag]) -> StageResult {
        let Some(first) = bags.first() else {
            return Ok(());
        };
        let dim = match &self.embedder {
            Some(setup) => setup.config.arch.dim(tessera_embed::VitPooling::Cls),
            None => first.dim,
        };
        let stage = ctx.stage_name().to_string();
        let epochs = self.params.epochs;
        let trainer = self.trainer(ctx, dim, bags)?;
        if trainer.is_done() {
            return Ok(());
        }
        let outcome = trainer.run_epoch(bags)?;
        let r = &outcome.record;
        let fmt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        tracing::info!(
            stage = %stage,
            epoch = r.epoch,
            train_loss = r.train_loss,
            val_loss = ?r.val_loss,
            val_auc = ?r.val_auc,
            seconds = r.seconds,
            best = r.best,
            "epoch {}/{epochs}",
            r.epoch + 1
        );
        ctx.set_progress_message(format!(
            "epoch {}/{epochs} loss {:.4} val loss {} auc {} ({:.1}s)",
            r.epoch + 1,
            r.train_loss,
            fmt(r.val_loss),
            fmt(r.val_auc),
            r.seconds
        ));
        if r.val_bags == 0 && r.epoch == 0 {
            ctx.warn(
                None,
                "no validation slides: the last epoch's model is used, and early stopping is off",
            );
        }
        let log = trainer.log(&stage);
        write_log(&ctx.out_dir().join("train_log.json"), &log)?;
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.trainer.as_ref().is_some_and(Trainer::is_done)
    }
}

impl Stage for TrainStage {
    fn on_batch(
        &mut self,
        _ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
        batch: RecordBatch,
    ) -> StageResult {
        self.seen
            .entry(slide.index)
            .or_insert_with(|| slide.clone());
        if self.placement.is_none() {
            self.placement = Placement::from_schema(&batch.schema())?;
        }
        let spatial = self.params.pooling.is_spatial();
        self.rows
            .entry(slide.index)
            .or_default()
            .append(&slide.id, &batch, spatial)?;
        Ok(())
    }

    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        self.seen
            .entry(slide.index)
            .or_insert_with(|| slide.clone());
        let rows = self.rows.remove(&slide.index).unwrap_or_default();
        match rows.into_bag(&slide.id, &self.classes)? {
            Some(bag) => {
                if self.epoch_bags.is_empty() {
                    // A new epoch has begun: from here on `finish` uses its bags, never the
                    // last epoch's, so holding both would only double the memory.
                    self.last_bags = Vec::new();
                }
                self.epoch_bags.push(bag)?
            }
            None => ctx.warn(
                Some(slide),
                "no instances reached training; the slide is left out",
            ),
        }
        Ok(())
    }

    fn on_slide_failed(&mut self, _ctx: &mut StageContext, slide: &SlideHandle) {
        self.rows.remove(&slide.index);
    }

    fn on_epoch_end(&mut self, ctx: &mut StageContext, _epoch: u64) -> StageResult {
        self.epochs_received += 1;
        let next = self.epoch_bags.next_epoch();
        let bags = std::mem::replace(&mut self.epoch_bags, next).seal()?;
        if bags.is_empty() {
            ctx.warn(
                None,
                format!(
                    "upstream epoch {} brought no bags",
                    self.epochs_received - 1
                ),
            );
            return Ok(());
        }
        self.train_on(ctx, &bags)?;
        self.last_bags = bags;
        if self.is_done() {
            ctx.close_inputs();
        }
        Ok(())
    }

    fn finish(&mut self, ctx: &mut StageContext) -> StageResult {
        if !self.epoch_bags.is_empty() {
            // Rows after the last epoch marker: an upstream that sends each slide once.
            let next = self.epoch_bags.next_epoch();
            self.last_bags = std::mem::replace(&mut self.epoch_bags, next).seal()?;
            if self.epochs_received > 0 && !self.is_done() {
                ctx.warn(
                    None,
                    "upstream ended mid-epoch; training continues on the last bags received",
                );
            }
        } else if self.epochs_received > 0 && !self.is_done() && !self.last_bags.is_empty() {
            ctx.warn(None, "upstream stopped sending epochs before `epochs` was reached; training continues on the last epoch's bags");
        }
        let bags = std::mem::take(&mut self.last_bags);
        while !bags.is_empty() && !self.is_done() {
            check_running(ctx)?;
            self.train_on(ctx, &bags)?;
        }
        let stage = ctx.stage_name().to_string();
        if let Some(trainer) = self.trainer.as_mut() {
            if let Some(epoch) = trainer.load_best()? {
                tracing::info!(stage = %stage, "predicting with the best model (epoch {})", epoch + 1);
            }
            let held_out: Vec<&Bag> = bags.iter().filter(|b| b.split != Split::Train).collect();
            let val: Vec<&Bag> = bags.iter().filter(|b| b.split == Split::Val).collect();
            let no_signal = trainer.no_signal(&val);
            let mut log = trainer.log(&stage);
            log.no_signal = no_signal.clone();
            write_log(&ctx.out_dir().join("train_log.json"), &log)?;
            let probs = trainer.predict(&held_out)?;
            let classification = self.task == Task::Classification;
            if let Some(collapse) = trainer.collapse() {
                ctx.alert(collapse.message());
            } else if let Some(message) = classification
                .then(|| one_class_predictions(&held_out, &probs, &self.classes))
                .flatten()
            {
                ctx.alert(message);
            } else if let Some(chance) = trainer.at_chance() {
                ctx.alert(chance.message());
            } else if let Some(n) = no_signal {
                ctx.alert(n.message());
            }
            let by_id: HashMap<&str, &SlideHandle> =
                self.seen.values().map(|s| (s.id.as_str(), s)).collect();
            for (bag, probs) in held_out.iter().zip(probs) {
                let Some(slide) = by_id.get(bag.slide_id.as_str()) else {
                    continue;
                };
                let label = &self.classes[bag.label_index];
                let prediction = match trainer.objective() {
                    Objective::Classification => Prediction::from_probs(
                        &bag.slide_id,
                        bag.split.as_str(),
                        label,
                        &self.classes,
                        probs,
                    )?,
                    objective => Prediction::for_task(
                        &bag.slide_id,
                        bag.split.as_str(),
                        label,
                        bag.label_index,
                        task_values(objective, &bag.slide_id, &probs),
                        probs,
                    ),
                };
                ctx.emit(slide, to_batch(&[prediction])?)?;
            }
        } else if !self.seen.is_empty() {
            ctx.warn(None, "no bag reached training; nothing was trained");
        }
        let slides: Vec<SlideHandle> = self.seen.values().cloned().collect();
        for slide in &slides {
            ctx.end_slide(slide)?;
        }
        Ok(())
    }
}
