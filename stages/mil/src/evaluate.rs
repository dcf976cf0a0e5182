//! The `evaluate` stage: per-split metrics of the predictions, written to the run's output
//! folder as `metrics.json` (test metrics at the top level, every split under its name) and
//! the per-slide predictions as `predictions.parquet`.

use crate::error::MilError;
use crate::metrics::ClassificationMetrics;
use crate::predictions::{from_batch, predictions_schema, to_batch, Prediction};
use crate::splits::{classes, Split};
use arrow::datatypes::{DataType, SchemaRef};
use parquet::arrow::ArrowWriter;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tessera_pipeline::{
    BuildContext, Column, InputSpec, ParamIssue, SlideHandle, Stage, StageContext, StageError,
    StageKind, StageResult,
};

/// Parameters of the `evaluate` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateParams {
    /// Name of the metrics file, in the run's output folder.
    pub metrics_file: String,
    /// Name of the per-slide predictions file (Parquet), in the run's output folder.
    pub predictions_file: String,
}

impl Default for EvaluateParams {
    fn default() -> Self {
        EvaluateParams {
            metrics_file: "metrics.json".into(),
            predictions_file: "predictions.parquet".into(),
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
    let labels: Vec<usize> = rows.iter().map(|p| p.label_index).collect();
    let predicted: Vec<usize> = rows.iter().map(|p| p.predicted_index).collect();
    let probs: Vec<f32> = rows.iter().flat_map(|p| p.probs.iter().copied()).collect();
    ClassificationMetrics::compute(&labels, &predicted, &probs, n_classes)
}

/// The content of `metrics.json`: every split present under its name, and the metrics of the
/// test split (else validation, else training; named by `split`) at the top level.
pub fn metrics_report(predictions: &[Prediction], classes: &[String]) -> Result<Value, MilError> {
    for p in predictions {
        check(p, classes)?;
    }
    let mut report = Map::new();
    let mut top: Option<(Split, Value)> = None;
    for split in REPORTED {
        let rows: Vec<&Prediction> = predictions
            .iter()
            .filter(|p| Split::parse(&p.split) == Some(split))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let json = split_metrics(&rows, classes.len())?.to_json(classes);
        if top.is_none() {
            top = Some((split, json.clone()));
        }
        report.insert(split.as_str().to_string(), json);
    }
    let Some((split, Value::Object(top))) = top else {
        return Ok(json!({ "n": 0, "classes": classes }));
    };
    let mut out = top;
    out.insert("split".into(), json!(split.as_str()));
    out.extend(report);
    Ok(Value::Object(out))
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
    format!(
        "{} n={}: balanced_accuracy={} auc={} f1={} precision={} recall={} cross_entropy={}",
        metrics
            .get("split")
            .and_then(Value::as_str)
            .unwrap_or("none"),
        metrics.get("n").and_then(Value::as_u64).unwrap_or(0),
        number("balanced_accuracy"),
        number("auc"),
        number("f1"),
        number("precision"),
        number("recall"),
        number("cross_entropy"),
    )
}

impl StageKind for EvaluateParams {
    const KIND: &'static str = "evaluate";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "Balanced accuracy, macro precision/recall/F1/AUC and cross-entropy per split; writes metrics.json and predictions.parquet";

    fn input_spec(&self) -> InputSpec {
        let list = predictions_schema()
            .field_with_name("probs")
            .map(|f| f.data_type().clone());
        InputSpec::Tables(vec![vec![
            Column::exact("slide_id", DataType::Utf8),
            Column::exact("split", DataType::Utf8),
            Column::exact("label", DataType::Utf8),
            Column::exact("label_index", DataType::Int64),
            Column::exact("predicted_index", DataType::Int64),
            Column::exact("predicted", DataType::Utf8),
            match list {
                Ok(ty) => Column::exact("probs", ty),
                Err(_) => Column::any("probs"),
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
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(Box::new(EvaluateStage {
            params: self.clone(),
            classes: classes(&ctx.slides),
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
            check(&p, &self.classes)?;
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
        let metrics = metrics_report(&rows, &self.classes)?;
        let out = ctx.out_dir().to_path_buf();
        write_outputs(
            &metrics,
            &rows,
            &out.join(&self.params.metrics_file),
            &out.join(&self.params.predictions_file),
        )?;
        tracing::info!(stage = %ctx.stage_name(), "{}", summary(&metrics));
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

    #[test]
    fn report_has_test_metrics_on_top_and_every_split() {
        let report = metrics_report(&sample(), &classes()).unwrap();
        for key in [
            "balanced_accuracy",
            "precision",
            "recall",
            "f1",
            "auc",
            "cross_entropy",
            "confusion_matrix",
            "classes",
            "n",
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
    }

    #[test]
    fn inconsistent_predictions_name_the_slide() {
        let mut rows = sample();
        rows[1].label_index = 0;
        let err = metrics_report(&rows, &classes()).unwrap_err().to_string();
        assert!(err.contains("`t2`") && err.contains("label_index"), "{err}");
    }

    #[test]
    fn writes_metrics_and_predictions_files() {
        let dir = tempfile::tempdir().unwrap();
        let rows = sample();
        let report = metrics_report(&rows, &classes()).unwrap();
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
        assert!(summary(&report).starts_with("test n=3: balanced_accuracy=0.7500 auc=1.0000"));
    }

    #[test]
    fn no_predictions_give_an_empty_report() {
        let report = metrics_report(&[], &classes()).unwrap();
        assert_eq!(report["n"], 0);
    }
}
