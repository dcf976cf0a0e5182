//! The summary metrics of survival and regression predictions by name, under any weighting
//! of the rows: what `evaluate` writes into `metrics.json` and what the results table
//! bootstraps and compares, from one definition (as [`crate::Evaluator`] is for
//! classification).

use crate::bootstrap::Clusters;
use crate::error::StatsError;
use crate::regression::RegressionMetrics;
use crate::survival::{harrell_c_index, uno_c_index, Outcome};

/// Metrics of a task, by name, computed under per-row multiplicities.
pub trait TaskMetrics {
    /// The metric names, in `metrics.json` and table order.
    fn names(&self) -> &'static [&'static str];
    /// Whether lower values are better for metric `k`.
    fn lower_is_better(&self, k: usize) -> bool;
    /// Every metric under `weights` (`None`: each row once); `None` where undefined.
    fn values(&self, weights: Option<&[u32]>) -> Result<Vec<Option<f64>>, StatsError>;
    /// The bootstrap strata of the rows (survival: the event indicator; regression: one).
    fn strata(&self) -> Vec<usize>;
    /// Number of rows.
    fn len(&self) -> usize;
    /// True without rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One cluster per row, stratified.
    fn clusters(&self) -> Clusters {
        Clusters::units(&self.strata())
    }
}

/// Survival metric names: Harrell's C, and Uno's C where a reference set is given.
pub const SURVIVAL_METRICS: [&str; 2] = ["c_index", "c_index_uno"];

/// A split's survival predictions: outcomes and risks, and the reference outcomes Uno's C
/// estimates the censoring distribution on.
#[derive(Debug, Clone)]
pub struct SurvivalRows {
    pub outcomes: Vec<Outcome>,
    pub risk: Vec<f64>,
    pub reference: Option<Vec<Outcome>>,
}

impl TaskMetrics for SurvivalRows {
    fn names(&self) -> &'static [&'static str] {
        &SURVIVAL_METRICS
    }
    fn lower_is_better(&self, _k: usize) -> bool {
        false
    }
    fn values(&self, weights: Option<&[u32]>) -> Result<Vec<Option<f64>>, StatsError> {
        let harrell = harrell_c_index(&self.outcomes, &self.risk, weights)?;
        // Uno's C is undefined where the censoring distribution reaches 0: null, not an error.
        let uno = match &self.reference {
            Some(r) => uno_c_index(r, &self.outcomes, &self.risk, None, weights).unwrap_or(None),
            None => None,
        };
        Ok(vec![harrell, uno])
    }
    fn strata(&self) -> Vec<usize> {
        self.outcomes.iter().map(|o| usize::from(o.event)).collect()
    }
    fn len(&self) -> usize {
        self.outcomes.len()
    }
}

/// Regression metric names.
pub const REGRESSION_METRICS: [&str; 5] = ["mae", "rmse", "pearson", "spearman", "r2"];

/// A split's regression predictions.
#[derive(Debug, Clone)]
pub struct RegressionRows {
    pub truth: Vec<f64>,
    pub predicted: Vec<f64>,
}

impl TaskMetrics for RegressionRows {
    fn names(&self) -> &'static [&'static str] {
        &REGRESSION_METRICS
    }
    fn lower_is_better(&self, k: usize) -> bool {
        k < 2
    }
    fn values(&self, weights: Option<&[u32]>) -> Result<Vec<Option<f64>>, StatsError> {
        Ok(
            match RegressionMetrics::compute(&self.truth, &self.predicted, weights)? {
                Some(m) => vec![Some(m.mae), Some(m.rmse), m.pearson, m.spearman, Some(m.r2)],
                None => vec![None; REGRESSION_METRICS.len()],
            },
        )
    }
    fn strata(&self) -> Vec<usize> {
        vec![0; self.truth.len()]
    }
    fn len(&self) -> usize {
        self.truth.len()
    }
}

/// Whether lower is better for a survival or regression metric called `name`.
pub fn task_metric_lower_is_better(name: &str) -> bool {
    matches!(name, "mae" | "rmse")
}
