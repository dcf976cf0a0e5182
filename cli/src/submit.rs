//! `tessera slurm`: writes (and submits) the Slurm scripts of an experiment, made by
//! [`crate::slurm`].

use crate::slurm::{sbatch, sh_quote, JobSpec, Resources};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tessera_pipeline::config::Experiment;

/// `tessera slurm`: writes the scripts of `exp` (loaded from `file` with `sets`, which the
/// jobs load again) into OUT/slurm/, and with `submit` submits them.
#[allow(clippy::too_many_arguments)]
pub fn slurm(
    file: &Path,
    sets: &[String],
    mut exp: Experiment,
    array: usize,
    out: Option<PathBuf>,
    resources: Resources,
    submit: bool,
) -> anyhow::Result<ExitCode> {
    crate::run::set_out_dir(&mut exp, out)?;
    std::fs::create_dir_all(&exp.cache_dir)
        .with_context(|| format!("creating {}", exp.cache_dir.display()))?;
    if array > exp.slides.len() {
        eprintln!(
            "warning: --array {array} is more than the {} slides: some tasks will have nothing to do",
            exp.slides.len()
        );
    }
    let spec = JobSpec {
        name: exp.config.name.clone(),
        binary: std::env::current_exe()
            .context("locating the tessera binary")?
            .canonicalize()
            .context("locating the tessera binary")?,
        experiment: absolute(file)?,
        sets: sets.to_vec(),
        cache_dir: absolute(&exp.cache_dir)?,
        out_dir: absolute(&exp.out_dir)?,
        array,
        resources,
    };
    let (array_script, full_script) = spec.write()?;
    println!("wrote {}", array_script.display());
    println!("wrote {}", full_script.display());
    if !submit {
        println!("submit with:");
        println!(
            "  ARRAY=$(sbatch --parsable {})",
            sh_quote(&array_script.to_string_lossy())
        );
        println!(
            "  sbatch --dependency=afterok:${{ARRAY%%;*}} {}",
            sh_quote(&full_script.to_string_lossy())
        );
        return Ok(ExitCode::SUCCESS);
    }
    let array_id = sbatch(&array_script, None)?;
    println!("submitted shard array: job {array_id} ({array} tasks)");
    let full_id = sbatch(&full_script, Some(&array_id))?;
    println!("submitted full run: job {full_id} (after job {array_id} succeeds)");
    println!(
        "results: {} (run.json, metrics); logs: {}",
        spec.out_dir.display(),
        spec.slurm_dir().join("logs").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `p` made absolute (resolved when it exists), so that jobs run from anywhere.
fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.exists() {
        return p
            .canonicalize()
            .with_context(|| format!("resolving {}", p.display()));
    }
    Ok(std::env::current_dir()?.join(p))
}
