//! The results table of a sweep: one row per combination of swept parameters, every metric as
//! mean +/- std over the repeats (seeds, and folds when `*.fold` is swept), sorted by the swept
//! parameters — the layout of the paper's Table 2 (models x metrics). With the runs' folders
//! ([`results_table`]) each row also gets the bootstrap CI of its pooled test predictions, a
//! paired test against the best row ([`crate::confidence`]), its trainable parameter count
//! and its runs' alerts.

use crate::error::ReportError;
use crate::record::{PointRecord, SweepRecord};
use crate::runs::Parameters;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use tessera_stats::{BootstrapConfig, Metric};

/// The metrics of `metrics.json` reported, in column order, with their table headers.
pub const METRICS: [(&str, &str); 7] = [
    ("balanced_accuracy", "balanced accuracy"),
    ("auc", "AUC"),
    ("auprc", "AUPRC"),
    ("f1", "F1"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("cross_entropy", "cross-entropy"),
];

/// The survival metrics of `metrics.json` reported, in column order (`task: survival`).
pub const SURVIVAL_COLUMNS: [(&str, &str); 3] = [
    ("c_index", "C-index"),
    ("c_index_uno", "Uno's C"),
    ("logrank_p", "log-rank p"),
];

/// The regression metrics of `metrics.json` reported, in column order (`task: regression`).
pub const REGRESSION_COLUMNS: [(&str, &str); 5] = [
    ("mae", "MAE"),
    ("rmse", "RMSE"),
    ("pearson", "Pearson r"),
    ("spearman", "Spearman ρ"),
    ("r2", "R²"),
];

/// The metric columns of a task's table (`task`: `metrics.json`'s `task`, absent for
/// classification).
pub fn task_columns(task: Option<&str>) -> &'static [(&'static str, &'static str)] {
    match task {
        Some("survival") => &SURVIVAL_COLUMNS,
        Some("regression") => &REGRESSION_COLUMNS,
        _ => &METRICS,
    }
}

/// The metrics of a task whose Markdown cells show the confidence interval.
pub fn task_ci_columns(task: Option<&str>) -> &'static [&'static str] {
    match task {
        Some("survival") => &["c_index"],
        Some("regression") => &["mae", "r2"],
        _ => &CI_COLUMNS,
    }
}

/// The metrics whose Markdown cells show the confidence interval: the threshold-free ranking
/// metric and the threshold-dependent headline metric. Seven `mean ± std [lo, hi]` cells would
/// make a row about 200 characters wide; results.parquet has every interval.
pub const CI_COLUMNS: [&str; 2] = ["balanced_accuracy", "auc"];

/// A row is marked not significantly worse than the best row when the paired test's one-sided
/// p-value is at least this.
pub const SIGNIFICANCE: f64 = 0.05;

/// Marks a cell not significantly worse than the best (bold) one.
pub const NOT_WORSE_MARK: &str = "≈";

/// Marks a row whose runs raised alerts.
pub const ALERT_MARK: &str = "⚠";

/// Whether lower is better for a metric (cross-entropy, MAE, RMSE, a log-rank p-value);
/// higher for the others.
pub fn lower_is_better(metric: &str) -> bool {
    Metric::from_name(metric).is_some_and(Metric::lower_is_better)
        || tessera_stats::task_metric_lower_is_better(metric)
        || metric == "logrank_p"
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
    /// Metric name -> `(low, high)` bootstrap CI of the metric of the row's test predictions
    /// pooled over its runs.
    pub ci: BTreeMap<String, (f64, f64)>,
    /// Metric name -> one-sided p-value that this row is worse than the best row (paired
    /// bootstrap; 1 for the best row itself).
    pub p_worse: BTreeMap<String, f64>,
    /// Trainable parameters of the row's model (its first run with a train_log.json).
    pub parameters: Option<Parameters>,
    /// The distinct alerts of the row's points (e.g. training collapsed).
    pub alerts: Vec<String>,
    /// How many of the row's points raised alerts.
    pub alerted: usize,
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

    /// Whether the row is not significantly worse than the best row on `metric` (`None`
    /// without a paired test).
    pub fn not_worse(&self, metric: &str) -> Option<bool> {
        self.p_worse.get(metric).map(|&p| p >= SIGNIFICANCE)
    }

    /// The alert mark of the row, e.g. `⚠ training collapsed` (`(1/3)` when only some of its
    /// points raised it); empty without alerts.
    pub fn alert_mark(&self) -> String {
        if self.alerts.is_empty() {
            return String::new();
        }
        let mut tags: Vec<&str> = self.alerts.iter().map(|a| alert_tag(a)).collect();
        tags.dedup();
        let share = if self.alerted < self.points.len() {
            format!(" ({}/{})", self.alerted, self.points.len())
        } else {
            String::new()
        };
        format!("{ALERT_MARK} {}{share}", tags.join(", "))
    }
}

