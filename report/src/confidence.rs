//! The uncertainty of each row of the results table, from the runs' per-slide predictions:
//! - the bootstrap confidence interval of every metric of the row's test predictions pooled
//!   over its runs (seeds, folds), resampling the slides stratified by class; a slide that
//!   several runs predicted is drawn as one (its rows together), so repeats on the same test
//!   slides do not narrow the interval as if they were new slides;
//! - a paired bootstrap test of each row against the best row of every metric, on the slides
//!   both rows predicted in the same repeat (same seed, same fold): the one-sided p-value that
//!   the row is worse.
//!
//! The bootstrap is the one the runs' `evaluate` stage used (`metrics.json`'s `bootstrap`:
//! resamples, level, seed), so a row of one run gets exactly the interval of its metrics.json.

use crate::error::ReportError;
use crate::record::PointRecord;
use crate::results::{is_repeat_key, ResultsTable};
use crate::runs::{evaluated_rows, read_predictions, PREDICTIONS_FILE};
use serde_json::Value;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tessera_stats::{
    confidence_intervals, paired_bootstrap, BootstrapConfig, Clusters, Evaluator, Metric,
};

/// The bootstrap of the first point whose metrics.json records one (`None` when it has 0
/// resamples); runs from before `bootstrap` existed get the defaults (1000, 95%, seed 0).
pub fn bootstrap_of(points: &[PointRecord]) -> Option<BootstrapConfig> {
    let recorded = points
        .iter()
        .filter_map(|p| p.metrics.as_ref())
        .find_map(|m| m.get("bootstrap"));
    let Some(b) = recorded else {
        return Some(BootstrapConfig::default());
    };
    let defaults = BootstrapConfig::default();
    let config = BootstrapConfig {
        resamples: b
            .get("resamples")
            .and_then(Value::as_u64)
            .map_or(defaults.resamples, |r| r as usize),
        level: b
            .get("level")
            .and_then(Value::as_f64)
            .unwrap_or(defaults.level),
        seed: b
            .get("seed")
            .and_then(Value::as_u64)
            .unwrap_or(defaults.seed),
    };
    (config.resamples > 0 && config.check().is_ok()).then_some(config)
}

/// A row's test predictions pooled over its runs.
#[derive(Debug, Default)]
struct Pooled {
    /// The repeat (seed, fold) each prediction comes from, and its slide.
    keys: Vec<(String, String)>,
    labels: Vec<usize>,
    predicted: Vec<usize>,
    probs: Vec<f32>,
    n_classes: usize,
}

impl Pooled {
    /// The predictions `rows` (indices into this pool), checked, with their slides as the
    /// bootstrap's clusters.
    fn select(&self, rows: &[usize], what: &str) -> Result<(Evaluator, Clusters), ReportError> {
        let c = self.n_classes;
        let labels: Vec<usize> = rows.iter().map(|&i| self.labels[i]).collect();
        let predicted: Vec<usize> = rows.iter().map(|&i| self.predicted[i]).collect();
        let probs: Vec<f32> = rows
            .iter()
            .flat_map(|&i| self.probs[i * c..(i + 1) * c].iter().copied())
            .collect();
        let slides: Vec<&str> = rows.iter().map(|&i| self.keys[i].1.as_str()).collect();
        let stats = |source| ReportError::Stats {
            what: what.to_string(),
            source,
        };
        let evaluator = Evaluator::new(&labels, &predicted, &probs, c).map_err(stats)?;
        let clusters = Clusters::by_key(&slides, &labels).map_err(stats)?;
        Ok((evaluator, clusters))
    }

    fn all(&self, what: &str) -> Result<(Evaluator, Clusters), ReportError> {
        self.select(&(0..self.labels.len()).collect::<Vec<_>>(), what)
    }
}

