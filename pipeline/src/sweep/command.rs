//! The sweep side of `tessera run` and `tessera validate`: hooks the CLI calls first, which
//! take over when the experiment declares `sweep:` or `seeds:`.

use super::{is_sweep, plan, run_sweep, write_results, SweepOptions};
use crate::config::load_experiment;
use crate::registry::Registry;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `tessera validate` of a sweep: checks every point. `None` when `file` is not a sweep (or
/// does not load: the ordinary path reports that).
pub fn validate_if_sweep(file: &Path, sets: &[String], registry: &Registry) -> Option<ExitCode> {
    let base = load_experiment(file, sets).ok()?;
    if !is_sweep(&base) {
        return None;
    }
    match plan(&base, sets, registry, &base.out_dir) {
        Ok(points) => {
            println!(
                "{}: ok — sweep of {} points over {}{}, {} slides",
                file.display(),
                points.len(),
                if base.config.sweep.is_empty() {
                    "no parameter".to_string()
                } else {
                    base.config.sweep.keys().join(" x ")
                },
                if base.config.seeds.is_empty() {
                    String::new()
                } else {
                    format!(" x {} seeds", base.config.seeds.len())
                },
                base.slides.len()
            );
            Some(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Some(ExitCode::from(2))
        }
    }
}

/// `tessera run` of a sweep. `None` when `file` is not a sweep.
pub fn run_if_sweep(
    file: &Path,
    sets: &[String],
    out: Option<PathBuf>,
    quiet: bool,
    jobs: usize,
    shard: Option<crate::shard::Shard>,
    registry: &Registry,
) -> anyhow::Result<Option<ExitCode>> {
    let Ok(mut base) = load_experiment(file, sets) else {
        return Ok(None);
    };
    if !is_sweep(&base) {
        return Ok(None);
    }
    if let Some(out) = out {
        base.out_dir = out;
    }
    let points = match plan(&base, sets, registry, &base.out_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return Ok(Some(ExitCode::from(2)));
        }
    };
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: stopping the sweep cleanly (Ctrl-C again to abort)");
    });
    println!(
        "sweep `{}`: {} points into {} ({} at a time)",
        base.config.name,
        points.len(),
        base.out_dir.display(),
        jobs.max(1).min(points.len().max(1))
    );
    let options = SweepOptions {
        jobs,
        progress: !quiet && std::io::stderr().is_terminal(),
        interrupt: Some(interrupt.clone()),
        shard,
    };
    let record = run_sweep(
        &base.config.name,
        base.config
            .sweep
            .keys()
            .iter()
            .map(|k| k.to_string())
            .collect(),
        base.config.seeds.clone(),
        &points,
        &base.out_dir,
        &options,
    )?;
    println!(
        "\n{:<16} {:<12} {:>6} {:>6} {:>8}  computed in points",
        "stage", "kind", "hits", "miss", "skipped"
    );
    for s in &record.stages {
        let shown: Vec<&str> = s
            .points_with_misses
            .iter()
            .take(3)
            .map(String::as_str)
            .collect();
        let more = s.points_with_misses.len().saturating_sub(shown.len());
        println!(
            "{:<16} {:<12} {:>6} {:>6} {:>8}  {}{}",
            s.name,
            s.kind,
            s.cache_hits,
            s.cache_misses,
            s.skipped,
            if shown.is_empty() {
                "-".to_string()
            } else {
                shown.join(", ")
            },
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    if let Some(shard) = shard {
        println!(
            "\nshard {shard}: the per-slide cached stages of every point ran for this shard's \
             slides; run without --shard for training, evaluation and the results table"
        );
    } else if let Some(markdown) = write_results(&base.out_dir, &record)? {
        println!("\n{markdown}");
        println!(
            "results: {} and {}; figures: tessera report {}",
            base.out_dir.join("results.md").display(),
            base.out_dir.join("results.parquet").display(),
            base.out_dir.display()
        );
    }
    println!(
        "sweep report: {} ({:.1} s)",
        base.out_dir
            .join(tessera_report::record::SWEEP_FILE)
            .display(),
        record.seconds
    );
    let alerted: Vec<&str> = record
        .points
        .iter()
        .filter(|p| !p.alerts.is_empty())
        .map(|p| p.name.as_str())
        .collect();
    if !alerted.is_empty() {
        eprintln!(
            "warning: {} of {} points raised alerts (their rows are marked in the results; see each point's run.json): {}",
            alerted.len(),
            record.points.len(),
            alerted.join(", ")
        );
    }
    let failed = record
        .points
        .iter()
        .filter(|p| p.status == "failed")
        .count();
    Ok(Some(if interrupt.load(Ordering::Relaxed) {
        ExitCode::from(130)
    } else if failed > 0 {
        eprintln!("{failed} of {} points failed", record.points.len());
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }))
}

/// The one-row results table of a single run's output folder, when it wrote metrics.
pub fn single_run_table(out_dir: &Path) -> Option<String> {
    let mut record = tessera_report::SweepRecord::single(out_dir);
    record.load_metrics(out_dir).ok()?;
    record.points.first()?.metrics.as_ref()?;
    let table = match tessera_report::results_table(out_dir, &record) {
        Ok(table) => table,
        Err(e) => {
            tracing::warn!("the results table has no confidence intervals: {e}");
            tessera_report::aggregate(&record.points, &[])
        }
    };
    Some(table.to_markdown())
}

/// `tessera report OUT`: the results table (rewritten for a sweep) and every figure the
/// run has data for.
pub fn report(out: &Path) -> anyhow::Result<ExitCode> {
    let record = tessera_report::SweepRecord::read(out)?;
    let table = if out.join(tessera_report::record::SWEEP_FILE).exists() {
        write_results(out, &record)?
    } else {
        single_run_table(out)
    };
    if let Some(table) = table {
        println!("{table}");
    }
    let figures = tessera_report::draw_all(out, &record)?;
    for path in figures
        .written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        println!("figure: {} (and .svg)", path.display());
    }
    for reason in &figures.skipped {
        println!("skipped: {reason}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Every cache key an experiment uses — for a sweep, the keys of every point (a swept
/// upstream parameter gives each point its own entries) — for `cache gc --keep`.
pub fn used_cache_keys(file: &Path, registry: &Registry) -> anyhow::Result<Vec<String>> {
    let base = load_experiment(file, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !is_sweep(&base) {
        let (exp, graph) =
            crate::cli::load_and_check(file, &[], registry).map_err(anyhow::Error::msg)?;
        return Ok(crate::runner::plan_keys(&graph, &exp)?);
    }
    let points = plan(&base, &[], registry, &base.out_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut keys = Vec::new();
    for p in &points {
        keys.extend(crate::runner::plan_keys(&p.graph, &p.exp)?);
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}
