//! Survival and regression through the binary, on subsets of the shipped synthetic cohorts
//! (`examples/survival/`, `examples/regression/`, written by `cargo run -p tessera-mil
//! --example make_outcomes`): the dataset CSV is checked against `task:` before any work
//! (errors name the file and the line; a slide without a value is reported and left out),
//! training and evaluation write the task's predictions and metrics, a sweep prints a results
//! table with the task's columns, and `tessera report` draws the Kaplan-Meier figure.

mod common;

use common::{run, stage, validate, write_yaml};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn example(task: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(task)
}

/// The first `n` rows of an example's dataset CSV (plus `extra` lines) in `dir`.
fn subset(dir: &Path, task: &str, n: usize, extra: &[&str]) -> PathBuf {
    let text = std::fs::read_to_string(example(task).join("dataset.csv")).unwrap();
    let mut lines: Vec<&str> = text.lines().take(n + 1).collect();
    lines.extend_from_slice(extra);
    let path = dir.join("dataset.csv");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// An experiment on `dataset` with the example's features, `train` params `train` (YAML flow
/// map body) and an optional sweep line.
fn experiment(dir: &Path, task: &str, dataset: &Path, train: &str, sweep: &str) -> PathBuf {
    let features = example(task).join("features.parquet");
    write_yaml(
        dir,
        "exp.yaml",
        &format!(
            "name: t\nseed: 1\ncache_dir: {cache}\ndataset: {dataset}\ntask: {task}\nstages:\n  \
             features: {{kind: features, params: {{path: {features}}}}}\n  \
             sample: {{kind: sample, inputs: [features], params: {{tiles_per_slide: 0}}}}\n  \
             sparse_map: {{kind: sparse_map, inputs: [sample], params: {{downsample: 1}}}}\n  \
             train: {{kind: train, inputs: [sparse_map], params: {{{train}}}}}\n  \
             evaluate: {{kind: evaluate, inputs: [train], params: {{bootstrap: 200}}}}\n{sweep}",
            cache = dir.join("cache").display(),
            dataset = dataset.display(),
            features = features.display(),
        ),
    )
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn survival_sweep_writes_c_index_table_and_kaplan_meier_figure() {
    let dir = TempDir::new().unwrap();
    // 60 slides, and one without a time: reported and left out.
    let dataset = subset(dir.path(), "survival", 60, &["surv_179,,1"]);
    let exp = experiment(
        dir.path(),
        "survival",
        &dataset,
        "epochs: 4",
        "sweep:\n  train.pooling: [sparseconvmil, mean]\n",
    );
    let out = dir.path().join("out");
    let (ran, _) = run(&exp, &out, &[]);
    assert!(ran.ok(), "{ran:?}");
    // The table has the survival columns, one row per model.
    let header = ran
        .stdout
        .lines()
        .find(|l| l.contains("C-index"))
        .unwrap_or_else(|| panic!("no results table: {ran:?}"));
    assert!(
        header.contains("Uno's C") && header.contains("log-rank p"),
        "{header}"
    );
    assert!(!header.contains("balanced accuracy"), "{header}");
    for model in ["sparseconvmil", "mean"] {
        let point = out.join(format!("pooling={model}"));
        let metrics = json(&point.join("metrics.json"));
        assert_eq!(metrics["task"], "survival", "{metrics:#}");
        let c = metrics["c_index"]
            .as_f64()
            .unwrap_or_else(|| panic!("{metrics:#}"));
        assert!((0.0..=1.0).contains(&c));
        assert!(metrics["ci"]["c_index"].is_array(), "{metrics:#}");
        assert!(metrics["n_events"].as_u64().unwrap() > 0);
        let report = json(&point.join("run.json"));
        let warned = serde_json::to_string(&stage(&report, "sample")["warnings"]).unwrap();
        assert!(
            warned.contains("surv_179") && warned.contains("`time`"),
            "{warned}"
        );
        let log = json(&point.join("train_log.json"));
        assert_eq!(log["task"], "survival");
    }
    let results = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(results.contains("stratified by event"), "{results}");
    let report = common::tessera_with(&["report", out.to_str().unwrap()]);
    assert!(report.ok(), "{report:?}");
    assert!(out.join("figures/kaplan_meier.png").exists(), "{report:?}");
    assert!(out.join("figures/kaplan_meier.svg").exists());
    assert!(!out.join("figures/roc.png").exists());
}

#[test]
fn cox_survival_and_huber_regression_train_and_evaluate() {
    let dir = TempDir::new().unwrap();
    let dataset = subset(dir.path(), "survival", 40, &[]);
    let exp = experiment(
        dir.path(),
        "survival",
        &dataset,
        "pooling: mean, epochs: 3, survival_loss: cox, batch_size: 8, monitor: val_c_index",
        "",
    );
    let out = dir.path().join("cox");
    let (ran, report) = run(&exp, &out, &[]);
    assert!(ran.ok(), "{ran:?}");
    assert!(report.is_some());
    let metrics = json(&out.join("metrics.json"));
    assert!(metrics["c_index"].is_number(), "{metrics:#}");
    // The checkpoint names the model's one output, so heatmaps call their score `risk`.
    let meta = json(&out.join("checkpoints/best.json"));
    assert_eq!(meta["classes"], serde_json::json!(["risk"]), "{meta:#}");
    let heatmap = write_yaml(
        dir.path(),
        "heatmap.yaml",
        &format!(
            "name: h\ncache_dir: {cache}\ndataset: {dataset}\ntask: survival\nstages:\n  \
             features: {{kind: features, params: {{path: {features}}}}}\n  \
             heatmap: {{kind: heatmap, inputs: [features], params: {{checkpoint: {ckpt}, thumbnail_size: 120}}}}\n",
            cache = dir.path().join("cache").display(),
            dataset = dataset.display(),
            features = example("survival").join("features.parquet").display(),
            ckpt = out.display(),
        ),
    );
    let (ran_heatmap, _) = run(&heatmap, &dir.path().join("heat"), &[]);
    assert!(ran_heatmap.ok(), "{ran_heatmap:?}");
    assert!(
        dir.path().join("heat/heatmaps/surv_000.parquet").exists(),
        "{ran_heatmap:?}"
    );
    // A single run prints its metrics as a one-row table with the survival columns.
    assert!(ran.stdout.contains("| C-index |"), "{ran:?}");

    let reg = TempDir::new().unwrap();
    let dataset = subset(reg.path(), "regression", 40, &[]);
    let exp = experiment(
        reg.path(),
        "regression",
        &dataset,
        "pooling: sparseconvmil, epochs: 3, regression_loss: huber",
        "",
    );
    let out = reg.path().join("out");
    let (ran, _) = run(&exp, &out, &[]);
    assert!(ran.ok(), "{ran:?}");
    let metrics = json(&out.join("metrics.json"));
    assert_eq!(metrics["task"], "regression");
    for m in ["mae", "rmse", "pearson", "spearman", "r2"] {
        assert!(metrics[m].is_number(), "{m}: {metrics:#}");
        assert!(metrics["ci"][m].is_array(), "{m}: {metrics:#}");
    }
    // The predictions carry the target and the prediction in its unit.
    let file = std::fs::File::open(out.join("predictions.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batch = reader.into_iter().next().unwrap().unwrap();
    let target = batch.column_by_name("target").unwrap();
    let value = batch.column_by_name("predicted_value").unwrap();
    assert_eq!(target.null_count(), 0);
    assert_eq!(value.null_count(), 0);
}

#[test]
fn dataset_csv_errors_name_the_file_and_the_line() {
    let dir = TempDir::new().unwrap();
    let cases: [(&str, &str, &str, &[&str]); 5] = [
        (
            "survival",
            "slide_id,time\na,3\n",
            "task survival needs a `event` column",
            &["dataset.csv"],
        ),
        (
            "survival",
            "slide_id,time,event\na,3,1\nb,soon,0\n",
            "`time` `soon` is not a number",
            &["dataset.csv, line 3", "`b`"],
        ),
        (
            "survival",
            "slide_id,time,event\na,3,1\nb,4,yes\n",
            "`event` `yes` is not 0 (censored) or 1",
            &["line 3"],
        ),
        (
            "regression",
            "slide_id,label\na,x\n",
            "task regression needs a `target` column",
            &["dataset.csv"],
        ),
        (
            "regression",
            "slide_id,target\na,1\nb,2\nc,high\n",
            "`target` `high` is not a number",
            &["line 4", "`c`"],
        ),
    ];
    for (task, csv, message, also) in cases {
        let dataset = dir.path().join("dataset.csv");
        std::fs::write(&dataset, csv).unwrap();
        let exp = experiment(dir.path(), task, &dataset, "epochs: 1", "");
        let ran = validate(&exp);
        assert_eq!(ran.code, Some(2), "{ran:?}");
        assert!(ran.stderr.contains(message), "{message}: {ran:?}");
        for a in also {
            assert!(ran.stderr.contains(a), "{a}: {ran:?}");
        }
    }
    // A slide without a value is not an error: it is reported with its line.
    let dataset = dir.path().join("dataset.csv");
    std::fs::write(&dataset, "slide_id,time,event\na,3,1\nb,,0\nc,5,0\n").unwrap();
    let exp = experiment(dir.path(), "survival", &dataset, "epochs: 1", "");
    let ran = validate(&exp);
    assert!(ran.ok(), "{ran:?}");
    assert!(
        ran.stderr.contains("line 3: slide `b` has no `time`"),
        "{ran:?}"
    );
    // Task-dependent train parameters are checked too.
    std::fs::write(&dataset, "slide_id,target\na,1\nb,2\n").unwrap();
    let exp = experiment(dir.path(), "regression", &dataset, "monitor: val_auc", "");
    let (ran, _) = run(&exp, &dir.path().join("o"), &[]);
    assert!(!ran.ok());
    assert!(
        ran.stderr
            .contains("`monitor: val_auc` is for `task: classification`"),
        "{ran:?}"
    );
}
