//! The results table of a sweep: one row per combination of swept parameters, every metric as
//! mean +/- std over the repeats (seeds, and folds when `*.fold` is swept), sorted by the swept
//! parameters — the layout of the paper's Table 2 (models x metrics).

use crate::error::ReportError;
use crate::record::PointRecord;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The metrics of `metrics.json` reported, in column order, with their table headers.
pub const METRICS: [(&str, &str); 6] = [
    ("balanced_accuracy", "balanced accuracy"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("f1", "F1"),
    ("auc", "AUC"),
    ("cross_entropy", "cross-entropy"),
];

/// Whether lower is better for a metric (cross-entropy); higher for the others.
pub fn lower_is_better(metric: &str) -> bool {
    metric == "cross_entropy"
}

/// True for swept keys that are repeats rather than conditions: the k-fold `fold` index.
pub fn is_repeat_key(key: &str) -> bool {
    key.rsplit('.').next() == Some("fold")
}

/// Mean and sample standard deviation of the runs that reported a metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanStd {
    pub mean: f64,
    /// Sample standard deviation (n - 1); 0 with one run.
    pub std: f64,
    /// Runs that reported the metric.
    pub n: usize,
}

impl MeanStd {
    /// `None` when no value is given.
    pub fn of(values: &[f64]) -> Option<MeanStd> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(MeanStd { mean, std, n })
    }
}

/// One row of the table: a combination of the condition parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    /// (key, value) for every condition key, in the table's key order.
    pub params: Vec<(String, Value)>,
    /// The points (folder names) aggregated in this row.
    pub points: Vec<String>,
    /// Points with a metrics.json.
    pub runs: usize,
    /// Metric name -> mean/std over the runs.
    pub metrics: BTreeMap<String, MeanStd>,
}

