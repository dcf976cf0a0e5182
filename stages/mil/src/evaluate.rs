//! The `evaluate` stage: per-split metrics of the predictions with their bootstrap confidence
//! intervals, written to the run's output folder as `metrics.json` (test metrics at the top
//! level, every split under its name), and the per-slide predictions as `predictions.parquet`.

use crate::error::MilError;
use crate::metrics::{ClassificationMetrics, Evaluator, Metric};
use crate::predictions::{
    from_batch, predictions_schema, to_batch, Prediction, LABEL_INDEX, PREDICTED, PREDICTED_INDEX,
    PROBS,
};
use crate::sample::{LABEL, SPLIT};
use crate::splits::{task_classes, Split};
use crate::task_metrics::{task_metrics_report, task_summary};
use arrow::datatypes::{DataType, SchemaRef};
use parquet::arrow::ArrowWriter;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tessera_pipeline::schema::SLIDE_ID;
use tessera_pipeline::{
    BuildContext, Column, InputSpec, ParamIssue, SlideHandle, Stage, StageContext, StageError,
    StageKind, StageResult,
};
use tessera_pipeline::{SlideTarget, Task};
use tessera_stats::Outcome;
use tessera_stats::{confidence_intervals, BootstrapConfig, Clusters};

/// Parameters of the `evaluate` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateParams {
    /// Name of the metrics file, in the run's output folder.
    pub metrics_file: String,
    /// Name of the per-slide predictions file (Parquet), in the run's output folder.
    pub predictions_file: String,
    /// Bootstrap resamples for the confidence intervals of every split's metrics (slides drawn
    /// with replacement within each class, seeded by the experiment's seed); 0 computes none.
    pub bootstrap: usize,
    /// Coverage of the confidence intervals (percentile intervals of the resamples).
    pub ci_level: f64,
}

impl Default for EvaluateParams {
    fn default() -> Self {
        EvaluateParams {
            metrics_file: "metrics.json".into(),
            predictions_file: "predictions.parquet".into(),
            bootstrap: 1000,
            ci_level: 0.95,
        }
    }
}

/// Fewer resamples than this give percentile bounds that move with the seed more than the
/// intervals are wide apart.
pub const MIN_RESAMPLES: usize = 100;

impl EvaluateParams {
    /// The bootstrap with the experiment's `seed` (`resamples` 0 when `bootstrap: 0`).
    pub fn bootstrap_config(&self, seed: u64) -> BootstrapConfig {
        BootstrapConfig {
            resamples: self.bootstrap,
            level: self.ci_level,
            seed,
        }
    }
}

/// Splits reported, in order of preference for the top level.
const REPORTED: [Split; 3] = [Split::Test, Split::Val, Split::Train];

/// Checks a prediction against the class list, naming the slide when it does not fit.
fn check(p: &Prediction, classes: &[String]) -> Result<(), MilError> {
    let bad = |message: String| MilError::Prediction {
        slide: p.slide_id.clone(),
        message,
    };
    if p.probs.len() != classes.len() {
        return Err(bad(format!(
            "{} probabilities for {} classes {classes:?}",
            p.probs.len(),
            classes.len()
        )));
    }
    if classes.get(p.label_index) != Some(&p.label) {
        return Err(bad(format!(
            "label_index {} does not match label `{}` in the classes {classes:?}",
            p.label_index, p.label
        )));
    }
    if p.predicted_index >= classes.len() {
        return Err(bad(format!(
            "predicted_index {} with {} classes",
            p.predicted_index,
            classes.len()
        )));
    }
    Ok(())
}

/// The metrics of one split's predictions.
pub fn split_metrics(
    rows: &[&Prediction],
    n_classes: usize,
) -> Result<ClassificationMetrics, MilError> {
    Ok(ClassificationMetrics::of(&split_evaluator(
        rows, n_classes,
    )?))
}

/// One split's predictions, checked and ranked once for the metrics and the bootstrap.
fn split_evaluator(rows: &[&Prediction], n_classes: usize) -> Result<Evaluator, MilError> {
    let labels: Vec<usize> = rows.iter().map(|p| p.label_index).collect();
    let predicted: Vec<usize> = rows.iter().map(|p| p.predicted_index).collect();
    let probs: Vec<f32> = rows.iter().flat_map(|p| p.probs.iter().copied()).collect();
    Evaluator::new(&labels, &predicted, &probs, n_classes)
        .map_err(|e| MilError::Metrics(e.to_string()))
}

