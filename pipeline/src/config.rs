//! The experiment YAML: what a user writes, parsed strictly (unknown fields are errors) and
//! resolved against the YAML file's folder, with `--set stage.param=value` overrides applied
//! before anything is checked.

use crate::slide::{read_dataset_for, MissingTarget, SlideHandle};
use crate::stage::DeviceSpec;
use crate::sweep_grid::SweepGrid;
use crate::task::Task;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// An experiment file, as written.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Name of the experiment: the default output folder is `out/<name>`.
    pub name: String,
    /// Seed from which every stage derives its random streams.
    #[serde(default)]
    pub seed: u64,
    /// `cpu` (default), `cuda` or `cuda:N` (needs a build with the `cuda` feature).
    #[serde(default = "default_device")]
    pub device: String,
    /// Where cached stage outputs live (relative paths are relative to this file's folder).
    /// The environment variable TESSERA_CACHE_DIR overrides it.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Where run.json, metrics and figures go (default `out/<name>` beside this file).
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// The dataset CSV: `slide_id,path,label[,split][,case_id][,mpp]`; survival adds
    /// `time,event`, regression `target`.
    pub dataset: PathBuf,
    /// What is predicted per slide: `classification` (the CSV's `label`, default), `survival`
    /// (`time` and `event`: 1 = event observed, 0 = censored) or `regression` (`target`).
    /// The CSV is checked against it before any work.
    #[serde(default, skip_serializing_if = "is_classification")]
    pub task: Task,
    /// Messages each channel between stages holds before the producer blocks.
    #[serde(default = "default_capacity")]
    pub channel_capacity: usize,
    /// Seconds after which a claim on a cache entry that its holder stopped refreshing is
    /// taken over (a job killed on another node). Holders refresh every quarter of it.
    #[serde(default = "default_claim_ttl")]
    pub claim_ttl_s: u64,
    /// The stages, by name.
    pub stages: BTreeMap<String, StageConfig>,
    /// A grid of runs: `STAGE.PARAM` (as for `--set`) -> the values to try. `tessera run`
    /// runs every combination into `OUT/<point>/` and writes `sweep.json` and the results table.
    #[serde(default, skip_serializing_if = "SweepGrid::is_empty")]
    pub sweep: SweepGrid,
    /// Repeats of every run (every grid point) with these experiment seeds instead of `seed`;
    /// results are then reported as mean +/- std over seeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
}

/// One stage of the DAG.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// The registered stage kind (`tessera stages` lists them).
    pub kind: String,
    /// Names of the upstream stages this stage reads, in order.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// The kind's parameters (`tessera stages KIND` lists them with defaults).
    #[serde(default)]
    pub params: serde_json::Value,
    /// Parallel copies of the stage, each taking whole slides.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Persist this stage's per-slide output in the content-addressed cache.
    #[serde(default)]
    pub cache: bool,
    /// What a failing slide does: `skip` it and report it in run.json (default), or `fail`
    /// the run.
    #[serde(default)]
    pub on_error: ErrorPolicy,
}

/// What an error about one slide does to the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ErrorPolicy {
    /// Report the slide in run.json and go on with the others.
    #[default]
    Skip,
    /// Stop the whole run.
    Fail,
}

fn is_classification(task: &Task) -> bool {
    *task == Task::Classification
}

fn default_device() -> String {
    "cpu".into()
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from(".tessera-cache")
}
fn default_capacity() -> usize {
    4
}
fn default_claim_ttl() -> u64 {
    crate::claim::DEFAULT_TTL.as_secs()
}
fn default_workers() -> usize {
    1
}

/// A problem with an experiment, pointing at the file and line where possible.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub stage: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(stage) = &self.stage {
            write!(f, ": stage `{stage}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found, reported together so one `validate` shows them all.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// An experiment read from disk, with paths resolved and the dataset loaded.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub config: ExperimentConfig,
    /// The file it came from (for error messages).
    pub file: PathBuf,
    /// Its folder: relative paths resolve against it.
    pub base_dir: PathBuf,
    /// The YAML text after `--set` overrides, for line look-ups.
    pub source: String,
    pub device: DeviceSpec,
    pub cache_dir: PathBuf,
    pub out_dir: PathBuf,
    pub slides: Vec<SlideHandle>,
    /// Slides without a value in a column the task needs (reported; left out by `sample`).
    pub missing_targets: Vec<MissingTarget>,
}

