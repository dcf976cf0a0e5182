//! What the results table reads from a run's folder besides `metrics.json`: the per-slide
//! predictions (`predictions.parquet`, for the pooled confidence intervals and the paired
//! tests) and the trainable parameter counts (`train_log.json`'s `parameters`).

use crate::error::ReportError;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, Float64Type, Int64Type};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The per-slide predictions file each run's `evaluate` stage writes.
pub const PREDICTIONS_FILE: &str = "predictions.parquet";
/// The training log of each run's `train` stage.
pub const TRAIN_LOG_FILE: &str = "train_log.json";

/// Trainable parameters of a run's model by part (`train_log.json`'s `parameters`), so the
/// table shows whether a better model is only a bigger one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct Parameters {
    pub encoder: u64,
    pub pooling: u64,
    pub head: u64,
    pub embedder: u64,
    pub total: u64,
}

/// The parameter counts in `run_dir/train_log.json`; `None` without the file or the key.
pub fn read_parameters(run_dir: &Path) -> Result<Option<Parameters>, ReportError> {
    let path = run_dir.join(TRAIN_LOG_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ReportError::io(&path, e))?;
    let log: Value = serde_json::from_str(&text).map_err(|source| ReportError::Json {
        path: path.clone(),
        source,
    })?;
    match log.get("parameters") {
        None | Some(Value::Null) => Ok(None),
        Some(p) => serde_json::from_value(p.clone())
            .map(Some)
            .map_err(|source| ReportError::Json { path, source }),
    }
}

/// One slide's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionRow {
    pub slide_id: String,
    pub split: String,
    pub label_index: usize,
    pub predicted_index: usize,
    /// Class probabilities in class order (survival / regression: the raw outputs).
    pub probs: Vec<f32>,
    /// Survival: time, event and predicted risk (`None` for the other tasks).
    pub survival: Option<(f64, bool, f64)>,
    /// Regression: true and predicted value.
    pub regression: Option<(f64, f64)>,
}

/// Every row of a predictions file (columns `slide_id`, `split`, `label_index`,
/// `predicted_index`, `probs`).
pub fn read_predictions(path: &Path) -> Result<Vec<PredictionRow>, ReportError> {
    let bad = |message: String| ReportError::Table {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| ReportError::io(path, e))?;
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| bad(format!("no `{name}` column")))
        };
        let text = |name: &str| {
            column(name)?
                .as_string_opt::<i32>()
                .ok_or_else(|| bad(format!("`{name}` is not Utf8")))
        };
        let index = |name: &str| {
            column(name)?
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| bad(format!("`{name}` is not Int64")))
        };
        let (slide_id, split) = (text("slide_id")?, text("split")?);
        let (label, predicted) = (index("label_index")?, index("predicted_index")?);
        let probs = column("probs")?
            .as_list_opt::<i32>()
            .ok_or_else(|| bad("`probs` is not a list".into()))?;
        // Optional columns: survival and regression runs (and none in older files).
        let float = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Float64Type>().cloned())
        };
        let (time, risk, target, value) = (
            float("time"),
            float("risk"),
            float("target"),
            float("predicted_value"),
        );
        let event = batch
            .column_by_name("event")
            .and_then(|c| c.as_boolean_opt().cloned());
        let at = |a: &Option<arrow::array::Float64Array>, row: usize| {
            a.as_ref().filter(|a| a.is_valid(row)).map(|a| a.value(row))
        };
        for row in 0..batch.num_rows() {
            let cells = [
                slide_id.is_null(row),
                split.is_null(row),
                label.is_null(row),
                predicted.is_null(row),
                probs.is_null(row),
            ];
            if cells.iter().any(|&null| null) {
                return Err(bad(format!("a null value in row {row}")));
            }
            let p = probs.value(row);
            let p = p
                .as_primitive_opt::<Float32Type>()
                .ok_or_else(|| bad("`probs` items are not Float32".into()))?;
            let class = |v: i64, name: &str| {
                usize::try_from(v).map_err(|_| bad(format!("negative `{name}` {v} in row {row}")))
            };
            rows.push(PredictionRow {
                slide_id: slide_id.value(row).to_string(),
                split: split.value(row).to_string(),
                label_index: class(label.value(row), "label_index")?,
                predicted_index: class(predicted.value(row), "predicted_index")?,
                probs: p.values().to_vec(),
                survival: match (
                    at(&time, row),
                    event
                        .as_ref()
                        .filter(|e| e.is_valid(row))
                        .map(|e| e.value(row)),
                    at(&risk, row),
                ) {
                    (Some(t), Some(e), Some(r)) => Some((t, e, r)),
                    _ => None,
                },
                regression: at(&target, row).zip(at(&value, row)),
            });
        }
    }
    Ok(rows)
}