/// The short name of an alert: its text up to the first colon, after the `stage `NAME`: `
/// prefix a sweep gives it (`stage `train`: training collapsed: ...` -> `training collapsed`).
pub fn alert_tag(alert: &str) -> &str {
    let text = alert
        .strip_prefix("stage `")
        .and_then(|rest| rest.split_once("`: "))
        .map_or(alert, |(_, text)| text);
    text.split(':').next().unwrap_or(text).trim()
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResultsTable {
    /// The condition keys (swept keys that are not repeats), in declaration order.
    pub keys: Vec<String>,
    pub rows: Vec<ResultRow>,
    /// The bootstrap behind the rows' `ci` and `p_worse`, when they were computed.
    pub bootstrap: Option<BootstrapConfig>,
    /// `survival` or `regression` (from the runs' metrics.json); `None`: classification.
    pub task: Option<String>,
}

/// The table of a run's output folder: [`aggregate`] of the points' metrics, then each row's
/// pooled confidence intervals and paired test against the best row (from the points'
/// predictions.parquet) and its parameter counts (train_log.json).
pub fn results_table(out_dir: &Path, record: &SweepRecord) -> Result<ResultsTable, ReportError> {
    let mut table = aggregate(&record.points, &record.keys);
    crate::confidence::attach(&mut table, out_dir, &record.points)?;
    for row in &mut table.rows {
        for point in &row.points {
            if let Some(p) = crate::runs::read_parameters(&out_dir.join(point))? {
                row.parameters = Some(p);
                break;
            }
        }
    }
    Ok(table)
}

/// A coverage as a percentage without float noise: 0.95 -> `95`, 0.999 -> `99.9`.
pub fn percent(level: f64) -> String {
    format!("{}", (level * 1e4).round() / 1e2)
}

/// A parameter count in three significant digits: `812`, `25.4k`, `1.23M`.
pub fn compact_count(n: u64) -> String {
    let x = n as f64;
    if n < 1000 {
        n.to_string()
    } else if n < 1_000_000 {
        format!("{}k", three_digits(x / 1e3))
    } else {
        format!("{}M", three_digits(x / 1e6))
    }
}

fn three_digits(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
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
    let task: Option<String> = points
        .iter()
        .filter_map(|p| p.metrics.as_ref())
        .find_map(|m| m.get("task").and_then(Value::as_str).map(str::to_string));
    let columns = task_columns(task.as_deref());
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
                    ci: BTreeMap::new(),
                    p_worse: BTreeMap::new(),
                    parameters: None,
                    alerts: Vec::new(),
                    alerted: 0,
                });
                rows.len() - 1
            }
        };
        rows[i].points.push(p.name.clone());
        if !p.alerts.is_empty() {
            rows[i].alerted += 1;
            for a in &p.alerts {
                if !rows[i].alerts.contains(a) {
                    rows[i].alerts.push(a.clone());
                }
            }
        }
        if let Some(m) = &p.metrics {
            rows[i].runs += 1;
            for (metric, _) in columns {
                if let Some(v) = m.get(*metric).and_then(Value::as_f64) {
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
    ResultsTable {
        keys,
        rows,
        bootstrap: None,
        task,
    }
}

impl ResultsTable {
    /// The metric columns of this table's task.
    pub fn columns(&self) -> &'static [(&'static str, &'static str)] {
        task_columns(self.task.as_deref())
    }

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

    /// The index of the (first) row with the best mean of `metric`.
    pub fn best_row(&self, metric: &str) -> Option<usize> {
        let best = self.best(metric)?;
        self.rows
            .iter()
            .position(|r| r.metrics.get(metric).is_some_and(|m| m.mean == best))
    }

    /// The table as GitHub Markdown: one column per condition key, `n` (runs), `#params`,
    /// then one column per metric as `mean ± std` (std only with repeats), the best mean in
    /// bold, the [`CI_COLUMNS`] followed by their `[low, high]` interval, `≈` after a cell not
    /// significantly worse than the best, `⚠ ...` after the row label of rows with alerts;
    /// a legend line under the table says what the marks mean.
    pub fn to_markdown(&self) -> String {
        let repeats = self.rows.iter().any(|r| r.runs > 1);
        let mut header: Vec<String> = self.keys.clone();
        if header.is_empty() {
            header.push("run".into());
        }
        let label_columns = header.len();
        header.push("n".into());
        header.push("#params".into());
        let columns = self.columns();
        let ci_columns = task_ci_columns(self.task.as_deref());
        header.extend(columns.iter().map(|(_, h)| h.to_string()));
        let mut out = format!("| {} |\n", header.join(" | "));
        out.push_str(&format!(
            "|{}\n",
            (0..header.len())
                .map(|i| if i < label_columns { "---|" } else { "---:|" })
                .collect::<String>()
        ));
        let best: Vec<Option<f64>> = columns.iter().map(|(m, _)| self.best(m)).collect();
        for r in &self.rows {
            let mut cells: Vec<String> = r.params.iter().map(|(_, v)| display_value(v)).collect();
            if cells.is_empty() {
                // A single run (its folder is the point `.`), or seed repeats of one setting.
                cells.push(match r.points.as_slice() {
                    [one] if one != "." => one.clone(),
                    _ => "all runs".into(),
                });
            }
            let mark = r.alert_mark();
            if let (false, Some(last)) = (mark.is_empty(), cells.last_mut()) {
                last.push(' ');
                last.push_str(&mark);
            }
            cells.push(r.runs.to_string());
            cells.push(
                r.parameters
                    .map_or("n/a".into(), |p| compact_count(p.total)),
            );
            for ((metric, _), best) in columns.iter().zip(&best) {
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
                        let mut cell = if is_best { format!("**{text}**") } else { text };
                        if let (true, Some((lo, hi))) =
                            (ci_columns.contains(metric), r.ci.get(*metric))
                        {
                            cell.push_str(&format!(" [{lo:.3}, {hi:.3}]"));
                        }
                        if !is_best && r.not_worse(metric) == Some(true) {
                            cell.push(' ');
                            cell.push_str(NOT_WORSE_MARK);
                        }
                        cell
                    }
                });
            }
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        let legend = self.legend();
        if !legend.is_empty() {
            out.push_str(&format!("\n{legend}\n"));
        }
        out
    }

    /// What the marks of the Markdown table mean, in one line (empty when it has none).
    pub fn legend(&self) -> String {
        let mut parts = Vec::new();
        if self.rows.len() > 1 {
            parts.push("**bold**: best mean".to_string());
        }
        if let Some(b) = &self.bootstrap {
            let level = percent(b.level);
            if self.rows.iter().any(|r| !r.ci.is_empty()) {
                let strata = match self.task.as_deref() {
                    Some("survival") => "stratified by event",
                    Some("regression") => "not stratified",
                    _ => "stratified by class",
                };
                parts.push(format!(
                    "[lo, hi]: {level}% bootstrap CI of the metric of the row's test predictions pooled over its runs ({} resamples of the slides, {strata}, seed {})",
                    b.resamples, b.seed
                ));
            }
            if self.rows.len() > 1 && self.rows.iter().any(|r| !r.p_worse.is_empty()) {
                parts.push(format!(
                    "{NOT_WORSE_MARK}: not significantly worse than the column's bold row (paired bootstrap, {} joint resamples of the slides both rows predicted, one-sided p ≥ {SIGNIFICANCE})",
                    b.resamples
                ));
            }
        }
        if self.rows.iter().any(|r| r.parameters.is_some()) {
            parts.push("#params: trainable parameters (train_log.json)".into());
        }
        if self.rows.iter().any(|r| !r.alerts.is_empty()) {
            parts.push(format!(
                "{ALERT_MARK}: runs of the row raised an alert (k/n: k of its n runs); its numbers are not to be trusted as they are, see the run's run.json"
            ));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("{}.", parts.join("; "))
        }
    }

    /// Writes the table as Parquet: one column per condition key (Int64 when every value is
    /// an integer, Float64 when every value is a number, else Utf8), `runs`, `points`,
    /// `params_total`, `params_encoder`, `params_pooling`, `params_head`, `params_embedder`
    /// (null without train_log.json), `alerts` (List<Utf8>), then for every metric
    /// `<metric>_mean`, `<metric>_std`, `<metric>_ci_lo`, `<metric>_ci_hi` (pooled bootstrap
    /// CI), `<metric>_p_worse` (paired test against the best row) and `<metric>_not_worse`
    /// (`p_worse >= 0.05`); null where not computed.
    pub fn write_parquet(&self, path: &Path) -> Result<(), ReportError> {
        use arrow::array::{
            Array, ArrayRef, BooleanArray, Float64Array, Int64Array, ListBuilder, StringArray,
            StringBuilder,
        };
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
        for (name, pick) in [
            (
                "params_total",
                (|p: &Parameters| p.total) as fn(&Parameters) -> u64,
            ),
            ("params_encoder", |p| p.encoder),
            ("params_pooling", |p| p.pooling),
            ("params_head", |p| p.head),
            ("params_embedder", |p| p.embedder),
        ] {
            fields.push(Field::new(name, DataType::Int64, true));
            columns.push(Arc::new(Int64Array::from(
                self.rows
                    .iter()
                    .map(|r| r.parameters.as_ref().map(|p| pick(p) as i64))
                    .collect::<Vec<_>>(),
            )));
        }
        let mut alerts = ListBuilder::new(StringBuilder::new());
        for r in &self.rows {
            for a in &r.alerts {
                alerts.values().append_value(a);
            }
            alerts.append(true);
        }
        let alerts = alerts.finish();
        fields.push(Field::new("alerts", alerts.data_type().clone(), false));
        columns.push(Arc::new(alerts));
        for (metric, _) in self.columns() {
            let metric = *metric;
            let float = |suffix: &str, value: &dyn Fn(&ResultRow) -> Option<f64>| {
                (
                    Field::new(format!("{metric}_{suffix}"), DataType::Float64, true),
                    Arc::new(Float64Array::from(
                        self.rows.iter().map(value).collect::<Vec<_>>(),
                    )) as ArrayRef,
                )
            };
            for (field, column) in [
                float("mean", &|r| r.metrics.get(metric).map(|m| m.mean)),
                float("std", &|r| r.metrics.get(metric).map(|m| m.std)),
                float("ci_lo", &|r| r.ci.get(metric).map(|c| c.0)),
                float("ci_hi", &|r| r.ci.get(metric).map(|c| c.1)),
                float("p_worse", &|r| r.p_worse.get(metric).copied()),
            ] {
                fields.push(field);
                columns.push(column);
            }
            fields.push(Field::new(
                format!("{metric}_not_worse"),
                DataType::Boolean,
                true,
            ));
            columns.push(Arc::new(BooleanArray::from(
                self.rows
                    .iter()
                    .map(|r| r.not_worse(metric))
                    .collect::<Vec<_>>(),
            )));
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
            md.contains("| sparseconvmil | 2 | n/a | **0.950 ± 0.071** |"),
            "{md}"
        );
        assert!(
            md.contains("| attention | 1 | n/a | 0.500 ± 0.000 |"),
            "{md}"
        );
        assert!(
            md.starts_with("| train.pooling | n | #params | balanced accuracy | AUC | AUPRC |"),
            "{md}"
        );
        // Without the runs' folders: no intervals, no marks; the legend explains the bold.
        assert!(!md.contains('[') && !md.contains(NOT_WORSE_MARK), "{md}");
        assert!(md.ends_with("\n**bold**: best mean.\n"), "{md}");

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

    #[test]
    fn alerts_are_named_by_their_first_words() {
        assert_eq!(
            alert_tag("stage `train`: training collapsed: after 3 epochs"),
            "training collapsed"
        );
        assert_eq!(alert_tag("no tissue: 3 slides"), "no tissue");
        assert_eq!(alert_tag("plain"), "plain");
    }

    #[test]
    fn counts_are_compact() {
        assert_eq!(compact_count(812), "812");
        assert_eq!(compact_count(25_431), "25.4k");
        assert_eq!(compact_count(123_456), "123k");
        assert_eq!(compact_count(1_234_567), "1.23M");
    }

    /// A sweep folder of three models x two seeds on the same 40 test slides: `good` ranks
    /// them well (two mistakes), `close` is `good` with two more slides wrong, `bad` is barely better than
    /// chance and collapsed in its second seed.
    fn fixture(dir: &Path) -> SweepRecord {
        use crate::runs::tests::write_predictions;
        use tessera_stats::Evaluator;
        let mut points = Vec::new();
        for model in ["good", "close", "bad"] {
            for seed in [0u64, 1] {
                let name = format!("pooling={model}__seed={seed}");
                let run = dir.join(&name);
                let rows: Vec<(String, i64, f32)> = (0..40)
                    .map(|i| {
                        let label = (i % 2) as i64;
                        let jitter = ((i * 7 + seed as usize * 3) % 10) as f32 / 40.0;
                        let good = match (i, label) {
                            (37 | 39, _) => 0.3, // two positives ranked among the negatives
                            (_, 1) => 0.62 + jitter,
                            _ => 0.38 - jitter,
                        };
                        let s = match model {
                            "good" => good,
                            "close" if i < 2 => 1.0 - good,
                            "close" => good,
                            _ => 0.5 + ((i * 13 + seed as usize) % 9) as f32 / 40.0 - 0.1,
                        };
                        (format!("s{i:02}"), label, s)
                    })
                    .collect();
                let refs: Vec<(&str, &str, i64, f32)> = rows
                    .iter()
                    .map(|(id, l, s)| (id.as_str(), "test", *l, *s))
                    .collect();
                write_predictions(&run, &refs);
                let labels: Vec<usize> = rows.iter().map(|r| r.1 as usize).collect();
                let predicted: Vec<usize> = rows.iter().map(|r| usize::from(r.2 > 0.5)).collect();
                let probs: Vec<f32> = rows.iter().flat_map(|r| [1.0 - r.2, r.2]).collect();
                let values = Evaluator::new(&labels, &predicted, &probs, 2)
                    .unwrap()
                    .evaluate()
                    .values;
                let mut metrics = serde_json::Map::new();
                for m in Metric::ALL {
                    metrics.insert(m.name().into(), json!(values.get(m)));
                }
                metrics.insert(
                    "bootstrap".into(),
                    json!({"resamples": 400, "level": 0.9, "seed": 5, "stratified": true}),
                );
                std::fs::write(run.join("metrics.json"), Value::Object(metrics).to_string())
                    .unwrap();
                if model != "bad" {
                    let total = if model == "good" { 25_431 } else { 812 };
                    std::fs::write(
                        run.join("train_log.json"),
                        json!({"parameters": {"encoder": 100, "pooling": total - 110,
                            "head": 10, "embedder": 0, "total": total}})
                        .to_string(),
                    )
                    .unwrap();
                }
                let alerts = if model == "bad" && seed == 1 {
                    vec![
                        "stage `train`: training collapsed: every slide is predicted `b`"
                            .to_string(),
                    ]
                } else {
                    Vec::new()
                };
                points.push(PointRecord {
                    name,
                    params: json!({"train.pooling": model})
                        .as_object()
                        .cloned()
                        .unwrap(),
                    seed: Some(seed),
                    status: "ok".into(),
                    alerts,
                    ..PointRecord::default()
                });
            }
        }
        let mut record = SweepRecord {
            name: "fixture".into(),
            keys: vec!["train.pooling".into()],
            seeds: vec![0, 1],
            points,
            ..SweepRecord::default()
        };
        record.load_metrics(dir).unwrap();
        record
    }

    #[test]
    fn rows_get_pooled_intervals_paired_marks_parameters_and_alerts() {
        let dir = tempfile::tempdir().unwrap();
        let record = fixture(dir.path());
        let t = results_table(dir.path(), &record).unwrap();
        let row = |model: &str| {
            t.rows
                .iter()
                .find(|r| r.param("train.pooling") == Some(&json!(model)))
                .unwrap()
        };
        let (good, close, bad) = (row("good"), row("close"), row("bad"));
        assert_eq!(
            t.bootstrap.unwrap().resamples,
            400,
            "the runs' own bootstrap"
        );
        assert_eq!(t.best_row("auc").map(|i| &t.rows[i]), Some(good));
        for m in CI_COLUMNS {
            let (lo, hi) = good.ci[m];
            assert!(lo < hi && hi <= 1.0, "{m}: [{lo}, {hi}]");
            let mean = good.metrics[m].mean;
            assert!(lo <= mean && mean <= hi, "{m}: {mean} not in [{lo}, {hi}]");
            assert_eq!(good.p_worse[m], 1.0);
            assert_eq!(close.not_worse(m), Some(true), "{m}: {:?}", close.p_worse);
            assert_eq!(bad.not_worse(m), Some(false), "{m}: {:?}", bad.p_worse);
        }
        assert_eq!(good.parameters.unwrap().total, 25_431);
        assert_eq!(bad.parameters, None);
        assert_eq!(bad.alerted, 1);
        assert_eq!(bad.alert_mark(), "⚠ training collapsed (1/2)");

        let md = t.to_markdown();
        let line = |model: &str| {
            md.lines()
                .find(|l| l.starts_with(&format!("| {model} ")))
                .unwrap()
        };
        let (lo, hi) = good.ci["balanced_accuracy"];
        let ba = good.metrics["balanced_accuracy"];
        assert!(
            line("good").starts_with(&format!(
                "| good | 2 | 25.4k | **{:.3} ± {:.3}** [{lo:.3}, {hi:.3}] |",
                ba.mean, ba.std
            )),
            "{md}"
        );
        assert!(line("close").contains("| 812 |"), "{md}");
        assert_eq!(line("close").matches(NOT_WORSE_MARK).count(), 7, "{md}");
        assert!(
            !line("good").contains(NOT_WORSE_MARK),
            "the best row is bold: {md}"
        );
        assert!(
            line("bad").starts_with("| bad ⚠ training collapsed (1/2) | 2 | n/a |"),
            "{md}"
        );
        let bad_cells: Vec<&str> = line("bad").split(" | ").collect();
        assert!(!bad_cells[3].contains(NOT_WORSE_MARK), "{md}");
        let legend = md.lines().last().unwrap();
        for part in [
            "**bold**: best mean",
            "90% bootstrap CI",
            "400 resamples of the slides, stratified by class, seed 5",
            "≈: not significantly worse",
            "p ≥ 0.05",
            "#params: trainable parameters",
            "⚠: runs of the row raised an alert",
        ] {
            assert!(legend.contains(part), "{part} missing: {legend}");
        }

        let path = dir.path().join("results.parquet");
        t.write_parquet(&path).unwrap();
        let batch = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&path).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
        use arrow::array::{Array, AsArray};
        let order: Vec<String> = t.rows.iter().map(|r| r.label(&t.keys)).collect();
        let at = |model: &str| order.iter().position(|l| l == model).unwrap();
        let not_worse = batch.column_by_name("auc_not_worse").unwrap().as_boolean();
        assert!(not_worse.value(at("close")) && !not_worse.value(at("bad")));
        let lo = batch
            .column_by_name("balanced_accuracy_ci_lo")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!(lo.value(at("good")), good.ci["balanced_accuracy"].0);
        let params = batch
            .column_by_name("params_total")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(params.value(at("good")), 25_431);
        assert!(params.is_null(at("bad")));
        for column in [
            "params_encoder",
            "params_pooling",
            "params_head",
            "auprc_p_worse",
        ] {
            assert!(batch.column_by_name(column).is_some(), "{column}");
        }
        let alerts = batch.column_by_name("alerts").unwrap().as_list::<i32>();
        assert_eq!(alerts.value(at("bad")).len(), 1);
        assert_eq!(alerts.value(at("good")).len(), 0);
    }

    #[test]
    fn bootstrap_zero_in_the_runs_turns_the_intervals_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = fixture(dir.path());
        for p in &mut record.points {
            if let Some(m) = p.metrics.as_mut() {
                m["bootstrap"]["resamples"] = json!(0);
            }
        }
        let t = results_table(dir.path(), &record).unwrap();
        assert_eq!(t.bootstrap, None);
        assert!(t
            .rows
            .iter()
            .all(|r| r.ci.is_empty() && r.p_worse.is_empty()));
        assert!(!t.to_markdown().contains(NOT_WORSE_MARK));
    }
}