/// `metrics.json`'s content and what the run report should warn about.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsReport {
    pub json: Value,
    /// One message per split with metrics whose confidence interval is undefined.
    pub warnings: Vec<String>,
}

/// The `bootstrap` entry of a split (also written with 0 resamples, so readers of
/// metrics.json such as the results table know the intervals were turned off).
fn bootstrap_json(config: &BootstrapConfig) -> Value {
    json!({
        "resamples": config.resamples,
        "level": config.level,
        "seed": config.seed,
        "stratified": true,
    })
}

/// The `ci` entry of one split, and the warning when some interval is undefined.
fn split_intervals(
    evaluator: &Evaluator,
    split: Split,
    classes: &[String],
    config: &BootstrapConfig,
) -> Result<(Value, Option<String>), MilError> {
    let clusters = Clusters::units(evaluator.labels());
    let intervals = confidence_intervals(evaluator, &clusters, config)
        .map_err(|e| MilError::Metrics(e.to_string()))?;
    let ci: Map<String, Value> = Metric::ALL
        .iter()
        .map(|&m| {
            (
                m.name().to_string(),
                json!(intervals.get(m).map(|(lo, hi)| [lo, hi])),
            )
        })
        .collect();
    let undefined = intervals.undefined();
    let warning = (!undefined.is_empty()).then(|| {
        let mut present: Vec<&str> = evaluator
            .labels()
            .iter()
            .filter_map(|&l| classes.get(l).map(String::as_str))
            .collect();
        present.sort_unstable();
        present.dedup();
        let why = match present.as_slice() {
            [one] => format!("the split holds one class, `{one}`"),
            _ => "they are undefined in some resamples".to_string(),
        };
        format!(
            "`evaluate` parameter `bootstrap`: no confidence interval for {} of the {} split (null in metrics.json): {why}",
            undefined.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
            split.as_str(),
        )
    });
    Ok((Value::Object(ci), warning))
}

/// The content of `metrics.json`: every split present under its name, and the metrics of the
/// test split (else validation, else training; named by `split`) at the top level. Given a
/// bootstrap, every split also has `bootstrap: {resamples, level, seed, stratified}` and, with
/// resamples, `ci: {metric: [low, high] | null}`.
pub fn metrics_report(
    predictions: &[Prediction],
    classes: &[String],
    bootstrap: Option<&BootstrapConfig>,
) -> Result<MetricsReport, MilError> {
    for p in predictions {
        check(p, classes)?;
    }
    let mut report = Map::new();
    let mut warnings = Vec::new();
    let mut top: Option<(Split, Value)> = None;
    for split in REPORTED {
        let rows: Vec<&Prediction> = predictions
            .iter()
            .filter(|p| Split::parse(&p.split) == Some(split))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let evaluator = split_evaluator(&rows, classes.len())?;
        let mut json = ClassificationMetrics::of(&evaluator).to_json(classes);
        if let (Some(config), Value::Object(json)) = (bootstrap, &mut json) {
            if config.resamples > 0 {
                let (ci, warning) = split_intervals(&evaluator, split, classes, config)?;
                json.insert("ci".into(), ci);
                warnings.extend(warning);
            }
            json.insert("bootstrap".into(), bootstrap_json(config));
        }
        if top.is_none() {
            top = Some((split, json.clone()));
        }
        report.insert(split.as_str().to_string(), json);
    }
    let Some((split, Value::Object(top))) = top else {
        return Ok(MetricsReport {
            json: json!({ "n": 0, "classes": classes }),
            warnings,
        });
    };
    let mut out = top;
    out.insert("split".into(), json!(split.as_str()));
    out.extend(report);
    Ok(MetricsReport {
        json: Value::Object(out),
        warnings,
    })
}

/// Writes through a temporary file renamed at the end, so a reader never sees half a file.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<(), MilError>,
) -> Result<(), MilError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| MilError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| failed(e.into()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| failed(e.into()))?;
    write(&mut file)?;
    file.sync_all().map_err(|e| failed(e.into()))?;
    std::fs::rename(&tmp, path).map_err(|e| failed(e.into()))
}

