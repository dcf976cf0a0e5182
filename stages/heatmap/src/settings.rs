//! Finding what the heatmap needs from the run that trained the model: the checkpoint files
//! and the sparse-map settings the model was trained with.
//!
//! A run's folder holds `checkpoints/{best,last}.*` (written by `train`) and
//! `experiment.yaml` (written by `tessera run`, every default filled in). The sparse-map
//! settings are those of the `sparse_map` stage feeding that run's `train` stage.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;
use tessera_mil::sparse_map::SparseMapParams;
use tessera_mil::train::checkpoint::CheckpointFiles;

use crate::HeatmapError;

/// The checkpoint at `path`: a `.safetensors` or `.json` file of one, or a folder (its `best`
/// checkpoint, else its `last`), or a run folder holding `checkpoints/`.
pub fn locate_checkpoint(path: &Path) -> Result<CheckpointFiles, HeatmapError> {
    let missing = || {
        HeatmapError::Invalid(format!(
            "no checkpoint at {} (expected NAME.safetensors + NAME.json, a checkpoints folder, or a run folder; did the `train` stage finish an epoch?)",
            path.display()
        ))
    };
    if path.is_dir() {
        for dir in [path.to_path_buf(), path.join("checkpoints")] {
            for name in ["best", "last"] {
                let files = CheckpointFiles::new(&dir, name);
                if files.meta.is_file() && files.weights.is_file() {
                    return Ok(files);
                }
            }
        }
        return Err(missing());
    }
    CheckpointFiles::locate(path).map_err(|_| missing())
}

/// The `experiment.yaml` of the run a checkpoint belongs to (`RUN/checkpoints/NAME.json`).
pub fn run_experiment_of(files: &CheckpointFiles) -> Option<PathBuf> {
    let run = files.meta.parent()?.parent()?;
    let path = run.join("experiment.yaml");
    path.is_file().then_some(path)
}

/// The parameters of the `sparse_map` stage upstream of the `train` stage(s) in an
/// experiment file. Errors when there is none, or several that differ.
pub fn sparse_map_of(experiment: &Path) -> Result<SparseMapParams, HeatmapError> {
    let invalid = |m: String| HeatmapError::Invalid(format!("{}: {m}", experiment.display()));
    let text = std::fs::read_to_string(experiment).map_err(|e| invalid(e.to_string()))?;
    let doc: Value = serde_yaml_ng::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let stages = doc
        .get("stages")
        .and_then(Value::as_mapping)
        .ok_or_else(|| invalid("no `stages`".into()))?;
    let kind_of = |name: &str| {
        stages
            .get(name)
            .and_then(|s| s.get("kind"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let inputs_of = |name: &str| -> Vec<String> {
        stages
            .get(name)
            .and_then(|s| s.get("inputs"))
            .and_then(Value::as_sequence)
            .map(|v| {
                v.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    // Walk upstream from every train stage to the sparse_map stages feeding it.
    let mut found = BTreeSet::new();
    let trains: Vec<String> = stages
        .keys()
        .filter_map(Value::as_str)
        .filter(|n| kind_of(n).as_deref() == Some("train"))
        .map(str::to_string)
        .collect();
    let mut stack = trains.clone();
    let mut seen = BTreeSet::new();
    while let Some(name) = stack.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if kind_of(&name).as_deref() == Some("sparse_map") {
            found.insert(name);
            continue;
        }
        stack.extend(inputs_of(&name));
    }
    let params: Vec<(String, SparseMapParams)> = found
        .into_iter()
        .map(|name| {
            let p = stages
                .get(name.as_str())
                .and_then(|s| s.get("params"))
                .cloned()
                .unwrap_or(Value::Null);
            let p: SparseMapParams = if p.is_null() {
                SparseMapParams::default()
            } else {
                serde_yaml_ng::from_value(p)
                    .map_err(|e| invalid(format!("stage `{name}` params: {e}")))?
            };
            Ok((name, p))
        })
        .collect::<Result<_, HeatmapError>>()?;
    match params.as_slice() {
        [] => Err(invalid(format!(
            "no `sparse_map` stage feeds a `train` stage ({}); set the heatmap's `sparse_map` parameter",
            if trains.is_empty() { "there is no train stage".to_string() } else { trains.join(", ") }
        ))),
        [(_, p)] => Ok(p.clone()),
        [(_, first), rest @ ..] if rest.iter().all(|(_, p)| p == first) => Ok(first.clone()),
        several => Err(invalid(format!(
            "several sparse_map stages with different settings feed training ({}); set the heatmap's `sparse_map` parameter",
            several.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_sparse_map_feeding_training() {
        let dir = tempfile::tempdir().unwrap();
        let exp = dir.path().join("experiment.yaml");
        std::fs::write(
            &exp,
            "name: x\ndataset: d.csv\nstages:\n  f: {kind: features}\n  s: {kind: sample, inputs: [f]}\n  \
             m: {kind: sparse_map, inputs: [s], params: {downsample: 3.0, collision: max}}\n  \
             other: {kind: sparse_map, inputs: [s], params: {downsample: 99.0}}\n  \
             a: {kind: augment, inputs: [m]}\n  t: {kind: train, inputs: [a]}\n",
        )
        .unwrap();
        let p = sparse_map_of(&exp).unwrap();
        assert_eq!(p.downsample, Some(3.0));
        assert_eq!(p.collision, tessera_mil::CollisionPolicy::Max);

        std::fs::write(
            &exp,
            "name: x\ndataset: d.csv\nstages:\n  f: {kind: features}\n  t: {kind: train, inputs: [f]}\n",
        )
        .unwrap();
        let err = sparse_map_of(&exp).unwrap_err().to_string();
        assert!(err.contains("no `sparse_map` stage"), "{err}");
    }

    #[test]
    fn locates_best_then_last_in_run_or_checkpoint_folders() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        std::fs::create_dir_all(&ck).unwrap();
        assert!(locate_checkpoint(dir.path()).is_err());
        for f in ["last.json", "last.safetensors"] {
            std::fs::write(ck.join(f), "x").unwrap();
        }
        assert_eq!(
            locate_checkpoint(dir.path()).unwrap().meta,
            ck.join("last.json")
        );
        for f in ["best.json", "best.safetensors"] {
            std::fs::write(ck.join(f), "x").unwrap();
        }
        assert_eq!(locate_checkpoint(&ck).unwrap().meta, ck.join("best.json"));
        assert_eq!(
            locate_checkpoint(&ck.join("last.safetensors"))
                .unwrap()
                .meta,
            ck.join("last.json")
        );
        let files = locate_checkpoint(dir.path()).unwrap();
        assert_eq!(run_experiment_of(&files), None);
        std::fs::write(dir.path().join("experiment.yaml"), "x").unwrap();
        assert_eq!(
            run_experiment_of(&files),
            Some(dir.path().join("experiment.yaml"))
        );
    }
}
