//! The sweep side of `tessera run` and `tessera validate`, for an experiment that declares
//! `sweep:` or `seeds:` (loaded once by [`crate::load`]).

use super::{plan, run_sweep, write_results, SweepOptions};
use crate::interrupt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use tessera_pipeline::config::Experiment;
use tessera_pipeline::Registry;

/// `tessera validate` of a sweep: checks every point.
pub fn validate(file: &Path, base: &Experiment, sets: &[String], registry: &Registry) -> ExitCode {
    match plan(base, sets, registry, &base.out_dir) {
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
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// `tessera run` of a sweep.
pub fn run(
    mut base: Experiment,
    sets: &[String],
    out: Option<PathBuf>,
    quiet: bool,
    jobs: usize,
    shard: Option<tessera_pipeline::shard::Shard>,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    if let Some(out) = out {
        base.out_dir = out;
    }
    let points = match plan(&base, sets, registry, &base.out_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let interrupt = interrupt::on_ctrl_c("stopping the sweep cleanly");
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
    Ok(if interrupt.load(Ordering::Relaxed) {
        ExitCode::from(130)
    } else if failed > 0 {
        eprintln!("{failed} of {} points failed", record.points.len());
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