/// Writes `metrics.json` and the predictions Parquet file.
pub fn write_outputs(
    metrics: &Value,
    predictions: &[Prediction],
    metrics_path: &Path,
    predictions_path: &Path,
) -> Result<(), MilError> {
    write_atomically(metrics_path, |file| {
        serde_json::to_writer_pretty(file, metrics).map_err(|e| MilError::Write {
            path: metrics_path.display().to_string(),
            source: e.into(),
        })
    })?;
    let batch = to_batch(predictions)?;
    write_atomically(predictions_path, |file| {
        let failed = |e: parquet::errors::ParquetError| MilError::Write {
            path: predictions_path.display().to_string(),
            source: e.into(),
        };
        let mut writer = ArrowWriter::try_new(file, batch.schema(), None).map_err(failed)?;
        writer.write(&batch).map_err(failed)?;
        writer.close().map_err(failed)?;
        Ok(())
    })
}

/// A one-line summary of the top-level metrics, for the log.
pub fn summary(metrics: &Value) -> String {
    let number = |k: &str| {
        metrics
            .get(k)
            .and_then(Value::as_f64)
            .map_or("n/a".to_string(), |v| format!("{v:.4}"))
    };
    let intervals: Vec<String> = ["balanced_accuracy", "auc"]
        .iter()
        .filter_map(|k| {
            let ci = metrics.get("ci")?.get(k)?.as_array()?;
            let (lo, hi) = (ci.first()?.as_f64()?, ci.get(1)?.as_f64()?);
            Some(format!("{k} [{lo:.4}, {hi:.4}]"))
        })
        .collect();
    let level = metrics
        .get("bootstrap")
        .and_then(|b| b.get("level"))
        .and_then(Value::as_f64);
    format!(
        "{} n={}: balanced_accuracy={} auc={} auprc={} f1={} precision={} recall={} cross_entropy={}{}",
        metrics
            .get("split")
            .and_then(Value::as_str)
            .unwrap_or("none"),
        metrics.get("n").and_then(Value::as_u64).unwrap_or(0),
        number("balanced_accuracy"),
        number("auc"),
        number("auprc"),
        number("f1"),
        number("precision"),
        number("recall"),
        number("cross_entropy"),
        match (level, intervals.is_empty()) {
            (Some(level), false) =>
                format!(
                    " ({}% CI: {})",
                    (level * 1e4).round() / 1e2,
                    intervals.join(", ")
                ),
            _ => String::new(),
        }
    )
}

impl StageKind for EvaluateParams {
    const KIND: &'static str = "evaluate";
    const VERSION: &'static str = "2";
    const ABOUT: &'static str =
        "Balanced accuracy, macro precision/recall/F1/AUC/AUPRC, cross-entropy and per-class metrics per split (survival: Harrell's/Uno's C-index, log-rank p of the median risk split; regression: MAE, RMSE, Pearson, Spearman, R^2), with stratified bootstrap CIs; writes metrics.json and predictions.parquet";

    fn input_spec(&self) -> InputSpec {
        let list = predictions_schema()
            .field_with_name(PROBS)
            .map(|f| f.data_type().clone());
        InputSpec::Tables(vec![vec![
            Column::exact(SLIDE_ID, DataType::Utf8),
            Column::exact(SPLIT, DataType::Utf8),
            Column::exact(LABEL, DataType::Utf8),
            Column::exact(LABEL_INDEX, DataType::Int64),
            Column::exact(PREDICTED_INDEX, DataType::Int64),
            Column::exact(PREDICTED, DataType::Utf8),
            match list {
                Ok(ty) => Column::exact(PROBS, ty),
                Err(_) => Column::any(PROBS),
            },
        ]])
    }

    /// Passes the predictions through, for writers downstream.
    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        inputs
            .first()
            .cloned()
            .ok_or_else(|| StageError::msg("evaluate needs one input"))
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        for (field, name) in [
            ("metrics_file", &self.metrics_file),
            ("predictions_file", &self.predictions_file),
        ] {
            if name.trim().is_empty() {
                return Err(ParamIssue::new(field, "must not be empty"));
            }
        }
        if self.bootstrap > 0 && self.bootstrap < MIN_RESAMPLES {
            return Err(ParamIssue::new(
                "bootstrap",
                format!(
                    "{} resamples give unstable interval bounds: use at least {MIN_RESAMPLES} (1000 is usual), or 0 for no confidence intervals",
                    self.bootstrap
                ),
            ));
        }
        if !(self.ci_level > 0.0 && self.ci_level < 1.0) {
            return Err(ParamIssue::new(
                "ci_level",
                format!(
                    "{} is not a coverage strictly between 0 and 1 (e.g. 0.95 for 95% intervals)",
                    self.ci_level
                ),
            ));
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        // Uno's C-index estimates the censoring distribution on the whole cohort.
        let reference: Vec<Outcome> = ctx
            .slides
            .iter()
            .filter_map(|s| match tessera_pipeline::slide_target(ctx.task, s) {
                Some(SlideTarget::Survival { time, event }) => Some(Outcome { time, event }),
                _ => None,
            })
            .collect();
        Ok(Box::new(EvaluateStage {
            params: self.clone(),
            seed: ctx.seed,
            task: ctx.task,
            reference,
            classes: task_classes(ctx.task, &ctx.slides),
            predictions: BTreeMap::new(),
            replaced: 0,
        }))
    }