impl Experiment {
    /// Points at the line of a key path (`["stages", "tiles", "params", "tile_size"]`).
    pub fn error_at(
        &self,
        path: &[&str],
        stage: Option<&str>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: locate(&self.source, path),
            stage: stage.map(str::to_string),
            message: message.into(),
        }
    }
}

/// Reads an experiment, applies `--set` overrides and resolves paths. The dataset CSV is read
/// here too, so a broken dataset is reported before any work.
pub fn load_experiment(file: &Path, sets: &[String]) -> Result<Experiment, ConfigErrors> {
    let err = |line: Option<usize>, message: String| {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            line,
            stage: None,
            message,
        }])
    };
    let text = std::fs::read_to_string(file).map_err(|e| err(None, format!("cannot read: {e}")))?;
    let mut value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|e| {
        err(
            e.location().map(|l| l.line()),
            format!("not valid YAML: {e}"),
        )
    })?;
    for set in sets {
        apply_set(&mut value, set).map_err(|m| err(None, format!("--set {set}: {m}")))?;
    }
    let source = if sets.is_empty() {
        text.clone()
    } else {
        serde_yaml_ng::to_string(&value).unwrap_or_else(|_| text.clone())
    };
    let config: ExperimentConfig = serde_path_to_error::deserialize(value).map_err(|e| {
        let path: Vec<String> = e
            .path()
            .to_string()
            .split('.')
            .map(str::to_string)
            .collect();
        let refs: Vec<&str> = path
            .iter()
            .map(String::as_str)
            .filter(|s| *s != "?" && !s.is_empty())
            .collect();
        let inner = e.into_inner().to_string();
        let line = locate(&source, &refs).or_else(|| {
            // serde_yaml_ng reports "at line N column M" for unknown fields
            inner
                .split("at line ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        });
        let mut message = inner;
        if let Some(hint) = unknown_field_hint(&message) {
            message.push_str(&hint);
        }
        // Name the field: serde's message alone ("invalid type: ...") does not.
        let top_level_unknown = refs.len() == 1 && message.starts_with("unknown field");
        if !refs.is_empty() && !top_level_unknown {
            message = format!("`{}`: {message}", refs.join("."));
        }
        err(line, message)
    })?;
    let base_dir = file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let resolve = |p: &Path| crate::paths::resolve_path(&base_dir, p);
    let device = config
        .device
        .parse::<DeviceSpec>()
        .map_err(|m| err(locate(&source, &["device"]), m))?;
    if config.claim_ttl_s == 0 {
        return Err(err(
            locate(&source, &["claim_ttl_s"]),
            "claim_ttl_s must be at least 1".into(),
        ));
    }
    if config.channel_capacity == 0 {
        return Err(err(
            locate(&source, &["channel_capacity"]),
            "channel_capacity must be at least 1".into(),
        ));
    }
    let cache_dir = std::env::var_os("TESSERA_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| resolve(&config.cache_dir));
    let out_dir = config
        .out_dir
        .as_deref()
        .map(resolve)
        .unwrap_or_else(|| resolve(&Path::new("out").join(&config.name)));
    let dataset = resolve(&config.dataset);
    let read = read_dataset_for(&dataset, config.task)
        .map_err(|e| err(locate(&source, &["dataset"]), e.to_string()))?;
    for m in &read.missing {
        tracing::warn!("dataset {}, {m}", dataset.display());
    }
    Ok(Experiment {
        config,
        file: file.to_path_buf(),
        base_dir,
        source,
        device,
        cache_dir,
        out_dir,
        slides: read.slides,
        missing_targets: read.missing,
    })
}

/// serde lists the expected fields in its unknown-field message; add the closest one.
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    crate::registry::did_you_mean(field, expected).map(|m| format!(" (did you mean `{m}`?)"))
}

/// Top-level fields that `--set NAME=VALUE` addresses directly.
const TOP_LEVEL: &[&str] = &[
    "name",
    "seed",
    "device",
    "cache_dir",
    "out_dir",
    "dataset",
    "task",
    "channel_capacity",
    "claim_ttl_s",
    "seeds",
];
/// Stage fields that `--set STAGE.FIELD=VALUE` addresses (others go to `params`).
const STAGE_FIELDS: &[&str] = &["workers", "cache", "on_error", "inputs", "kind"];

/// Applies one `--set` override: `seed=3`, `stage.workers=2`, `stage.param=value` or
/// `stage.param.sub=value` (a parameter of the stage). VALUE is parsed as YAML.
pub fn apply_set(root: &mut serde_yaml_ng::Value, set: &str) -> Result<(), String> {
    use serde_yaml_ng::Value;
    let (path, raw) = set.split_once('=').ok_or("expected PATH=VALUE")?;
    let value: Value =
        serde_yaml_ng::from_str(raw).map_err(|e| format!("value is not YAML: {e}"))?;
    let parts: Vec<&str> = path.trim().split('.').collect();
    let mut keys: Vec<&str> = Vec::new();
    match parts.as_slice() {
        [top] if TOP_LEVEL.contains(top) => keys.push(top),
        [stage, field] if STAGE_FIELDS.contains(field) => keys.extend(["stages", stage, field]),
        [stage, rest @ ..] if !rest.is_empty() => {
            keys.extend(["stages", stage, "params"]);
            keys.extend(rest.iter().copied());
        }
        _ => {
            return Err(format!(
                "`{path}` is neither a top-level field ({}) nor STAGE.PARAM",
                TOP_LEVEL.join(", ")
            ))
        }
    }
    let mut node = root;
    for (i, key) in keys.iter().enumerate() {
        let map = match node {
            Value::Mapping(m) => m,
            Value::Null => {
                *node = Value::Mapping(Default::default());
                match node {
                    Value::Mapping(m) => m,
                    _ => unreachable!(),
                }
            }
            _ => return Err(format!("`{}` is not a map", keys[..i].join("."))),
        };
        let k = Value::String((*key).to_string());
        if i + 1 == keys.len() {
            map.insert(k, value);
            return Ok(());
        }
        if i == 1 && keys[0] == "stages" && !map.contains_key(&k) {
            let known: Vec<String> = map
                .keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect();
            let hint = crate::registry::did_you_mean(key, known.iter().map(String::as_str))
                .map(|m| format!(" (did you mean `{m}`?)"))
                .unwrap_or_default();
            return Err(format!("no stage named `{key}`{hint}"));
        }
        node = map.entry(k).or_insert(Value::Null);
    }
    Ok(())
}

/// Finds the 1-based line of a key path in block-style YAML, by indentation. Falls back to
/// the deepest key found (flow-style maps keep their parent's line).
pub fn locate(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0usize;
    let mut parent_indent: Option<usize> = None;
    let mut found = None;
    for key in path {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            if let Some(p) = parent_indent {
                if indent <= p {
                    break;
                }
            }
            let body = trimmed.trim_start_matches("- ");
            let name = body
                .split(':')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches(|c| c == '"' || c == '\'');
            if name == *key && body.contains(':') {
                hit = Some((i, indent));
                break;
            }
        }
        match hit {
            Some((i, indent)) => {
                found = Some(i + 1);
                start = i + 1;
                parent_indent = Some(indent);
            }
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "name: t\nstages:\n  tiles:\n    kind: tile\n    params:\n      tile_size: 224\n  embed:\n    kind: embed\n    params:\n      tile_size: 3\n";

    #[test]
    fn locates_nested_keys_by_indentation() {
        assert_eq!(
            locate(YAML, &["stages", "tiles", "params", "tile_size"]),
            Some(6)
        );
        assert_eq!(
            locate(YAML, &["stages", "embed", "params", "tile_size"]),
            Some(10)
        );
        assert_eq!(locate(YAML, &["stages", "embed", "kind"]), Some(8));
        assert_eq!(
            locate(YAML, &["stages", "embed", "params", "nope"]),
            Some(9)
        );
    }

    #[test]
    fn set_overrides_params_stage_fields_and_top_level() {
        let mut v: serde_yaml_ng::Value = serde_yaml_ng::from_str(YAML).unwrap();
        apply_set(&mut v, "tiles.tile_size=512").unwrap();
        apply_set(&mut v, "tiles.workers=3").unwrap();
        apply_set(&mut v, "seed=7").unwrap();
        apply_set(&mut v, "embed.model.depth=18").unwrap();
        assert_eq!(
            v["stages"]["tiles"]["params"]["tile_size"].as_i64(),
            Some(512)
        );
        assert_eq!(v["stages"]["tiles"]["workers"].as_i64(), Some(3));
        assert_eq!(v["seed"].as_i64(), Some(7));
        assert_eq!(
            v["stages"]["embed"]["params"]["model"]["depth"].as_i64(),
            Some(18)
        );
        let err = apply_set(&mut v, "tilez.tile_size=1").unwrap_err();
        assert!(err.contains("did you mean `tiles`"), "{err}");
    }
}