impl ResultRow {
    /// A short label of the row's parameters in the paper's notation, e.g.
    /// `sparseconvmil, d=8, K=100` (see [`compact`]).
    pub fn label(&self, _keys: &[String]) -> String {
        if self.params.is_empty() {
            return "run".into();
        }
        self.params
            .iter()
            .map(|(k, v)| compact(k, v))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The value of a condition key in this row.
    pub fn param(&self, key: &str) -> Option<&Value> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResultsTable {
    /// The condition keys (swept keys that are not repeats), in declaration order.
    pub keys: Vec<String>,
    pub rows: Vec<ResultRow>,
}

/// The parameter name of a key (`sparse_map.downsample` -> `downsample`).
pub fn short_key(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// One parameter in legends: the model name bare, `d` for the downsampling factor, `K` for
/// tiles per slide, else `param=value`.
pub fn compact(key: &str, v: &Value) -> String {
    let value = display_value(v);
    match short_key(key) {
        "pooling" => value,
        "downsample" => format!("d={value}"),
        "downsample_px" => format!("d={value}px"),
        "tiles_per_slide" => format!("K={value}"),
        other => format!("{other}={value}"),
    }
}

/// Strings bare, everything else as JSON.
pub fn display_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Orders values of one key: numbers ascending, then everything else in declaration order.
fn value_rank(v: &Value, declared: &[Value]) -> (u8, f64, usize) {
    match v.as_f64() {
        Some(x) => (0, x, 0),
        None => (
            1,
            0.0,
            declared.iter().position(|d| d == v).unwrap_or(usize::MAX),
        ),
    }
}

/// Groups the points by their condition parameters and aggregates the metrics of each group.
/// `keys` are the swept keys in declaration order; repeat keys (folds) are left out of the rows.
pub fn aggregate(points: &[PointRecord], keys: &[String]) -> ResultsTable {
    let keys: Vec<String> = keys.iter().filter(|k| !is_repeat_key(k)).cloned().collect();
    let mut rows: Vec<ResultRow> = Vec::new();
    let mut values: BTreeMap<usize, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for p in points {
        let params: Vec<(String, Value)> = keys
            .iter()
            .map(|k| (k.clone(), p.params.get(k).cloned().unwrap_or(Value::Null)))
            .collect();
        let i = match rows.iter().position(|r| r.params == params) {
            Some(i) => i,
            None => {
                rows.push(ResultRow {
                    params,
                    points: Vec::new(),
                    runs: 0,
                    metrics: BTreeMap::new(),
                });
                rows.len() - 1
            }
        };
        rows[i].points.push(p.name.clone());
        if let Some(m) = &p.metrics {
            rows[i].runs += 1;
            for (metric, _) in METRICS {
                if let Some(v) = m.get(metric).and_then(Value::as_f64) {
                    values
                        .entry(i)
                        .or_default()
                        .entry(metric.to_string())
                        .or_default()
                        .push(v);
                }
            }
        }
    }
    for (i, metrics) in values {
        for (metric, vs) in metrics {
            if let Some(ms) = MeanStd::of(&vs) {
                rows[i].metrics.insert(metric, ms);
            }
        }
    }
    // Declared order of each key's values, for sorting non-numeric values.
    let declared: Vec<Vec<Value>> = keys
        .iter()
        .map(|k| {
            let mut seen: Vec<Value> = Vec::new();
            for r in &rows {
                if let Some(v) = r.param(k) {
                    if !seen.contains(v) {
                        seen.push(v.clone());
                    }
                }
            }
            seen
        })
        .collect();
    rows.sort_by(|a, b| {
        for (k, decl) in keys.iter().zip(&declared) {
            let (ra, rb) = (
                a.param(k).map(|v| value_rank(v, decl)),
                b.param(k).map(|v| value_rank(v, decl)),
            );
            let ord = ra.partial_cmp(&rb).unwrap_or(std::cmp::Ordering::Equal);
            if ord != std::cmp::Ordering::Equal {
                return ord;
            }
        }
        std::cmp::Ordering::Equal
    });
    ResultsTable { keys, rows }
}

impl ResultsTable {
    /// The best mean of a metric over the rows (max, or min for cross-entropy).
    fn best(&self, metric: &str) -> Option<f64> {
        let means = self
            .rows
            .iter()
            .filter_map(|r| r.metrics.get(metric).map(|m| m.mean));
        if lower_is_better(metric) {
            means.reduce(f64::min)
        } else {
            means.reduce(f64::max)
        }
    }

    /// The table as GitHub Markdown: one column per condition key, `n` (runs), then one
    /// column per metric as `mean ± std` (std only with repeats); the best mean in bold.
    pub fn to_markdown(&self) -> String {
        let repeats = self.rows.iter().any(|r| r.runs > 1);
        let mut header: Vec<String> = self.keys.clone();
        if header.is_empty() {
            header.push("run".into());
        }
        header.push("n".into());
        header.extend(METRICS.iter().map(|(_, h)| h.to_string()));
        let mut out = format!("| {} |\n", header.join(" | "));
        out.push_str(&format!(
            "|{}\n",
            header
                .iter()
                .enumerate()
                .map(|(i, _)| if i < header.len() - METRICS.len() - 1 {
                    "---|"
                } else {
                    "---:|"
                })
                .collect::<String>()
        ));
        let best: Vec<Option<f64>> = METRICS.iter().map(|(m, _)| self.best(m)).collect();
        for r in &self.rows {
            let mut cells: Vec<String> = r.params.iter().map(|(_, v)| display_value(v)).collect();
            if cells.is_empty() {
                // A single run (its folder is the point `.`), or seed repeats of one setting.
                cells.push(match r.points.as_slice() {
                    [one] if one != "." => one.clone(),
                    _ => "all runs".into(),
                });
            }
            cells.push(r.runs.to_string());
            for ((metric, _), best) in METRICS.iter().zip(&best) {
                cells.push(match r.metrics.get(*metric) {
                    None => "n/a".into(),
                    Some(ms) => {
                        let text = if repeats {
                            format!("{:.3} ± {:.3}", ms.mean, ms.std)
                        } else {
                            format!("{:.3}", ms.mean)
                        };
                        let is_best = self.rows.len() > 1
                            && best.is_some_and(|b| (ms.mean - b).abs() < 1e-12);
                        if is_best {
                            format!("**{text}**")
                        } else {
                            text
                        }
                    }
                });
            }
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out
    }

    /// Writes the table as Parquet: one column per condition key (Int64 when every value is
    /// an integer, Float64 when every value is a number, else Utf8), `runs`, `points`, then
    /// `<metric>_mean`, `<metric>_std` for every metric.
    pub fn write_parquet(&self, path: &Path) -> Result<(), ReportError> {
        use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
        use arrow::datatypes::{DataType, Field, Schema};
        use std::sync::Arc;
        let mut fields = Vec::new();
        let mut columns: Vec<ArrayRef> = Vec::new();
        for k in &self.keys {
            let vals: Vec<Option<&Value>> = self.rows.iter().map(|r| r.param(k)).collect();
            if vals.iter().all(|v| v.is_some_and(|v| v.is_i64())) {
                fields.push(Field::new(k, DataType::Int64, true));
                columns.push(Arc::new(Int64Array::from(
                    vals.iter()
                        .map(|v| v.and_then(Value::as_i64))
                        .collect::<Vec<_>>(),
                )));
            } else if vals.iter().all(|v| v.is_some_and(Value::is_number)) {
                fields.push(Field::new(k, DataType::Float64, true));
                columns.push(Arc::new(Float64Array::from(
                    vals.iter()
                        .map(|v| v.and_then(Value::as_f64))
                        .collect::<Vec<_>>(),
                )));
            } else {
                fields.push(Field::new(k, DataType::Utf8, true));
                columns.push(Arc::new(StringArray::from(
                    vals.iter()
                        .map(|v| v.map(display_value))
                        .collect::<Vec<_>>(),
                )));
            }
        }
        fields.push(Field::new("runs", DataType::Int64, false));
        columns.push(Arc::new(Int64Array::from(
            self.rows.iter().map(|r| r.runs as i64).collect::<Vec<_>>(),
        )));
        fields.push(Field::new("points", DataType::Utf8, false));
        columns.push(Arc::new(StringArray::from(
            self.rows
                .iter()
                .map(|r| r.points.join(","))
                .collect::<Vec<_>>(),
        )));
        for (metric, _) in METRICS {
            for (suffix, pick) in [
                ("mean", (|m: &MeanStd| m.mean) as fn(&MeanStd) -> f64),
                ("std", |m: &MeanStd| m.std),
            ] {
                fields.push(Field::new(
                    format!("{metric}_{suffix}"),
                    DataType::Float64,
                    true,
                ));
                columns.push(Arc::new(Float64Array::from(
                    self.rows
                        .iter()
                        .map(|r| r.metrics.get(metric).map(pick))
                        .collect::<Vec<_>>(),
                )));
            }
        }
        let batch =
            arrow::record_batch::RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        let tmp = path.with_extension("parquet.tmp");
        let file = std::fs::File::create(&tmp).map_err(|e| ReportError::io(&tmp, e))?;
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
        writer.write(&batch)?;
        writer.close()?;
        std::fs::rename(&tmp, path).map_err(|e| ReportError::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn point(name: &str, params: Value, ba: Option<f64>) -> PointRecord {
        PointRecord {
            name: name.into(),
            params: params.as_object().cloned().unwrap_or_default(),
            metrics: ba.map(|b| json!({"balanced_accuracy": b, "auc": 1.0 - b})),
            ..PointRecord::default()
        }
    }

    #[test]
    fn aggregates_repeats_sorts_numbers_and_keeps_declared_order_of_names() {
        let keys = vec![
            "train.pooling".to_string(),
            "sample.splits.fold".to_string(),
        ];
        let points = vec![
            point(
                "a0",
                json!({"train.pooling": "sparseconvmil", "sample.splits.fold": 0}),
                Some(0.9),
            ),
            point(
                "a1",
                json!({"train.pooling": "sparseconvmil", "sample.splits.fold": 1}),
                Some(1.0),
            ),
            point(
                "b0",
                json!({"train.pooling": "attention", "sample.splits.fold": 0}),
                Some(0.5),
            ),
            point(
                "b1",
                json!({"train.pooling": "attention", "sample.splits.fold": 1}),
                None,
            ),
        ];
        let t = aggregate(&points, &keys);
        assert_eq!(t.keys, ["train.pooling"]);
        assert_eq!(t.rows.len(), 2);
        assert_eq!(
            t.rows[0].param("train.pooling"),
            Some(&json!("sparseconvmil"))
        );
        let ba = t.rows[0].metrics["balanced_accuracy"];
        assert!((ba.mean - 0.95).abs() < 1e-12);
        // sample std of {0.9, 1.0}: sqrt(0.005)
        assert!((ba.std - 0.005f64.sqrt()).abs() < 1e-12);
        assert_eq!(t.rows[1].runs, 1);
        assert_eq!(t.rows[1].points, ["b0", "b1"]);
        let md = t.to_markdown();
        assert!(
            md.contains("| sparseconvmil | 2 | **0.950 ± 0.071** |"),
            "{md}"
        );
        assert!(md.contains("| attention | 1 | 0.500 ± 0.000 |"), "{md}");

        let numeric = vec![
            point("d8", json!({"sparse_map.downsample": 8}), Some(0.6)),
            point("d1", json!({"sparse_map.downsample": 1}), Some(0.7)),
            point("d32", json!({"sparse_map.downsample": 32}), Some(0.8)),
        ];
        let t = aggregate(&numeric, &["sparse_map.downsample".to_string()]);
        let order: Vec<i64> = t
            .rows
            .iter()
            .map(|r| r.param("sparse_map.downsample").unwrap().as_i64().unwrap())
            .collect();
        assert_eq!(order, [1, 8, 32]);
        assert_eq!(t.rows[0].label(&t.keys), "d=1");
    }

    #[test]
    fn parquet_has_typed_parameter_columns_and_mean_std() {
        let points = vec![
            point("x", json!({"a.d": 1, "b.m": "mean"}), Some(0.5)),
            point("y", json!({"a.d": 2, "b.m": "max"}), Some(0.75)),
        ];
        let t = aggregate(&points, &["a.d".to_string(), "b.m".to_string()]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.parquet");
        t.write_parquet(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&path).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        let batch = reader.into_iter().next().unwrap().unwrap();
        let schema = batch.schema();
        assert_eq!(
            schema.field(0).data_type(),
            &arrow::datatypes::DataType::Int64
        );
        assert_eq!(
            schema.field(1).data_type(),
            &arrow::datatypes::DataType::Utf8
        );
        let col = batch
            .column_by_name("balanced_accuracy_mean")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .unwrap();
        assert_eq!(col.values(), &[0.5, 0.75]);
        assert_eq!(batch.column_by_name("f1_mean").unwrap().null_count(), 2);
    }
}