/// Which repeat a point is: its seed and its repeat keys' values (the k-fold index).
pub(crate) fn repeat_of(point: &PointRecord) -> String {
    let folds: Vec<String> = point
        .params
        .iter()
        .filter(|(k, _)| is_repeat_key(k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("seed={:?} {}", point.seed, folds.join(" "))
}

/// Pools the evaluated split (test, else val) of the predictions of every point of a row that
/// has a predictions.parquet. Points whose class count differs from the first one's are left
/// out. `None` without any prediction.
fn pool(
    out_dir: &Path,
    names: &[String],
    points: &HashMap<&str, &PointRecord>,
) -> Result<Option<Pooled>, ReportError> {
    let mut pooled = Pooled::default();
    for name in names {
        let Some(point) = points.get(name.as_str()) else {
            continue;
        };
        let path = out_dir.join(name).join(PREDICTIONS_FILE);
        if point.metrics.is_none() || !path.exists() {
            continue;
        }
        let repeat = repeat_of(point);
        for row in evaluated_rows(read_predictions(&path)?) {
            if pooled.labels.is_empty() {
                pooled.n_classes = row.probs.len();
            }
            if row.probs.len() != pooled.n_classes {
                continue;
            }
            pooled.keys.push((repeat.clone(), row.slide_id));
            pooled.labels.push(row.label_index);
            pooled.predicted.push(row.predicted_index);
            pooled.probs.extend(row.probs);
        }
    }
    Ok((!pooled.labels.is_empty()).then_some(pooled))
}

/// The one-sided p-values (per metric) that `row` is worse than `best`, on the predictions of
/// the same (repeat, slide) in both; `None` when they share none.
fn compare(
    best: &Pooled,
    row: &Pooled,
    config: &BootstrapConfig,
    what: &str,
) -> Result<Option<BTreeMap<Metric, f64>>, ReportError> {
    if best.n_classes != row.n_classes {
        return Ok(None);
    }
    let index: HashMap<&(String, String), usize> =
        best.keys.iter().enumerate().map(|(i, k)| (k, i)).collect();
    let (mut in_best, mut in_row) = (Vec::new(), Vec::new());
    for (j, key) in row.keys.iter().enumerate() {
        if let Some(&i) = index.get(key) {
            if best.labels[i] == row.labels[j] {
                in_best.push(i);
                in_row.push(j);
            }
        }
    }
    if in_best.is_empty() {
        return Ok(None);
    }
    let (a, clusters) = best.select(&in_best, what)?;
    let (b, _) = row.select(&in_row, what)?;
    let comparisons =
        paired_bootstrap(&a, &b, &clusters, config).map_err(|source| ReportError::Stats {
            what: what.to_string(),
            source,
        })?;
    Ok(Some(
        comparisons
            .into_iter()
            .filter_map(|c| c.p_worse.map(|p| (c.metric, p)))
            .collect(),
    ))
}

/// Fills every row's `ci` and `p_worse` and the table's `bootstrap` from the points'
/// predictions (rows without predictions keep none).
pub fn attach(
    table: &mut ResultsTable,
    out_dir: &Path,
    points: &[PointRecord],
) -> Result<(), ReportError> {
    let Some(config) = bootstrap_of(points) else {
        return Ok(());
    };
    if table.task.is_some() {
        return crate::task_confidence::attach(table, out_dir, points, config);
    }
    let by_name: HashMap<&str, &PointRecord> =
        points.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut pooled = Vec::with_capacity(table.rows.len());
    for row in &table.rows {
        pooled.push(pool(out_dir, &row.points, &by_name)?);
    }
    let labels: Vec<String> = table.rows.iter().map(|r| r.label(&table.keys)).collect();
    for ((row, pooled), label) in table.rows.iter_mut().zip(&pooled).zip(&labels) {
        let Some(pooled) = pooled else { continue };
        let what = format!("the pooled predictions of `{label}`");
        let (evaluator, clusters) = pooled.all(&what)?;
        let intervals = confidence_intervals(&evaluator, &clusters, &config)
            .map_err(|source| ReportError::Stats { what, source })?;
        for m in Metric::ALL {
            if let Some(bounds) = intervals.get(m) {
                row.ci.insert(m.name().to_string(), bounds);
            }
        }
    }
    // Paired tests against the best row of each metric (one test per (best, row) pair).
    let mut tested: HashMap<(usize, usize), Option<BTreeMap<Metric, f64>>> = HashMap::new();
    for m in Metric::ALL {
        let Some(best) = table.best_row(m.name()) else {
            continue;
        };
        let Some(best_pool) = &pooled[best] else {
            continue;
        };
        for (r, row_pool) in pooled.iter().enumerate() {
            let Some(row_pool) = row_pool else { continue };
            let p = if r == best {
                Some(1.0)
            } else {
                let result = match tested.entry((best, r)) {
                    Entry::Occupied(known) => known.into_mut(),
                    Entry::Vacant(new) => {
                        let what = format!("`{}` against `{}`", labels[r], labels[best]);
                        new.insert(compare(best_pool, row_pool, &config, &what)?)
                    }
                };
                result.as_ref().and_then(|ps| ps.get(&m).copied())
            };
            if let Some(p) = p {
                table.rows[r].p_worse.insert(m.name().to_string(), p);
            }
        }
    }
    table.bootstrap = Some(config);
    Ok(())
}
