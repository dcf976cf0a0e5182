//! The stage API: how a stage kind is described (parameters, schemas, version) and how a
//! running stage receives and emits data. Built-in stages and users' stages use the same API.

use crate::error::{StageError, StageResult};
use crate::schema::InputSpec;
use crate::slide::SlideHandle;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::context::StageContext;

/// Where a stage should run its numerical work; stages map it to their framework's device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// CUDA device `N` (needs the `cuda` cargo feature).
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("device `{other}` is not `cpu`, `cuda` or `cuda:N`")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// What a stage knows about the run when it is built.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The stage's name in the experiment (`stages:` key).
    pub stage_name: String,
    /// The experiment's seed: stages derive their own random streams from it.
    pub seed: u64,
    pub device: DeviceSpec,
    /// The run's output folder (run.json, metrics, figures).
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// The folder of the experiment YAML: relative paths in parameters are relative to it.
    pub base_dir: PathBuf,
    /// Every slide of the dataset, in CSV order.
    pub slides: Arc<[SlideHandle]>,
    /// What the experiment predicts (`task:`): the targets of the slides are read from the
    /// dataset's columns for it ([`crate::task::slide_target`]).
    pub task: crate::task::Task,
    /// Number of parallel copies of this stage, and which one this is.
    pub workers: usize,
    pub worker: usize,
}

impl BuildContext {
    /// Resolves a path from a parameter against the experiment's folder.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        crate::paths::resolve_path(&self.base_dir, path.as_ref())
    }
}

/// A stage kind, described by its parameter type. The parameter struct is deserialized from
/// the YAML `params:` map (use `#[serde(deny_unknown_fields, default)]` so typos are errors)
/// and then describes the stage: its inputs, its output schema, its cache identity.
pub trait StageKind:
    DeserializeOwned + Serialize + JsonSchema + Default + Clone + Send + Sync + 'static
{
    /// The `kind:` name in YAML.
    const KIND: &'static str;
    /// Goes into cache keys: bump it when the stage's output for the same input changes.
    const VERSION: &'static str;
    /// One line for `tessera stages`.
    const ABOUT: &'static str;

    /// What the stage reads.
    fn input_spec(&self) -> InputSpec;

    /// The schema of the stage's output given its inputs' schemas (in `inputs:` order; empty
    /// for a source). Called before anything runs, to type-check the graph.
    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef>;

    /// Like `output_schema`, for stages whose schema depends on a file named in their
    /// parameters: `base_dir` is the experiment's folder, against which relative paths resolve.
    fn output_schema_at(&self, inputs: &[SchemaRef], base_dir: &Path) -> StageResult<SchemaRef> {
        let _ = base_dir;
        self.output_schema(inputs)
    }

    /// Checks parameter values beyond their types; the error names the offending field.
    fn validate(&self) -> Result<(), ParamIssue> {
        Ok(())
    }

    /// Creates one running copy of the stage (called once per worker).
    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>>;

    /// Identity of things outside the parameters that determine the output, such as a hash
    /// of a weights file. Goes into cache keys. Called once per run.
    fn cache_salt(&self, _ctx: &BuildContext) -> StageResult<String> {
        Ok(String::new())
    }

    /// Parameters that change how the output is computed but not what it is (thread counts,
    /// batch sizes, a faster reader giving identical pixels): left out of cache keys, so
    /// changing them reuses what is cached.
    fn key_neutral_params() -> &'static [&'static str] {
        &[]
    }

    /// More help for `tessera stages KIND`, printed after the parameters (e.g. the models a
    /// stage knows by name). None by default.
    fn notes() -> String {
        String::new()
    }

    /// Output columns that are not persisted by `cache: true` (e.g. pixels), which the stage
    /// re-creates in [`Stage::replay`].
    fn uncached_columns(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether several copies may run side by side (`workers: N`), each taking whole slides.
    /// Stages that hold state across slides (training) return false.
    fn parallel(&self) -> bool {
        true
    }

    /// Whether the output is per slide and therefore cacheable per slide.
    fn cacheable(&self) -> bool {
        true
    }

    /// Whether, as configured, the stage emits until a downstream stage closes its inputs
    /// (e.g. `sample` with `epochs: 0`). Validation then requires such a consumer, since
    /// otherwise the run would never end.
    fn endless(&self) -> bool {
        false
    }

    /// Whether the stage closes its inputs when it has had enough (see [`StageKind::endless`]).
    fn closes_inputs(&self) -> bool {
        false
    }
}

/// A parameter value that passed type checking but is not acceptable.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamIssue {
    pub field: String,
    pub message: String,
}

impl ParamIssue {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ParamIssue {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A running stage. The engine calls these from the stage's own thread, in arrival order.
/// Every callback about a slide may fail; the engine then reports the slide (with the stage
/// name), drops what was cached of it, and applies the stage's error policy.
pub trait Stage: Send {
    /// Rows about `slide` arrived on input `input`.
    fn on_batch(
        &mut self,
        ctx: &mut StageContext,
        input: usize,
        slide: &SlideHandle,
        batch: RecordBatch,
    ) -> StageResult {
        let _ = (ctx, input, slide, batch);
        Ok(())
    }

    /// Every row about `slide` has arrived on input `input`. Sources are called here once per
    /// slide of the dataset (with `input == 0` and no batches before) and do their work here.
    /// The default ends the slide downstream, which suits one-input streaming transforms.
    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        let _ = input;
        ctx.end_slide(slide)
    }

    /// The slide failed upstream: forget what was gathered for it.
    fn on_slide_failed(&mut self, ctx: &mut StageContext, slide: &SlideHandle) {
        let _ = (ctx, slide);
    }

    /// An epoch ended upstream. The default forwards the marker.
    fn on_epoch_end(&mut self, ctx: &mut StageContext, epoch: u64) -> StageResult {
        ctx.end_epoch(epoch)
    }

    /// Every input is closed: emit whatever is left (training loops run here).
    fn finish(&mut self, ctx: &mut StageContext) -> StageResult {
        let _ = ctx;
        Ok(())
    }

    /// The slide's output is in the cache: emit it. `cached` holds the persisted columns;
    /// stages with [`StageKind::uncached_columns`] re-create those here.
    fn replay(
        &mut self,
        ctx: &mut StageContext,
        slide: &SlideHandle,
        cached: Vec<RecordBatch>,
    ) -> StageResult {
        for batch in cached {
            ctx.emit(slide, batch)?;
        }
        ctx.end_slide(slide)
    }
}

/// Convenience: a `StageError::Stopped` check for loops inside long callbacks.
pub fn check_running(ctx: &StageContext) -> StageResult {
    if ctx.is_cancelled() {
        Err(StageError::Stopped)
    } else {
        Ok(())
    }
}
