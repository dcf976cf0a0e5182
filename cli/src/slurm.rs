//! `tessera slurm`: the two batch scripts that run an experiment on a Slurm cluster. A job
//! array tiles and embeds the slides in `N` shards into the shared cache
//! (`tessera run --shard $SLURM_ARRAY_TASK_ID/N`); a follow-up job, started only once every
//! array task succeeded (`--dependency=afterok`), runs the whole experiment, which then finds
//! every per-slide entry cached and trains and evaluates.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Resources asked of Slurm for every job (`None`: the cluster's default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub partition: Option<String>,
    pub gres: Option<String>,
    pub time: Option<String>,
    pub cpus_per_task: Option<u32>,
    pub mem: Option<String>,
}

/// Everything the scripts are made of; every path absolute, so the jobs run from anywhere.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    pub binary: PathBuf,
    pub experiment: PathBuf,
    pub sets: Vec<String>,
    pub cache_dir: PathBuf,
    pub out_dir: PathBuf,
    pub array: usize,
    pub resources: Resources,
}

/// Why the scripts could not be written or submitted.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("--array must be at least 1")]
    EmptyArray,
    #[error("--time `{0}`: expected [D-]HH:MM:SS, MM:SS or minutes")]
    Time(String),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running sbatch: {0} (is Slurm installed and SLURM_CONF set?)")]
    Spawn(std::io::Error),
    #[error("sbatch {script} failed ({status}): {stderr}")]
    Sbatch {
        script: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("sbatch {script} printed no job id: `{stdout}`")]
    NoJobId { script: PathBuf, stdout: String },
}

/// Quotes a word for bash.
pub fn sh_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn check_time(time: &str) -> Result<(), SlurmError> {
    let (days, rest) = match time.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, time),
    };
    let numeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    let parts: Vec<&str> = rest.split(':').collect();
    let ok = days.is_none_or(numeric) && parts.len() <= 3 && parts.iter().all(|p| numeric(p));
    if ok {
        Ok(())
    } else {
        Err(SlurmError::Time(time.into()))
    }
}

impl JobSpec {
    /// Where the scripts and job logs go.
    pub fn slurm_dir(&self) -> PathBuf {
        self.out_dir.join("slurm")
    }

    fn header(&self, job_name: &str, log: &str) -> String {
        let mut s = String::from("#!/bin/bash\n");
        s.push_str(&format!("#SBATCH --job-name={}\n", sh_quote(job_name)));
        let logs = self.slurm_dir().join("logs").join(log);
        s.push_str(&format!(
            "#SBATCH --output={}\n",
            sh_quote(&logs.to_string_lossy())
        ));
        let r = &self.resources;
        if let Some(p) = &r.partition {
            s.push_str(&format!("#SBATCH --partition={}\n", sh_quote(p)));
        }
        if let Some(g) = &r.gres {
            s.push_str(&format!("#SBATCH --gres={}\n", sh_quote(g)));
        }
        if let Some(t) = &r.time {
            s.push_str(&format!("#SBATCH --time={t}\n"));
        }
        if let Some(c) = r.cpus_per_task {
            s.push_str(&format!("#SBATCH --cpus-per-task={c}\n"));
        }
        if let Some(m) = &r.mem {
            s.push_str(&format!("#SBATCH --mem={}\n", sh_quote(m)));
        }
        s
    }

    fn run_command(&self, extra: &str) -> String {
        let mut cmd = format!(
            "exec {} run {}",
            sh_quote(&self.binary.to_string_lossy()),
            sh_quote(&self.experiment.to_string_lossy())
        );
        for set in &self.sets {
            cmd.push_str(&format!(" --set {}", sh_quote(set)));
        }
        cmd.push_str(extra);
        cmd.push_str(" --quiet\n");
        cmd
    }

    fn preamble(&self) -> String {
        format!(
            "set -euo pipefail\nexport TESSERA_CACHE_DIR={}\n",
            sh_quote(&self.cache_dir.to_string_lossy())
        )
    }

    /// The job array: task `i` runs shard `i/N` into the shared cache.
    pub fn array_script(&self) -> String {
        let name = format!("tessera-{}-shards", self.name);
        let mut s = self.header(&name, "shard-%A_%a.log");
        s.push_str(&format!("#SBATCH --array=0-{}\n", self.array - 1));
        s.push_str(&self.preamble());
        let shards_out = self.out_dir.join("shards");
        s.push_str(&self.run_command(&format!(
            " --shard \"${{SLURM_ARRAY_TASK_ID}}/{}\" --out {}/\"${{SLURM_ARRAY_TASK_ID}}\"",
            self.array,
            sh_quote(&shards_out.to_string_lossy())
        )));
        s
    }

