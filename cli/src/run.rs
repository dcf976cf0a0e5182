//! `tessera run` of a single experiment (a sweep runs through [`crate::sweep`]), and the
//! files every run writes beside its results.

use anyhow::Context;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tessera_pipeline::config::Experiment;
use tessera_pipeline::graph::Graph;
use tessera_pipeline::report::RunStatus;
use tessera_pipeline::runner::execute;
use tessera_pipeline::settings::RunSettings;
use tessera_pipeline::shard::Shard;

/// Applies `--out` and creates the output folder.
pub fn set_out_dir(exp: &mut Experiment, out: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(out) = out {
        exp.out_dir = out;
    }
    std::fs::create_dir_all(&exp.out_dir)
        .with_context(|| format!("creating {}", exp.out_dir.display()))
}

/// `tessera run` of one experiment: runs it into its output folder (or `out`) and prints the
/// per-stage summary, the errors, the results table and the closing status line.
pub fn run(
    mut exp: Experiment,
    graph: Graph,
    out: Option<PathBuf>,
    quiet: bool,
    shard: Option<Shard>,
) -> anyhow::Result<ExitCode> {
    set_out_dir(&mut exp, out)?;
    write_resolved(&exp, &graph)?;
    let interrupt = crate::interrupt::on_ctrl_c("stopping cleanly");
    let settings = RunSettings {
        shard,
        ..RunSettings::for_experiment(
            &exp,
            Some(interrupt),
            !quiet && std::io::stderr().is_terminal(),
        )
    };
    let report = execute(&graph, &settings)?;
    println!(
        "{:<16} {:<12} {:>8} {:>8} {:>10} {:>6} {:>6} {:>8} {:>6}",
        "stage", "kind", "in", "out", "rows out", "hits", "miss", "seconds", "errors"
    );
    for s in &report.stages {
        println!(
            "{:<16} {:<12} {:>8} {:>8} {:>10} {:>6} {:>6} {:>8.2} {:>6}",
            s.name,
            s.kind,
            s.items_in,
            s.items_out,
            s.rows_out,
            s.cache_hits,
            s.cache_misses,
            s.seconds,
            s.errors.len()
        );
    }
    for e in &report.errors {
        eprintln!(
            "error: stage `{}`, slide `{}`: {}",
            e.stage,
            e.slide.as_deref().unwrap_or("-"),
            e.message
        );
    }
    if let Some(sh) = &report.shard {
        println!(
            "shard {}: {} slides{}; stages not run in a shard run: {} (run without --shard for them)",
            sh.shard.as_deref().unwrap_or("-"),
            sh.slides.len(),
            if sh.deferred.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} left to other processes computing them ({})",
                    sh.deferred.len(),
                    sh.deferred.join(", ")
                )
            },
            if sh.stages_not_run.is_empty() {
                "none".to_string()
            } else {
                sh.stages_not_run.join(", ")
            }
        );
    }
    if let Some(table) = crate::results::single_run_table(&exp.out_dir) {
        println!("\n{table}");
    }
    // "Ok" alone would read as "nothing went wrong" after slides were skipped on errors.
    let skipped_after_errors = if report.status == RunStatus::Ok && !report.errors.is_empty() {
        format!(
            " with {} error(s) (those slides were skipped; `on_error: fail` stops instead)",
            report.errors.len()
        )
    } else {
        String::new()
    };
    // A run that finished but whose results cannot be trusted says so where users look.
    let alerts: Vec<String> = report
        .stages
        .iter()
        .flat_map(|s| s.alerts())
        .map(|a| format!("stage `{}`: {}", a.stage, a.message))
        .collect();
    for a in &alerts {
        eprintln!("warning: {a}");
    }
    let skipped_after_errors = match alerts.as_slice() {
        [] => skipped_after_errors,
        [one] => format!("{skipped_after_errors}, but {one}"),
        many => format!(
            "{skipped_after_errors}, but with {} alerts (above; first: {})",
            many.len(),
            many[0]
        ),
    };
    println!(
        "{:?}{skipped_after_errors} in {:.1} s; report: {}",
        report.status,
        report.seconds,
        exp.out_dir.join("run.json").display()
    );
    Ok(match report.status {
        RunStatus::Ok => ExitCode::SUCCESS,
        RunStatus::Failed => ExitCode::from(1),
        RunStatus::Cancelled => ExitCode::from(130),
    })
}

/// Writes the experiment as it ran: after `--set`, with every parameter's default filled in.
pub fn write_resolved(exp: &Experiment, graph: &Graph) -> anyhow::Result<()> {
    let mut config = exp.config.clone();
    for s in &graph.stages {
        if let Some(sc) = config.stages.get_mut(&s.name) {
            sc.params = s.stage.canonical_params();
        }
    }
    let path = exp.out_dir.join("experiment.yaml");
    std::fs::write(&path, serde_yaml_ng::to_string(&config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
