//! Every metric of one set of slide predictions, for the set as it is ([`Evaluator::evaluate`])
//! and for any weighting of its rows ([`Evaluator::values_weighted`], a bootstrap resample).
//! Conventions follow scikit-learn so numbers compare with CLAM / TRIDENT / STAMP reports:
//! - balanced accuracy: mean recall over the classes present in the labels;
//! - macro precision / recall / F1: unweighted mean over the classes present in the labels or
//!   the predictions; a 0/0 ratio counts as 0; F1 is averaged per class (not F1 of the means);
//! - macro one-vs-rest ROC AUC and AUPRC (average precision): mean over the classes that have
//!   both positives and negatives (the others are skipped); tied scores are one threshold;
//! - cross-entropy: mean of `-ln p(true class)`, with `p` clipped to `[1e-15, 1]`.

use crate::confusion::{balanced_accuracy_of, macro_precision_recall_f1_of, ClassCounts};
use crate::error::StatsError;
use crate::metric::{Metric, MetricValues};
use crate::ranking::{RankMetrics, RankedScores};

/// Probabilities below this are clipped in the cross-entropy, so one confident mistake gives a
/// large but finite loss (as scikit-learn's `log_loss`).
pub const CROSS_ENTROPY_EPS: f64 = 1e-15;

/// One class's metrics (one-vs-rest for the ranking ones).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassStats {
    /// Slides of the class among those predicted as the class (0 without any).
    pub precision: f64,
    /// Slides predicted as the class among those of the class (0 without any).
    pub recall: f64,
    /// Harmonic mean of the two (0 when both are 0).
    pub f1: f64,
    /// `None` when the class has no positives or no negatives.
    pub auc: Option<f64>,
    /// Average precision; `None` like the AUC.
    pub auprc: Option<f64>,
    /// Slides of the class.
    pub support: u64,
}

/// The metrics of every row taken once.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The summary metrics (macro averages).
    pub values: MetricValues,
    /// `confusion_matrix[true][predicted]` over every class.
    pub confusion_matrix: Vec<Vec<u64>>,
    /// Every class, in class order.
    pub per_class: Vec<ClassStats>,
}

/// Predictions checked once and sorted once per class, ready to be evaluated under many
/// weightings.
#[derive(Debug, Clone)]
pub struct Evaluator {
    n_classes: usize,
    labels: Vec<usize>,
    predicted: Vec<usize>,
    /// `-ln p(true class)` of every row, clipped.
    losses: Vec<f64>,
    /// Every class's scores in decreasing order.
    ranked: Vec<RankedScores>,
}

/// Buffers reused across the resamples of a bootstrap.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scratch {
    confusion: Vec<u64>,
    counts: Vec<ClassCounts>,
    rank: Vec<RankMetrics>,
    pub(crate) weights: Vec<u32>,
}

/// `-ln p`, with `p` clipped to `[CROSS_ENTROPY_EPS, 1]`.
fn loss(p: f32) -> f64 {
    -f64::from(p).clamp(CROSS_ENTROPY_EPS, 1.0).ln()
}

/// Mean negative log-probability of the true class (0 without rows); `probs` is row-major
/// `labels.len() x n_classes`.
pub fn cross_entropy(labels: &[usize], probs: &[f32], n_classes: usize) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let total: f64 = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| loss(probs[i * n_classes + l]))
        .sum();
    total / labels.len() as f64
}

