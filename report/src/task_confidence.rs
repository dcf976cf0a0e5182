//! [`crate::confidence`] for survival and regression tables: each row's test predictions
//! pooled over its runs (a slide predicted by several runs drawn as one), the bootstrap CI of
//! every metric of [`tessera_stats::TaskMetrics`] (Harrell's C-index; MAE, RMSE, Pearson,
//! Spearman, R^2), resampled within the event / censored strata for survival, and the paired
//! test of each row against the best row of every metric on the slides both predicted in the
//! same repeat. Uno's C needs the cohort's censoring distribution, which only `evaluate`
//! has: its per-run values are in the table, without a pooled interval.

use crate::error::ReportError;
use crate::record::PointRecord;
use crate::results::ResultsTable;
use crate::runs::{evaluated_rows, read_predictions, PREDICTIONS_FILE};
use std::collections::HashMap;
use std::path::Path;
use tessera_stats::{
    intervals_of, paired_of, BootstrapConfig, Clusters, Outcome, RegressionRows, SurvivalRows,
    TaskMetrics,
};

/// A row's pooled predictions: (repeat, slide) keys and per task the values.
#[derive(Debug, Default)]
struct Pool {
    keys: Vec<(String, String)>,
    survival: Vec<(f64, bool, f64)>,
    regression: Vec<(f64, f64)>,
}

impl Pool {
    fn metrics(&self, rows: &[usize]) -> Box<dyn TaskMetrics> {
        if self.survival.is_empty() {
            Box::new(RegressionRows {
                truth: rows.iter().map(|&i| self.regression[i].0).collect(),
                predicted: rows.iter().map(|&i| self.regression[i].1).collect(),
            })
        } else {
            Box::new(SurvivalRows {
                outcomes: rows
                    .iter()
                    .map(|&i| Outcome {
                        time: self.survival[i].0,
                        event: self.survival[i].1,
                    })
                    .collect(),
                risk: rows.iter().map(|&i| self.survival[i].2).collect(),
                reference: None,
            })
        }
    }

    fn clusters(
        &self,
        rows: &[usize],
        metrics: &dyn TaskMetrics,
        what: &str,
    ) -> Result<Clusters, ReportError> {
        let slides: Vec<&str> = rows.iter().map(|&i| self.keys[i].1.as_str()).collect();
        Clusters::by_key(&slides, &metrics.strata()).map_err(|source| ReportError::Stats {
            what: what.to_string(),
            source,
        })
    }

    fn len(&self) -> usize {
        self.keys.len()
    }
}

fn pool(
    out_dir: &Path,
    names: &[String],
    points: &HashMap<&str, &PointRecord>,
) -> Result<Option<Pool>, ReportError> {
    let mut pooled = Pool::default();
    for name in names {
        let Some(point) = points.get(name.as_str()) else {
            continue;
        };
        let path = out_dir.join(name).join(PREDICTIONS_FILE);
        if point.metrics.is_none() || !path.exists() {
            continue;
        }
        let repeat = crate::confidence::repeat_of(point);
        for row in evaluated_rows(read_predictions(&path)?) {
            match (row.survival, row.regression) {
                (Some(s), _) => pooled.survival.push(s),
                (None, Some(r)) => pooled.regression.push(r),
                (None, None) => continue,
            }
            pooled.keys.push((repeat.clone(), row.slide_id));
        }
    }
    let consistent = pooled.survival.is_empty() || pooled.regression.is_empty();
    Ok((pooled.len() > 0 && consistent).then_some(pooled))
}

/// Fills every row's `ci` and `p_worse` of a survival or regression table.
pub fn attach(
    table: &mut ResultsTable,
    out_dir: &Path,
    points: &[PointRecord],
    config: BootstrapConfig,
) -> Result<(), ReportError> {
    let by_name: HashMap<&str, &PointRecord> =
        points.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut pools = Vec::with_capacity(table.rows.len());
    for row in &table.rows {
        pools.push(pool(out_dir, &row.points, &by_name)?);
    }
    let labels: Vec<String> = table.rows.iter().map(|r| r.label(&table.keys)).collect();
    let stats = |what: &str| {
        let what = what.to_string();
        move |source| ReportError::Stats {
            what: what.clone(),
            source,
        }
    };
    for ((row, pool), label) in table.rows.iter_mut().zip(&pools).zip(&labels) {
        let Some(pool) = pool else { continue };
        let what = format!("the pooled predictions of `{label}`");
        let all: Vec<usize> = (0..pool.len()).collect();
        let metrics = pool.metrics(&all);
        let clusters = pool.clusters(&all, metrics.as_ref(), &what)?;
        let intervals = intervals_of(&clusters, &config, metrics.names().len(), |w| {
            metrics.values(Some(w))
        })
        .map_err(stats(&what))?;
        for (name, bounds) in metrics.names().iter().zip(intervals) {
            if let Some(bounds) = bounds {
                row.ci.insert((*name).to_string(), bounds);
            }
        }
    }
    let names: Vec<&str> = table.columns().iter().map(|(m, _)| *m).collect();
    for metric in names {
        let Some(best) = table.best_row(metric) else {
            continue;
        };
        let Some(best_pool) = &pools[best] else {
            continue;
        };
        for (r, row_pool) in pools.iter().enumerate() {
            let Some(row_pool) = row_pool else { continue };
            let p = if r == best {
                Some(1.0)
            } else {
                let what = format!("`{}` against `{}`", labels[r], labels[best]);
                compare(best_pool, row_pool, &config, metric, &what)?
            };
            if let Some(p) = p {
                table.rows[r].p_worse.insert(metric.to_string(), p);
            }
        }
    }
    table.bootstrap = Some(config);
    Ok(())
}

/// The one-sided p-value that `row` is worse than `best` on `metric`, on the (repeat, slide)
/// pairs both predicted; `None` without shared slides or for a metric not bootstrapped.
fn compare(
    best: &Pool,
    row: &Pool,
    config: &BootstrapConfig,
    metric: &str,
    what: &str,
) -> Result<Option<f64>, ReportError> {
    let index: HashMap<&(String, String), usize> =
        best.keys.iter().enumerate().map(|(i, k)| (k, i)).collect();
    let (mut in_best, mut in_row) = (Vec::new(), Vec::new());
    for (j, key) in row.keys.iter().enumerate() {
        if let Some(&i) = index.get(key) {
            in_best.push(i);
            in_row.push(j);
        }
    }
    if in_best.is_empty() {
        return Ok(None);
    }
    let (a, b) = (best.metrics(&in_best), row.metrics(&in_row));
    let Some(k) = a.names().iter().position(|n| *n == metric) else {
        return Ok(None);
    };
    let clusters = best.clusters(&in_best, a.as_ref(), what)?;
    let lower: Vec<bool> = (0..a.names().len()).map(|i| a.lower_is_better(i)).collect();
    let results = paired_of(&clusters, config, &lower, |w| a.values(w), |w| b.values(w)).map_err(
        |source| ReportError::Stats {
            what: what.to_string(),
            source,
        },
    )?;
    Ok(results.get(k).and_then(|r| r.p_worse))
}
