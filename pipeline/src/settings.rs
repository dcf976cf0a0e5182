//! Everything about a run besides the graph ([`RunSettings`]), why a run cannot start
//! ([`RunError`]), and what each stage is told about the run and leaves behind (run.json).

use crate::config::Experiment;
use crate::error::StageError;
use crate::graph::Graph;
use crate::report::RunReport;
use crate::shard::Shard;
use crate::slide::SlideHandle;
use crate::stage::{BuildContext, DeviceSpec};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Everything about a run besides the graph.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub name: String,
    pub seed: u64,
    pub device: DeviceSpec,
    pub cache_dir: PathBuf,
    pub out_dir: PathBuf,
    pub base_dir: PathBuf,
    pub slides: Vec<SlideHandle>,
    /// What the experiment predicts; given to every stage's [`BuildContext`].
    pub task: crate::task::Task,
    pub channel_capacity: usize,
    /// Set from outside (Ctrl-C) to stop the run cleanly.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Draw progress bars on stderr (only where it is a terminal).
    pub progress: bool,
    /// Run only this shard's slides, and only the per-slide cached stages (and what feeds
    /// them), filling the shared cache for a later full run.
    pub shard: Option<Shard>,
    /// A claim on a cache entry that its holder stopped refreshing this long is taken over.
    pub claim_ttl: Duration,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("stage `{stage}`: {source}")]
    Build { stage: String, source: StageError },
    #[error("output folder {path}: {source}")]
    OutDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Report {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RunSettings {
    /// The settings of a loaded experiment.
    pub fn for_experiment(
        exp: &Experiment,
        interrupt: Option<Arc<AtomicBool>>,
        progress: bool,
    ) -> RunSettings {
        RunSettings {
            name: exp.config.name.clone(),
            seed: exp.config.seed,
            device: exp.device.clone(),
            cache_dir: exp.cache_dir.clone(),
            out_dir: exp.out_dir.clone(),
            base_dir: exp.base_dir.clone(),
            slides: exp.slides.clone(),
            task: exp.config.task,
            channel_capacity: exp.config.channel_capacity,
            interrupt,
            progress,
            shard: None,
            claim_ttl: Duration::from_secs(exp.config.claim_ttl_s),
        }
    }
}

/// Writes `out_dir/run.json`.
pub(crate) fn write_report(settings: &RunSettings, report: &RunReport) -> Result<(), RunError> {
    let path = settings.out_dir.join("run.json");
    let json = serde_json::to_string_pretty(report).unwrap_or_default();
    std::fs::write(&path, json).map_err(|source| RunError::Report { path, source })
}

/// What stage `stage`'s worker `worker` is told about the run.
pub(crate) fn build_context(
    graph: &Graph,
    settings: &RunSettings,
    slides: &Arc<[SlideHandle]>,
    stage: usize,
    worker: usize,
) -> BuildContext {
    BuildContext {
        stage_name: graph.stages[stage].name.clone(),
        seed: settings.seed,
        device: settings.device.clone(),
        out_dir: settings.out_dir.clone(),
        cache_dir: settings.cache_dir.clone(),
        base_dir: settings.base_dir.clone(),
        slides: slides.clone(),
        task: settings.task,
        workers: graph.stages[stage].workers,
        worker,
    }
}
