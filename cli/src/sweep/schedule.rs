//! Runs the points of a sweep, one after the other or `jobs` at a time. With several jobs, a
//! point waits for the earlier points that compute cache entries it needs (the first point to
//! need an entry computes it; later points replay it), so no entry is ever computed twice:
//! tiling and embedding run at most once per slide across the sweep.

use super::PlannedPoint;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tessera_pipeline::cache::Cache;
use tessera_pipeline::cache::TOOL_VERSION;
use tessera_pipeline::plan::Plan;
use tessera_pipeline::report::{RunReport, RunStatus};
use tessera_pipeline::runner::execute;
use tessera_pipeline::settings::RunSettings;
use tessera_report::{PointRecord, PointStage, SweepRecord};

/// How to run a sweep.
#[derive(Debug, Clone, Default)]
pub struct SweepOptions {
    /// Points run side by side (at least 1).
    pub jobs: usize,
    /// Draw progress bars (only honoured with one job).
    pub progress: bool,
    /// Set from outside (Ctrl-C) to stop cleanly: running points stop, no new point starts.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Run every point as this shard (its slides, its per-slide cached stages only).
    pub shard: Option<tessera_pipeline::shard::Shard>,
}

/// For every point, the earlier points it must wait for: those first to compute an entry it
/// needs. Entries already in the cache are nobody's to compute.
fn dependencies(points: &[PlannedPoint]) -> anyhow::Result<Vec<Vec<usize>>> {
    let mut owner: HashMap<(String, String), usize> = HashMap::new();
    let mut deps = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let mut d: Vec<usize> = Vec::new();
        let plan = Plan::for_experiment(&p.graph, &p.exp)?;
        for entry in plan.missing_entries(&p.graph, &Cache::new(&p.exp.cache_dir)) {
            let o = *owner.entry(entry).or_insert(i);
            if o != i && !d.contains(&o) {
                d.push(o);
            }
        }
        deps.push(d);
    }
    Ok(deps)
}

fn point_record(p: &PlannedPoint, status: &str) -> PointRecord {
    PointRecord {
        name: p.point.name.clone(),
        params: p.point.params.iter().cloned().collect(),
        seed: p.point.seed,
        status: status.into(),
        ..PointRecord::default()
    }
}

/// Runs one point into its folder; never fails: a failure is the record's status.
fn run_point(p: &PlannedPoint, options: &SweepOptions, progress: bool) -> PointRecord {
    let started = Instant::now();
    let mut record = point_record(p, "failed");
    let result = (|| -> anyhow::Result<RunReport> {
        std::fs::create_dir_all(&p.exp.out_dir)?;
        crate::run::write_resolved(&p.exp, &p.graph)?;
        let mut settings = RunSettings::for_experiment(&p.exp, options.interrupt.clone(), progress);
        settings.shard = options.shard;
        Ok(execute(&p.graph, &settings)?)
    })();
    record.seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(report) => {
            record.status = match report.status {
                RunStatus::Ok => "ok",
                RunStatus::Failed => "failed",
                RunStatus::Cancelled => "cancelled",
            }
            .into();
            record.error = report.errors.first().map(|e| {
                format!(
                    "stage `{}`, slide `{}`: {}",
                    e.stage,
                    e.slide.as_deref().unwrap_or("-"),
                    e.message
                )
            });
            record.alerts = report
                .stages
                .iter()
                .flat_map(|s| s.alerts())
                .map(|a| format!("stage `{}`: {}", a.stage, a.message))
                .collect();
            record.stages = report
                .stages
                .iter()
                .map(|s| PointStage {
                    name: s.name.clone(),
                    kind: s.kind.clone(),
                    cache_hits: s.cache_hits,
                    cache_misses: s.cache_misses,
                    skipped: s.skipped,
                    items_in: s.items_in,
                    seconds: s.seconds,
                })
                .collect();
        }
        Err(e) => record.error = Some(tessera_pipeline::error::error_chain(e.as_ref())),
    }
    record
}

/// One line about a finished point.
fn point_line(r: &PointRecord, done: usize, total: usize) -> String {
    let computed: Vec<String> = r
        .stages
        .iter()
        .filter(|s| s.cache_misses > 0)
        .map(|s| format!("{} {}", s.name, s.cache_misses))
        .collect();
    let cache = if computed.is_empty() {
        "nothing computed into the cache".to_string()
    } else {
        format!("computed into the cache: {}", computed.join(", "))
    };
    let error = r
        .error
        .as_deref()
        .map(|e| format!("; {e}"))
        .unwrap_or_default();
    let alerts: String = r.alerts.iter().map(|a| format!("; ALERT {a}")).collect();
    format!(
        "[{done}/{total}] {}: {} in {:.1} s; {cache}{error}{alerts}",
        r.name, r.status, r.seconds
    )
}

/// Runs every point and writes `out_root/sweep.json` (after each point, so an interrupted
/// sweep leaves a true record). Returns the record, points in grid order.
pub fn run_sweep(
    name: &str,
    keys: Vec<String>,
    seeds: Vec<u64>,
    points: &[PlannedPoint],
    out_root: &Path,
    options: &SweepOptions,
) -> anyhow::Result<SweepRecord> {
    let started = Instant::now();
    std::fs::create_dir_all(out_root)?;
    let jobs = options.jobs.max(1).min(points.len().max(1));
    let deps = if jobs > 1 {
        dependencies(points)?
    } else {
        vec![Vec::new(); points.len()]
    };
    let record = Mutex::new(SweepRecord {
        name: name.to_string(),
        tool: TOOL_VERSION.to_string(),
        keys,
        seeds,
        points: points.iter().map(|p| point_record(p, "not run")).collect(),
        ..SweepRecord::default()
    });
    // (started, done) per point.
    let state = Mutex::new((vec![false; points.len()], vec![false; points.len()], 0usize));
    let wake = Condvar::new();
    let interrupted = || {
        options
            .interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed))
    };
    let progress = options.progress && jobs == 1;
    let worker = || loop {
        let next = {
            let Ok(mut st) = state.lock() else { return };
            loop {
                if interrupted() {
                    return;
                }
                let ready =
                    (0..points.len()).find(|&i| !st.0[i] && deps[i].iter().all(|&d| st.1[d]));
                if let Some(i) = ready {
                    st.0[i] = true;
                    break i;
                }
                if st.0.iter().all(|&s| s) {
                    return;
                }
                st = match wake.wait_timeout(st, Duration::from_millis(200)) {
                    Ok((st, _)) => st,
                    Err(_) => return,
                };
            }
        };
        let r = run_point(&points[next], options, progress);
        let done = {
            let Ok(mut st) = state.lock() else { return };
            st.1[next] = true;
            st.2 += 1;
            st.2
        };
        println!("{}", point_line(&r, done, points.len()));
        if let Ok(mut rec) = record.lock() {
            rec.points[next] = r;
            rec.seconds = started.elapsed().as_secs_f64();
            rec.total();
            if let Err(e) = rec.write(out_root) {
                tracing::error!("{e}");
            }
        }
        wake.notify_all();
    };
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(worker);
        }
    });
    let mut rec = record
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a sweep worker panicked"))?;
    rec.seconds = started.elapsed().as_secs_f64();
    rec.total();
    rec.write(out_root)?;
    Ok(rec)
}
