//! The metrics of a split, by name: what a confidence interval or a paired test is about.

use serde::{Deserialize, Serialize};

/// One summary metric of a split's predictions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Mean recall over the classes present in the labels.
    BalancedAccuracy,
    /// Macro precision over the classes present in the labels or the predictions.
    Precision,
    /// Macro recall over the classes present in the labels or the predictions.
    Recall,
    /// Mean of the per-class F1 over the classes present in the labels or the predictions.
    F1,
    /// Macro one-vs-rest ROC AUC over the classes with positives and negatives.
    Auc,
    /// Macro one-vs-rest average precision over the classes with positives and negatives.
    Auprc,
    /// Mean `-ln p(true class)`, clipped.
    CrossEntropy,
}

impl Metric {
    /// Every metric, in the order of `metrics.json` and of the results table.
    pub const ALL: [Metric; 7] = [
        Metric::BalancedAccuracy,
        Metric::Precision,
        Metric::Recall,
        Metric::F1,
        Metric::Auc,
        Metric::Auprc,
        Metric::CrossEntropy,
    ];

    /// The key of the metric in `metrics.json`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::BalancedAccuracy => "balanced_accuracy",
            Metric::Precision => "precision",
            Metric::Recall => "recall",
            Metric::F1 => "f1",
            Metric::Auc => "auc",
            Metric::Auprc => "auprc",
            Metric::CrossEntropy => "cross_entropy",
        }
    }

    /// The metric called `name` in `metrics.json`.
    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Lower is better for the cross-entropy, higher for every other metric.
    pub fn lower_is_better(self) -> bool {
        self == Metric::CrossEntropy
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The value of every metric on one (possibly resampled) set of predictions; `None` where the
/// metric is undefined (an AUC without a class that has both positives and negatives).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MetricValues([Option<f64>; 7]);

impl MetricValues {
    /// The value of `metric`.
    pub fn get(&self, metric: Metric) -> Option<f64> {
        self.0[metric.index()]
    }

    /// Sets the value of `metric`.
    pub fn set(&mut self, metric: Metric, value: Option<f64>) {
        self.0[metric.index()] = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_only_cross_entropy_is_lower_better() {
        for m in Metric::ALL {
            assert_eq!(Metric::from_name(m.name()), Some(m));
            assert_eq!(m.lower_is_better(), m == Metric::CrossEntropy);
        }
        assert_eq!(Metric::from_name("accuracy"), None);
        let mut v = MetricValues::default();
        v.set(Metric::Auprc, Some(0.5));
        assert_eq!(v.get(Metric::Auprc), Some(0.5));
        assert_eq!(v.get(Metric::Auc), None);
    }
}