    /// The follow-up: the whole experiment, reading the cache the array filled.
    pub fn full_script(&self) -> String {
        let name = format!("tessera-{}-full", self.name);
        let mut s = self.header(&name, "full-%j.log");
        s.push_str(&self.preamble());
        s.push_str(&self.run_command(&format!(
            " --out {}",
            sh_quote(&self.out_dir.to_string_lossy())
        )));
        s
    }

    /// Writes both scripts (and the log folder Slurm needs to exist); returns their paths.
    pub fn write(&self) -> Result<(PathBuf, PathBuf), SlurmError> {
        if self.array == 0 {
            return Err(SlurmError::EmptyArray);
        }
        if let Some(t) = &self.resources.time {
            check_time(t)?;
        }
        let dir = self.slurm_dir();
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|source| SlurmError::Write {
            path: logs.clone(),
            source,
        })?;
        let array = dir.join("shards.sbatch");
        let full = dir.join("full.sbatch");
        for (path, text) in [(&array, self.array_script()), (&full, self.full_script())] {
            std::fs::write(path, text).map_err(|source| SlurmError::Write {
                path: path.clone(),
                source,
            })?;
        }
        Ok((array, full))
    }
}

/// `sbatch --parsable [--dependency=afterok:ID] SCRIPT`; returns the job id.
pub fn sbatch(script: &Path, after_ok: Option<&str>) -> Result<String, SlurmError> {
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable");
    if let Some(id) = after_ok {
        cmd.arg(format!("--dependency=afterok:{id}"));
    }
    let out = cmd.arg(script).output().map_err(SlurmError::Spawn)?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        return Err(SlurmError::Sbatch {
            script: script.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    // `--parsable` prints `ID` or `ID;CLUSTER`.
    let id = stdout.split(';').next().unwrap_or("").trim().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(SlurmError::NoJobId {
            script: script.to_path_buf(),
            stdout,
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            name: "exp".into(),
            binary: "/opt/bin/tessera".into(),
            experiment: "/data/my exp.yaml".into(),
            sets: vec!["train.epochs=3".into()],
            cache_dir: "/shared/cache".into(),
            out_dir: "/shared/out/exp".into(),
            array: 4,
            resources: Resources {
                partition: Some("gpu".into()),
                gres: Some("gpu:1".into()),
                time: Some("02:00:00".into()),
                cpus_per_task: Some(8),
                mem: Some("32G".into()),
            },
        }
    }

    #[test]
    fn array_script_runs_each_shard_with_the_shared_cache() {
        let s = spec().array_script();
        assert!(s.starts_with("#!/bin/bash\n"), "{s}");
        for line in [
            "#SBATCH --array=0-3\n",
            "#SBATCH --partition=gpu\n",
            "#SBATCH --gres=gpu:1\n",
            "#SBATCH --time=02:00:00\n",
            "#SBATCH --cpus-per-task=8\n",
            "#SBATCH --mem=32G\n",
            "#SBATCH --output=/shared/out/exp/slurm/logs/shard-%A_%a.log\n",
            "export TESSERA_CACHE_DIR=/shared/cache\n",
            "exec /opt/bin/tessera run '/data/my exp.yaml' --set train.epochs=3 --shard \"${SLURM_ARRAY_TASK_ID}/4\" --out /shared/out/exp/shards/\"${SLURM_ARRAY_TASK_ID}\" --quiet\n",
        ] {
            assert!(s.contains(line), "missing {line:?} in\n{s}");
        }
    }

    #[test]
    fn full_script_runs_everything_unsharded() {
        let s = spec().full_script();
        assert!(!s.contains("--array") && !s.contains("--shard"), "{s}");
        assert!(s.contains(
            "exec /opt/bin/tessera run '/data/my exp.yaml' --set train.epochs=3 --out /shared/out/exp --quiet\n"
        ), "{s}");
        assert!(s.contains("export TESSERA_CACHE_DIR=/shared/cache\n"));
    }

    #[test]
    fn bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.out_dir = dir.path().into();
        s.array = 0;
        assert!(matches!(s.write(), Err(SlurmError::EmptyArray)));
        s.array = 2;
        s.resources.time = Some("2h".into());
        assert!(s.write().unwrap_err().to_string().contains("--time `2h`"));
        for ok in ["1-00:00:00", "30", "10:00", "01:00:00"] {
            check_time(ok).unwrap();
        }
        s.resources.time = None;
        let (a, f) = s.write().unwrap();
        assert!(a.exists() && f.exists() && dir.path().join("slurm/logs").is_dir());
    }

    #[test]
    fn quoting_survives_bash() {
        assert_eq!(sh_quote("plain/path-1.yaml"), "plain/path-1.yaml");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }
}
