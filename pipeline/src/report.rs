//! `run.json`: what each stage did in a run — items, rows, cache hits and misses, time,
//! errors — so users can see that a re-run reused everything it should have.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// A failure or warning about one slide in one stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorRecord {
    pub stage: String,
    pub slide: Option<String>,
    pub message: String,
    /// A warning the run's closing line repeats, because the results cannot be trusted as
    /// they are (e.g. a training run that learned nothing).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub alert: bool,
}

/// Counters a stage's workers update while running.
#[derive(Debug, Default)]
pub struct StageStats {
    items_in: AtomicU64,
    items_out: AtomicU64,
    rows_in: AtomicU64,
    rows_out: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    busy_nanos: AtomicU64,
}

impl StageStats {
    pub(crate) fn add_item_in(&self) {
        self.items_in.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_item_out(&self) {
        self.items_out.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_rows_in(&self, n: usize) {
        self.rows_in.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub(crate) fn add_rows_out(&self, n: usize) {
        self.rows_out.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub(crate) fn add_cache_hit(&self) {
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_cache_miss(&self) {
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_busy(&self, d: std::time::Duration) {
        self.busy_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// One stage's line in run.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageReport {
    pub name: String,
    pub kind: String,
    pub workers: usize,
    pub cached: bool,
    /// Slides received (or replayed from the cache).
    pub items_in: u64,
    /// Slides completed.
    pub items_out: u64,
    pub rows_in: u64,
    pub rows_out: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Slides this stage did not need to touch because everything downstream was cached.
    pub skipped: u64,
    /// Time spent inside the stage's callbacks, summed over workers.
    pub seconds: f64,
    pub errors: Vec<ErrorRecord>,
    pub warnings: Vec<ErrorRecord>,
    /// What the stage reports about itself beyond counters (e.g. `train`'s parameter counts).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl StageReport {
    /// The warnings marked as alerts.
    pub fn alerts(&self) -> impl Iterator<Item = &ErrorRecord> {
        self.warnings.iter().filter(|w| w.alert)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_stats(
        name: &str,
        kind: &str,
        workers: usize,
        cached: bool,
        skipped: u64,
        stats: &StageStats,
        errors: Vec<ErrorRecord>,
        warnings: Vec<ErrorRecord>,
        details: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StageReport {
            name: name.to_string(),
            kind: kind.to_string(),
            workers,
            cached,
            items_in: get(&stats.items_in),
            items_out: get(&stats.items_out),
            rows_in: get(&stats.rows_in),
            rows_out: get(&stats.rows_out),
            cache_hits: get(&stats.cache_hits),
            cache_misses: get(&stats.cache_misses),
            skipped,
            seconds: get(&stats.busy_nanos) as f64 / 1e9,
            errors,
            warnings,
            details,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Every stage finished; some slides may have been skipped after errors (see `errors`).
    Ok,
    /// A stage failed under the `fail` policy, or outside any slide.
    Failed,
    /// Stopped by Ctrl-C.
    Cancelled,
}

/// The whole of run.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunReport {
    pub name: String,
    pub tool: String,
    pub status: RunStatus,
    pub slides: usize,
    pub seconds: f64,
    pub stages: Vec<StageReport>,
    /// Every error of every stage, for a quick look.
    pub errors: Vec<ErrorRecord>,
    /// Present when only the per-slide stages ran (`--shard`): which slides, which stages not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardReport>,
}

/// What a shard run (`--shard i/n`) covered. It fills the shared cache; the stages that
/// aggregate over all slides (sampling, training, evaluation...) run in a later full run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardReport {
    /// `i/n`, 0-based; `null` for the pass a full run makes while others hold claims.
    pub shard: Option<String>,
    /// The slides assigned to this shard.
    pub slides: Vec<String>,
    /// Slides left to another process that was computing them (its claim was live).
    pub deferred: Vec<String>,
    /// Stages that did not run: they are not per-slide cached stages nor feed one.
    pub stages_not_run: Vec<String>,
}

impl RunReport {
    /// The stage line named `name`.
    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == name)
    }
}