/// The rows of the split the table reports: `test`, else `val` (as `metrics.json`'s top level).
pub fn evaluated_rows(rows: Vec<PredictionRow>) -> Vec<PredictionRow> {
    let has_test = rows.iter().any(|r| r.split == "test");
    let split = if has_test { "test" } else { "val" };
    rows.into_iter().filter(|r| r.split == split).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Float32Builder, Int64Array, ListBuilder, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    /// Writes `dir/predictions.parquet` with the columns `evaluate` writes (binary classes
    /// `a`, `b`): (slide id, split, label index, probability of `b`).
    pub(crate) fn write_predictions(dir: &Path, rows: &[(&str, &str, i64, f32)]) {
        std::fs::create_dir_all(dir).unwrap();
        let mut probs = ListBuilder::new(Float32Builder::new());
        for r in rows {
            probs.values().append_value(1.0 - r.3);
            probs.values().append_value(r.3);
            probs.append(true);
        }
        let name = |l: i64| if l == 1 { "b" } else { "a" };
        let schema = Arc::new(Schema::new(vec![
            Field::new("slide_id", DataType::Utf8, false),
            Field::new("split", DataType::Utf8, false),
            Field::new("label", DataType::Utf8, false),
            Field::new("label_index", DataType::Int64, false),
            Field::new("predicted_index", DataType::Int64, false),
            Field::new("predicted", DataType::Utf8, false),
            Field::new(
                "probs",
                DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
                false,
            ),
        ]));
        let predicted: Vec<i64> = rows.iter().map(|r| i64::from(r.3 > 0.5)).collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| name(r.2)).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(predicted.clone())),
            Arc::new(StringArray::from(
                predicted.iter().map(|&p| name(p)).collect::<Vec<_>>(),
            )),
            Arc::new(probs.finish()),
        ];
        let batch = arrow::record_batch::RecordBatch::try_new(schema.clone(), cols).unwrap();
        let f = std::fs::File::create(dir.join(PREDICTIONS_FILE)).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn reads_predictions_and_picks_the_test_split() {
        let dir = tempfile::tempdir().unwrap();
        write_predictions(
            dir.path(),
            &[
                ("v1", "val", 0, 0.2),
                ("t1", "test", 1, 0.7),
                ("t2", "test", 0, 0.6),
            ],
        );
        let rows = read_predictions(&dir.path().join(PREDICTIONS_FILE)).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].probs, vec![1.0 - 0.7f32, 0.7]);
        assert_eq!(rows[2].predicted_index, 1);
        let test = evaluated_rows(rows.clone());
        assert_eq!(
            test.iter().map(|r| r.slide_id.as_str()).collect::<Vec<_>>(),
            ["t1", "t2"]
        );
        let val = evaluated_rows(rows.into_iter().filter(|r| r.split == "val").collect());
        assert_eq!(val.len(), 1);
    }

    #[test]
    fn parameters_come_from_the_train_log_when_it_has_them() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_parameters(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(TRAIN_LOG_FILE), r#"{"epochs": []}"#).unwrap();
        assert_eq!(read_parameters(dir.path()).unwrap(), None);
        std::fs::write(
            dir.path().join(TRAIN_LOG_FILE),
            r#"{"parameters": {"encoder": 10, "pooling": 20, "head": 3, "embedder": 0, "total": 33}}"#,
        )
        .unwrap();
        let p = read_parameters(dir.path()).unwrap().unwrap();
        assert_eq!((p.encoder, p.pooling, p.head, p.total), (10, 20, 3, 33));
        std::fs::write(dir.path().join(TRAIN_LOG_FILE), "{").unwrap();
        let err = read_parameters(dir.path()).unwrap_err().to_string();
        assert!(err.contains(TRAIN_LOG_FILE), "{err}");
    }
}
