//! Results of finished runs: the one-row table printed after a single run, and
//! `tessera report OUT` (the results table and the figures, drawn by `tessera-report`).

use crate::sweep::write_results;
use std::path::Path;
use std::process::ExitCode;

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
