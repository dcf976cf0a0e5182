//! Sweeps: an experiment with `sweep:` (a grid over stage parameters) and/or `seeds:` runs
//! once per point into `OUT/<point>/`, every point sharing the cache, so tiling and embedding
//! run at most once per slide across the sweep. Every point is checked before anything runs.
//! Then `OUT/sweep.json` (per point and stage: cache hits, misses, skipped) and the results
//! table (`OUT/results.parquet`, `OUT/results.md`) are written.

pub mod command;
mod schedule;

pub use schedule::{run_sweep, SweepOptions};
pub use tessera_pipeline::sweep_grid::{display_value, expand, SweepGrid, SweepPoint};

use std::path::Path;
use tessera_pipeline::config::{
    apply_set, load_experiment, locate, ConfigError, ConfigErrors, Experiment,
};
use tessera_pipeline::graph::{build_graph, Graph};
use tessera_pipeline::Registry;

/// A point ready to run: its experiment (overrides applied, output folder set) and graph.
pub struct PlannedPoint {
    pub point: SweepPoint,
    pub exp: Experiment,
    pub graph: Graph,
}

/// Whether an experiment declares a sweep or seed repeats.
pub fn is_sweep(exp: &Experiment) -> bool {
    !exp.config.sweep.is_empty() || !exp.config.seeds.is_empty()
}

/// Top-level fields a sweep may not vary (they are not stage parameters).
const NOT_SWEEPABLE: &[&str] = &[
    "name",
    "seed",
    "seeds",
    "device",
    "cache_dir",
    "out_dir",
    "dataset",
    "channel_capacity",
];