fn mean_of_defined(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let (sum, n) = values
        .flatten()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

impl Evaluator {
    /// Checks and prepares the predictions: `labels` and `predicted` are class indices, `probs`
    /// is row-major `labels.len() x n_classes`.
    pub fn new(
        labels: &[usize],
        predicted: &[usize],
        probs: &[f32],
        n_classes: usize,
    ) -> Result<Evaluator, StatsError> {
        let n = labels.len();
        if n == 0 {
            return Err(StatsError::Empty);
        }
        if predicted.len() != n || probs.len() != n * n_classes {
            return Err(StatsError::Lengths {
                labels: n,
                predicted: predicted.len(),
                probs: probs.len(),
                n_classes,
            });
        }
        if let Some(&index) = labels.iter().chain(predicted).find(|&&c| c >= n_classes) {
            return Err(StatsError::ClassIndex { index, n_classes });
        }
        if let Some(k) = probs.iter().position(|p| !p.is_finite()) {
            return Err(StatsError::NotFinite {
                row: k / n_classes,
                value: probs[k],
            });
        }
        let losses = labels
            .iter()
            .enumerate()
            .map(|(i, &l)| loss(probs[i * n_classes + l]))
            .collect();
        let ranked = (0..n_classes)
            .map(|c| {
                let scores: Vec<f64> = (0..n)
                    .map(|i| f64::from(probs[i * n_classes + c]))
                    .collect();
                RankedScores::new(&scores)
            })
            .collect();
        Ok(Evaluator {
            n_classes,
            labels: labels.to_vec(),
            predicted: predicted.to_vec(),
            losses,
            ranked,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Never true for a constructed evaluator; for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of classes (columns of the probabilities).
    pub fn n_classes(&self) -> usize {
        self.n_classes
    }

    /// The true class of every row.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// Every metric with every row taken once, plus the confusion matrix and per-class details.
    pub fn evaluate(&self) -> Evaluation {
        let mut scratch = Scratch::default();
        let values = self.values_into(|_| 1, &mut scratch);
        let c = self.n_classes;
        let confusion_matrix = scratch.confusion.chunks(c).map(<[u64]>::to_vec).collect();
        let per_class = scratch
            .counts
            .iter()
            .zip(&scratch.rank)
            .map(|(counts, rank)| {
                let (precision, recall, f1) = counts.precision_recall_f1();
                ClassStats {
                    precision,
                    recall,
                    f1,
                    auc: rank.auc,
                    auprc: rank.average_precision,
                    support: counts.support,
                }
            })
            .collect();
        Evaluation {
            values,
            confusion_matrix,
            per_class,
        }
    }

    /// Every metric with row `i` counted `weights[i]` times: exactly the metrics of the data set
    /// in which each row is repeated that many times. `weights` has one entry per row.
    pub fn values_weighted(&self, weights: &[u32]) -> Result<MetricValues, StatsError> {
        if weights.len() != self.len() {
            return Err(StatsError::Unpaired(format!(
                "{} weights for {} rows",
                weights.len(),
                self.len()
            )));
        }
        Ok(self.values_into(|i| u64::from(weights[i]), &mut Scratch::default()))
    }

    /// The metrics under `weight`, computed in `scratch`'s buffers (which keep the confusion
    /// matrix, the class totals and the ranking metrics of every class afterwards).
    pub(crate) fn values_into(
        &self,
        weight: impl Fn(usize) -> u64 + Copy,
        scratch: &mut Scratch,
    ) -> MetricValues {
        let c = self.n_classes;
        scratch.confusion.clear();
        scratch.confusion.resize(c * c, 0);
        let (mut loss, mut total) = (0.0f64, 0u64);
        for (i, (&t, &p)) in self.labels.iter().zip(&self.predicted).enumerate() {
            let w = weight(i);
            scratch.confusion[t * c + p] += w;
            loss += w as f64 * self.losses[i];
            total += w;
        }
        scratch.counts.clear();
        scratch.counts.extend((0..c).map(|k| {
            let row = &scratch.confusion[k * c..(k + 1) * c];
            ClassCounts {
                true_positives: row[k],
                predicted: (0..c).map(|t| scratch.confusion[t * c + k]).sum(),
                support: row.iter().sum(),
            }
        }));
        scratch.rank.clear();
        let labels = &self.labels;
        scratch.rank.extend(
            self.ranked
                .iter()
                .enumerate()
                .map(|(k, r)| r.metrics(|i| labels[i] == k, weight)),
        );
        let mut values = MetricValues::default();
        if total == 0 {
            return values;
        }
        let (precision, recall, f1) = macro_precision_recall_f1_of(&scratch.counts);
        values.set(
            Metric::BalancedAccuracy,
            Some(balanced_accuracy_of(&scratch.counts)),
        );
        values.set(Metric::Precision, Some(precision));
        values.set(Metric::Recall, Some(recall));
        values.set(Metric::F1, Some(f1));
        values.set(
            Metric::Auc,
            mean_of_defined(scratch.rank.iter().map(|r| r.auc)),
        );
        values.set(
            Metric::Auprc,
            mean_of_defined(scratch.rank.iter().map(|r| r.average_precision)),
        );
        values.set(Metric::CrossEntropy, Some(loss / total as f64));
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    /// `sklearn.metrics` on fixed arrays (scikit-learn 1.9.1, printed by
    /// `oracle/sklearn_oracle.py`): every metric per class and macro-averaged, tied scores
    /// within and across classes.
    struct Oracle {
        labels: &'static [usize],
        probs: &'static [f32],
        n_classes: usize,
        balanced_accuracy: f64,
        precision: f64,
        recall: f64,
        f1: f64,
        auc: f64,
        auprc: f64,
        cross_entropy: f64,
        per_class: &'static [[f64; 5]],
    }

    const MULTICLASS: Oracle = Oracle {
        labels: &[0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0],
        probs: &[
            0.6, 0.3, 0.1, 0.2, 0.3, 0.5, 0.1, 0.3, 0.6, 0.2, 0.5, 0.3, //
            0.3, 0.6, 0.1, 0.5, 0.3, 0.2, 0.3, 0.5, 0.2, 0.2, 0.2, 0.6, //
            0.1, 0.6, 0.3, 0.5, 0.3, 0.2, 0.3, 0.2, 0.5, 0.6, 0.2, 0.2,
        ],
        n_classes: 3,
        balanced_accuracy: 0.6666666666666666,
        precision: 0.6666666666666666,
        recall: 0.6666666666666666,
        f1: 0.6666666666666666,
        auc: 0.8802083333333334,
        auprc: 0.8022486772486772,
        cross_entropy: 0.7722615769712738,
        // precision, recall, f1, auc, auprc
        per_class: &[
            [0.75, 0.75, 0.75, 0.921875, 0.8303571428571428],
            [0.5, 0.5, 0.5, 0.78125, 0.7222222222222222],
            [0.75, 0.75, 0.75, 0.9375, 0.8541666666666666],
        ],
    };

    const BINARY: Oracle = Oracle {
        labels: &[0, 0, 1, 1, 0, 1, 0, 1, 1, 0],
        probs: &[
            0.8, 0.2, 0.6, 0.4, 0.6, 0.4, 0.3, 0.7, 0.4, 0.6, //
            0.1, 0.9, 0.9, 0.1, 0.4, 0.6, 0.8, 0.2, 0.6, 0.4,
        ],
        n_classes: 2,
        balanced_accuracy: 0.7,
        precision: 0.7083333333333333,
        recall: 0.7,
        f1: 0.696969696969697,
        auc: 0.76,
        auprc: 0.7501984126984126,
        cross_entropy: 0.5765035665246852,
        per_class: &[
            [
                0.6666666666666666,
                0.8,
                0.7272727272727273,
                0.76,
                0.7249999999999999,
            ],
            [0.75, 0.6, 0.6666666666666666, 0.76, 0.7753968253968253],
        ],
    };

    #[test]
    fn every_metric_matches_scikit_learn() {
        for oracle in [MULTICLASS, BINARY] {
            let c = oracle.n_classes;
            // argmax (no ties among the largest probabilities here)
            let predicted: Vec<usize> = oracle
                .probs
                .chunks(c)
                .map(|r| (0..c).fold(0, |a, k| if r[k] > r[a] { k } else { a }))
                .collect();
            let e = Evaluator::new(oracle.labels, &predicted, oracle.probs, c).unwrap();
            let m = e.evaluate();
            for (metric, expected) in [
                (Metric::BalancedAccuracy, oracle.balanced_accuracy),
                (Metric::Precision, oracle.precision),
                (Metric::Recall, oracle.recall),
                (Metric::F1, oracle.f1),
                (Metric::Auc, oracle.auc),
                (Metric::Auprc, oracle.auprc),
                (Metric::CrossEntropy, oracle.cross_entropy),
            ] {
                let got = m.values.get(metric).unwrap();
                assert!(
                    (got - expected).abs() < 1e-12,
                    "{metric:?}: {got} != {expected}"
                );
            }
            for (stats, expected) in m.per_class.iter().zip(oracle.per_class) {
                let got = [
                    stats.precision,
                    stats.recall,
                    stats.f1,
                    stats.auc.unwrap(),
                    stats.auprc.unwrap(),
                ];
                for (g, x) in got.iter().zip(expected) {
                    assert!((g - x).abs() < 1e-12, "{got:?} != {expected:?}");
                }
            }
            let support: u64 = m.per_class.iter().map(|s| s.support).sum();
            assert_eq!(support as usize, oracle.labels.len());
        }
    }

    #[test]
    fn cross_entropy_is_clipped_and_inputs_are_checked() {
        let e = Evaluator::new(&[0], &[1], &[0.0, 1.0], 2).unwrap();
        close(
            e.evaluate().values.get(Metric::CrossEntropy).unwrap(),
            -CROSS_ENTROPY_EPS.ln(),
        );
        assert_eq!(
            Evaluator::new(&[], &[], &[], 2).unwrap_err(),
            StatsError::Empty
        );
        assert!(matches!(
            Evaluator::new(&[0], &[3], &[0.5, 0.5], 2),
            Err(StatsError::ClassIndex { index: 3, .. })
        ));
        assert!(matches!(
            Evaluator::new(&[0], &[0], &[0.5], 2),
            Err(StatsError::Lengths { .. })
        ));
        assert!(matches!(
            Evaluator::new(&[0, 1], &[0, 0], &[0.5, 0.5, f32::NAN, 0.5], 2),
            Err(StatsError::NotFinite { row: 1, .. })
        ));
    }

    #[test]
    fn weights_equal_repeated_rows() {
        let labels = [0, 1, 2, 1, 0];
        let predicted = [0, 2, 2, 1, 1];
        let probs = [
            0.6, 0.3, 0.1, 0.2, 0.3, 0.5, 0.1, 0.1, 0.8, 0.3, 0.5, 0.2, 0.3, 0.5, 0.2,
        ];
        let weights = [3u32, 0, 2, 1, 1];
        let e = Evaluator::new(&labels, &predicted, &probs, 3).unwrap();
        let weighted = e.values_weighted(&weights).unwrap();
        let (mut l, mut p, mut s) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..5 {
            for _ in 0..weights[i] {
                l.push(labels[i]);
                p.push(predicted[i]);
                s.extend_from_slice(&probs[i * 3..i * 3 + 3]);
            }
        }
        let repeated = Evaluator::new(&l, &p, &s, 3).unwrap().evaluate().values;
        for m in Metric::ALL {
            match (weighted.get(m), repeated.get(m)) {
                (Some(a), Some(b)) => close(a, b),
                (a, b) => assert_eq!(a, b, "{m:?}"),
            }
        }
        assert!(e.values_weighted(&[1, 2]).is_err());
    }
}