    /// Needs every prediction at once.
    fn parallel(&self) -> bool {
        false
    }

    fn cacheable(&self) -> bool {
        false
    }
}

/// The running `evaluate` stage.
struct EvaluateStage {
    params: EvaluateParams,
    /// The experiment's seed, which seeds the bootstrap.
    seed: u64,
    /// The experiment's task, and (survival) every slide's outcome.
    task: Task,
    reference: Vec<Outcome>,
    classes: Vec<String>,
    /// The latest prediction of every slide.
    predictions: BTreeMap<String, Prediction>,
    /// Predictions superseded by a later one for the same slide.
    replaced: usize,
}

impl Stage for EvaluateStage {
    fn on_batch(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
        batch: arrow::record_batch::RecordBatch,
    ) -> StageResult {
        for p in from_batch(&batch)? {
            if self.task == Task::Classification {
                check(&p, &self.classes)?;
            }
            if self.predictions.insert(p.slide_id.clone(), p).is_some() {
                self.replaced += 1;
            }
        }
        ctx.emit(slide, batch)
    }

    fn finish(&mut self, ctx: &mut StageContext) -> StageResult {
        if self.replaced > 0 {
            tracing::info!(stage = %ctx.stage_name(), "{} earlier predictions replaced by later ones for the same slide", self.replaced);
        }
        let mut rows: Vec<Prediction> = self.predictions.values().cloned().collect();
        rows.sort_by_key(|p| (Split::parse(&p.split), p.slide_id.clone()));
        if rows.is_empty() {
            ctx.warn(
                None,
                "no predictions reached `evaluate`: metrics.json has no metrics",
            );
        }
        let bootstrap = self.params.bootstrap_config(self.seed);
        let MetricsReport {
            json: metrics,
            warnings,
        } = match self.task {
            Task::Classification => metrics_report(&rows, &self.classes, Some(&bootstrap))?,
            task => task_metrics_report(task, &rows, Some(&self.reference), Some(&bootstrap))?,
        };
        for warning in warnings {
            ctx.warn(None, warning);
        }
        let out = ctx.out_dir().to_path_buf();
        write_outputs(
            &metrics,
            &rows,
            &out.join(&self.params.metrics_file),
            &out.join(&self.params.predictions_file),
        )?;
        let line = match self.task {
            Task::Classification => summary(&metrics),
            _ => task_summary(&metrics),
        };
        tracing::info!(stage = %ctx.stage_name(), "{line}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn classes() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn p(id: &str, split: &str, label: &str, probs: [f32; 2]) -> Prediction {
        Prediction::from_probs(id, split, label, &classes(), probs.to_vec()).unwrap()
    }

    fn sample() -> Vec<Prediction> {
        vec![
            p("t1", "test", "a", [0.9, 0.1]),
            p("t2", "test", "b", [0.3, 0.7]),
            p("t3", "test", "b", [0.6, 0.4]),
            p("v1", "val", "a", [0.2, 0.8]),
            p("v2", "val", "b", [0.1, 0.9]),
        ]
    }

    fn config(seed: u64) -> BootstrapConfig {
        BootstrapConfig {
            resamples: 1000,
            level: 0.95,
            seed,
        }
    }

    #[test]
    fn report_has_test_metrics_on_top_and_every_split() {
        let report = metrics_report(&sample(), &classes(), None).unwrap().json;
        for key in [
            "balanced_accuracy",
            "precision",
            "recall",
            "f1",
            "auc",
            "auprc",
            "cross_entropy",
            "confusion_matrix",
            "classes",
            "n",
            "per_class",
        ] {
            assert!(report.get(key).is_some(), "missing {key}");
        }
        assert_eq!(report["split"], "test");
        assert_eq!(report["n"], 3);
        // Test: recalls a 1/1, b 1/2 -> 0.75; AUC: b-scores pos {0.7, 0.4} vs neg {0.1} -> 1.
        assert!((report["balanced_accuracy"].as_f64().unwrap() - 0.75).abs() < 1e-9);
        assert!((report["auc"].as_f64().unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(report["confusion_matrix"], json!([[1, 0], [1, 1]]));
        assert_eq!(report["test"]["n"], 3);
        assert_eq!(report["val"]["n"], 2);
        assert!((report["val"]["balanced_accuracy"].as_f64().unwrap() - 0.5).abs() < 1e-9);
        assert!(report.get("train").is_none());
        // b-scores of the test split: 0.7 pos, 0.4 pos, 0.1 neg -> AP(b) = 1; a-scores: 0.9 pos
        // first -> AP(a) = 1.
        assert!((report["auprc"].as_f64().unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(report["per_class"]["b"]["support"], 2);
        assert!((report["per_class"]["b"]["recall"].as_f64().unwrap() - 0.5).abs() < 1e-9);
        assert!(report.get("ci").is_none(), "no bootstrap, no intervals");
    }

    /// 200 test slides, two classes, informative noisy scores.
    fn many() -> Vec<Prediction> {
        let mut state = 5u64;
        (0..200)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = (state >> 40) as f32 / (1u64 << 24) as f32;
                let label = if i % 3 == 0 { "b" } else { "a" };
                let b = (noise + if label == "b" { 0.6 } else { 0.0 }) / 1.6;
                p(&format!("s{i:03}"), "test", label, [1.0 - b, b])
            })
            .collect()
    }

    #[test]
    fn confidence_intervals_contain_the_estimates_and_repeat_with_the_seed() {
        let rows = many();
        let report = metrics_report(&rows, &classes(), Some(&config(11)))
            .unwrap()
            .json;
        assert_eq!(
            report["bootstrap"],
            json!({"resamples": 1000, "level": 0.95, "seed": 11, "stratified": true})
        );
        assert_eq!(report["ci"], report["test"]["ci"]);
        for m in Metric::ALL {
            let ci = report["ci"][m.name()].as_array().unwrap();
            let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
            let x = report[m.name()].as_f64().unwrap();
            assert!(
                lo <= x && x <= hi && lo < hi,
                "{}: {x} in [{lo}, {hi}]",
                m.name()
            );
        }
        let again = metrics_report(&rows, &classes(), Some(&config(11)))
            .unwrap()
            .json;
        assert_eq!(again["ci"], report["ci"]);
        let other = metrics_report(&rows, &classes(), Some(&config(12)))
            .unwrap()
            .json;
        assert_ne!(other["ci"]["auc"], report["ci"]["auc"]);
        assert_ne!(
            other["ci"]["balanced_accuracy"],
            report["ci"]["balanced_accuracy"]
        );
    }

    #[test]
    fn a_split_with_one_class_gets_null_ranking_intervals_and_a_warning() {
        let mut rows = sample();
        rows[3] = p("v1", "val", "b", [0.2, 0.8]);
        let report = metrics_report(&rows, &classes(), Some(&config(0))).unwrap();
        let val = &report.json["val"];
        assert!(
            val["ci"]["auc"].is_null() && val["ci"]["auprc"].is_null(),
            "{val:#}"
        );
        assert!(val["ci"]["balanced_accuracy"].is_array());
        assert!(val["auc"].is_null(), "the AUC itself is undefined");
        assert!(report.json["test"]["ci"]["auc"].is_array());
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        let w = &report.warnings[0];
        for part in [
            "`evaluate`",
            "`bootstrap`",
            "auc, auprc",
            "val split",
            "one class, `b`",
        ] {
            assert!(w.contains(part), "{part} missing from: {w}");
        }
    }

    #[test]
    fn the_stage_warns_in_run_json_and_uses_the_experiment_seed() {
        use tessera_pipeline::testing::{test_slides, Harness};
        let dir = tempfile::tempdir().unwrap();
        let mut rows = many();
        rows.push(p("v1", "val", "b", [0.3, 0.7]));
        rows.push(p("v2", "val", "b", [0.6, 0.4]));
        let specs: Vec<(&str, Option<&str>, Option<&str>)> = rows
            .iter()
            .map(|r| (r.slide_id.as_str(), None, Some(r.label.as_str())))
            .collect();
        let batches: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i, to_batch(std::slice::from_ref(r)).unwrap()))
            .collect();
        let mut h =
            Harness::new(test_slides(&specs), dir.path()).input(batches[0].1.schema(), batches);
        h.seed = 77;
        let out = h
            .run(EvaluateParams {
                bootstrap: 200,
                ..EvaluateParams::default()
            })
            .unwrap();
        let report = out.report.unwrap();
        let stage = report.stages.iter().find(|s| s.kind == "evaluate").unwrap();
        assert_eq!(stage.warnings.len(), 1, "{:?}", stage.warnings);
        assert!(stage.warnings[0].message.contains("`bootstrap`"));
        assert!(!stage.warnings[0].alert, "a warning, not an alert");
        let metrics: Value =
            serde_json::from_str(&std::fs::read_to_string(h.out_dir.join("metrics.json")).unwrap())
                .unwrap();
        assert_eq!(metrics["bootstrap"]["seed"], 77);
        assert_eq!(metrics["bootstrap"]["resamples"], 200);
        assert!(metrics["val"]["ci"]["auc"].is_null());
        assert!(metrics["ci"]["auc"].is_array());
    }

    #[test]
    fn a_thousand_slides_with_a_thousand_resamples_take_well_under_a_second() {
        let rows: Vec<Prediction> = (0..5)
            .flat_map(|_| many())
            .enumerate()
            .map(|(i, mut r)| {
                r.slide_id = format!("s{i:04}");
                r
            })
            .collect();
        assert_eq!(rows.len(), 1000);
        let start = std::time::Instant::now();
        let report = metrics_report(&rows, &classes(), Some(&config(1))).unwrap();
        let seconds = start.elapsed().as_secs_f64();
        println!("evaluate, 1000 slides x 1000 resamples: {seconds:.3} s");
        assert!(report.json["ci"]["auc"].is_array());
        // Generous for unoptimized builds on a loaded machine (release: about 0.02 s).
        assert!(seconds < 5.0, "{seconds} s");
    }

    #[test]
    fn bootstrap_and_level_are_validated_by_name() {
        let ok = EvaluateParams::default();
        assert!(ok.validate().is_ok());
        assert_eq!(ok.bootstrap_config(3).seed, 3);
        let none = EvaluateParams {
            bootstrap: 0,
            ..ok.clone()
        };
        assert!(none.validate().is_ok());
        assert_eq!(none.bootstrap_config(3).resamples, 0);
        let report = metrics_report(&sample(), &classes(), Some(&none.bootstrap_config(3)))
            .unwrap()
            .json;
        assert!(report.get("ci").is_none());
        assert_eq!(report["bootstrap"]["resamples"], 0);
        let few = EvaluateParams {
            bootstrap: 10,
            ..ok.clone()
        };
        assert_eq!(few.validate().unwrap_err().field, "bootstrap");
        for level in [0.0, 1.0, 95.0, f64::NAN] {
            let bad = EvaluateParams {
                ci_level: level,
                ..ok.clone()
            };
            assert_eq!(bad.validate().unwrap_err().field, "ci_level", "{level}");
        }
    }

    #[test]
    fn inconsistent_predictions_name_the_slide() {
        let mut rows = sample();
        rows[1].label_index = 0;
        let err = metrics_report(&rows, &classes(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`t2`") && err.contains("label_index"), "{err}");
    }

    #[test]
    fn writes_metrics_and_predictions_files() {
        let dir = tempfile::tempdir().unwrap();
        let rows = sample();
        let report = metrics_report(&rows, &classes(), Some(&config(0)))
            .unwrap()
            .json;
        let (m, pq) = (
            dir.path().join("metrics.json"),
            dir.path().join("predictions.parquet"),
        );
        write_outputs(&report, &rows, &m, &pq).unwrap();
        let read: Value = serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
        assert_eq!(read, report);
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&pq).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<_> = reader.collect::<Result<_, _>>().unwrap();
        let back: Vec<Prediction> = batches
            .iter()
            .flat_map(|b| from_batch(b).unwrap())
            .collect();
        assert_eq!(back, rows);
        let line = summary(&report);
        assert!(
            line.starts_with("test n=3: balanced_accuracy=0.7500 auc=1.0000 auprc=1.0000"),
            "{line}"
        );
        assert!(line.contains("(95% CI: balanced_accuracy ["), "{line}");
    }

    #[test]
    fn no_predictions_give_an_empty_report() {
        let report = metrics_report(&[], &classes(), Some(&config(0))).unwrap();
        assert_eq!(report.json["n"], 0);
        assert!(report.warnings.is_empty());
    }
}