/// Checks the grid and every point of `base` (loaded from `file` with `sets`), and returns the
/// points with their experiments, each writing into `out_root/<point>/`. Errors point at the
/// `sweep:` line of the key concerned and name the stage and field.
pub fn plan(
    base: &Experiment,
    sets: &[String],
    registry: &Registry,
    out_root: &Path,
) -> Result<Vec<PlannedPoint>, ConfigErrors> {
    let grid = &base.config.sweep;
    let mut errors: Vec<ConfigError> = Vec::new();
    let key_error = |key: &str, message: String| ConfigError {
        file: base.file.clone(),
        line: locate(&base.source, &["sweep", key]).or_else(|| locate(&base.source, &["sweep"])),
        stage: key
            .split('.')
            .next()
            .map(str::to_string)
            .filter(|_| key.contains('.')),
        message,
    };
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&base.source).unwrap_or_default();
    for (key, values) in &grid.0 {
        if !key.contains('.') || NOT_SWEEPABLE.contains(&key.as_str()) {
            errors.push(ConfigError {
                stage: None,
                ..key_error(
                    key,
                    format!(
                        "sweep key `{key}` is not STAGE.PARAM{}",
                        if key == "seed" {
                            " (repeat runs with `seeds: [..]`)"
                        } else {
                            ""
                        }
                    ),
                )
            });
            continue;
        }
        if let Some(set) = sets
            .iter()
            .find(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == key))
        {
            errors.push(key_error(
                key,
                format!("`--set {set}` sets a swept parameter; change the `sweep:` list instead"),
            ));
        }
        if values.is_empty() {
            errors.push(key_error(
                key,
                format!("sweep `{key}`: empty list of values"),
            ));
            continue;
        }
        for (i, v) in values.iter().enumerate() {
            if values[..i].contains(v) {
                errors.push(key_error(
                    key,
                    format!("sweep `{key}`: value {} is listed twice", display_value(v)),
                ));
            }
        }
        let mut probe = yaml.clone();
        let set = format!(
            "{key}={}",
            serde_json::to_string(&values[0]).unwrap_or_default()
        );
        if let Err(m) = apply_set(&mut probe, &set) {
            errors.push(ConfigError {
                stage: None,
                ..key_error(key, format!("sweep key `{key}`: {m}"))
            });
            continue;
        }
        // Each value alone: wrong types and unacceptable values, named by stage and field.
        for v in values {
            let mut all = sets.to_vec();
            all.push(format!(
                "{key}={}",
                serde_json::to_string(v).unwrap_or_default()
            ));
            if let Err(e) = load_and_build(&base.file, &all, registry) {
                for inner in e.0 {
                    errors.push(ConfigError {
                        stage: inner.stage.clone().or(key_error(key, String::new()).stage),
                        ..key_error(
                            key,
                            format!("sweep `{key}` = {}: {}", display_value(v), inner.message),
                        )
                    });
                }
            }
        }
    }
    let mut seen = Vec::new();
    for s in &base.config.seeds {
        if seen.contains(s) {
            errors.push(ConfigError {
                file: base.file.clone(),
                line: locate(&base.source, &["seeds"]),
                stage: None,
                message: format!("seed {s} is listed twice in `seeds`"),
            });
        }
        seen.push(*s);
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    // Every combination (some values only clash together).
    let mut planned = Vec::new();
    for point in expand(grid, &base.config.seeds) {
        let mut all = sets.to_vec();
        all.extend(point.sets());
        match load_and_build(&base.file, &all, registry) {
            Ok((mut exp, graph)) => {
                exp.config.sweep = SweepGrid::default();
                exp.config.seeds = Vec::new();
                exp.out_dir = out_root.join(&point.name);
                planned.push(PlannedPoint { point, exp, graph });
            }
            Err(e) => {
                for inner in e.0 {
                    errors.push(ConfigError {
                        file: base.file.clone(),
                        line: locate(&base.source, &["sweep"]),
                        stage: inner.stage,
                        message: format!("sweep point `{}`: {}", point.name, inner.message),
                    });
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(planned)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Writes `results.parquet` and `results.md` into `out_root` from the points' metrics.json
/// files and returns the Markdown table; `None` when no point wrote metrics.
pub fn write_results(
    out_root: &Path,
    record: &tessera_report::SweepRecord,
) -> anyhow::Result<Option<String>> {
    let mut record = record.clone();
    record.load_metrics(out_root)?;
    if record.points.iter().all(|p| p.metrics.is_none()) {
        return Ok(None);
    }
    let table = tessera_report::results_table(out_root, &record)?;
    table.write_parquet(&out_root.join("results.parquet"))?;
    let markdown = table.to_markdown();
    let path = out_root.join("results.md");
    let title = format!(
        "# {}\n\nMetrics of the test split (the top level of each run's metrics.json); \
         n = runs with metrics{}.\n\n",
        record.name,
        if table.rows.iter().any(|r| r.runs > 1) {
            ", mean ± sample std over the runs of each row (seeds, folds)"
        } else {
            ""
        }
    );
    std::fs::write(&path, format!("{title}{markdown}"))
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(Some(markdown))
}

fn load_and_build(
    file: &Path,
    sets: &[String],
    registry: &Registry,
) -> Result<(Experiment, Graph), ConfigErrors> {
    let exp = load_experiment(file, sets)?;
    let graph = build_graph(&exp, registry)?;
    Ok((exp, graph))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A registry with one kind whose parameter `n` must be a positive integer.
    pub(crate) mod kind {
        use schemars::JsonSchema;
        use serde::{Deserialize, Serialize};
        use std::sync::Arc;
        use tessera_pipeline::arrow::datatypes::{Schema, SchemaRef};
        use tessera_pipeline::error::StageResult;
        use tessera_pipeline::schema::InputSpec;
        use tessera_pipeline::stage::{BuildContext, ParamIssue, Stage, StageKind};

        #[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields, default)]
        pub struct Src {
            pub n: u32,
            pub mode: String,
        }
        impl StageKind for Src {
            const KIND: &'static str = "src";
            const VERSION: &'static str = "1";
            const ABOUT: &'static str = "test source";
            fn input_spec(&self) -> InputSpec {
                InputSpec::Dataset
            }
            fn output_schema(&self, _: &[SchemaRef]) -> StageResult<SchemaRef> {
                Ok(Arc::new(Schema::empty()))
            }
            fn validate(&self) -> Result<(), ParamIssue> {
                if self.mode == "bad" {
                    return Err(ParamIssue::new("mode", "`bad` is not a mode"));
                }
                Ok(())
            }
            fn build(&self, _: &BuildContext) -> StageResult<Box<dyn Stage>> {
                Err(tessera_pipeline::StageError::msg("not built in tests"))
            }
        }
    }

    pub(crate) fn setup(yaml: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), "slide_id,path,label\na,,x\n").unwrap();
        let file = dir.path().join("e.yaml");
        std::fs::write(
            &file,
            format!("name: e\ndataset: d.csv\nstages:\n  s:\n    kind: src\n{yaml}"),
        )
        .unwrap();
        (dir, file)
    }

    fn try_plan(yaml: &str) -> Result<Vec<SweepPoint>, String> {
        try_plan_full(yaml).map(|p| p.into_iter().map(|p| p.point).collect())
    }

    fn try_plan_full(yaml: &str) -> Result<Vec<PlannedPoint>, String> {
        try_plan_with(yaml, &[])
    }

    fn try_plan_with(yaml: &str, sets: &[String]) -> Result<Vec<PlannedPoint>, String> {
        let (dir, file) = setup(yaml);
        let mut registry = Registry::new();
        registry.register::<kind::Src>();
        let base = load_experiment(&file, sets).map_err(|e| e.to_string())?;
        plan(&base, sets, &registry, &dir.path().join("out")).map_err(|e| e.to_string())
    }

    #[test]
    fn plans_every_point_into_its_folder_with_its_values() {
        let points = try_plan_full("sweep:\n  s.n: [1, 2]\n  s.mode: [a, b]\nseeds: [5, 6]\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(points.len(), 8);
        let p = &points[3];
        assert_eq!(p.point.name, "n=1__mode=b__seed=6");
        assert!(p.exp.out_dir.ends_with("out/n=1__mode=b__seed=6"));
        assert_eq!(p.exp.config.seed, 6);
        assert!(p.exp.config.sweep.is_empty() && p.exp.config.seeds.is_empty());
        assert_eq!(p.exp.config.stages["s"].params["mode"], "b");
        assert_eq!(p.exp.config.stages["s"].params["n"], 1);
    }

    #[test]
    fn errors_name_the_line_the_stage_and_the_field() {
        let err = try_plan("sweep:\n  s.n: [1, -3]\n").unwrap_err();
        assert!(
            err.contains("e.yaml:7: stage `s`: sweep `s.n` = -3"),
            "{err}"
        );
        assert!(
            err.contains("`n`") || err.contains("invalid value"),
            "{err}"
        );
        let err = try_plan("sweep:\n  s.mode: [ok, bad]\n").unwrap_err();
        assert!(
            err.contains(":7:") && err.contains("parameter `mode`: `bad` is not a mode"),
            "{err}"
        );
        let err = try_plan("sweep:\n  s.nn: [1]\n").unwrap_err();
        assert!(
            err.contains("unknown parameter `nn` (did you mean `n`?)"),
            "{err}"
        );
        let err = try_plan("sweep:\n  t.n: [1]\n").unwrap_err();
        assert!(err.contains("no stage named `t`"), "{err}");
        let err = try_plan("sweep:\n  s.n: []\n").unwrap_err();
        assert!(err.contains(":7:") && err.contains("empty list"), "{err}");
        let err = try_plan("sweep:\n  seed: [1, 2]\n").unwrap_err();
        assert!(err.contains("seeds: [..]"), "{err}");
        let err = try_plan("sweep:\n  s.n: 3\n").unwrap_err();
        assert!(err.contains("sweep"), "{err}");
        let err = try_plan("seeds: [1, 1]\n").unwrap_err();
        assert!(err.contains("listed twice"), "{err}");
        let err = try_plan_with("sweep:\n  s.n: [1, 2]\n", &["s.n=5".into()])
            .err()
            .unwrap();
        assert!(err.contains("sets a swept parameter"), "{err}");
        // other overrides apply to every point
        let points = try_plan_with("sweep:\n  s.n: [1, 2]\n", &["s.mode=z".into()]).unwrap();
        assert!(points
            .iter()
            .all(|p| p.exp.config.stages["s"].params["mode"] == "z"));
    }
}
