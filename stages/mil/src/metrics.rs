//! Slide-classification metrics as plain functions (no tensors), shared by `evaluate` and by
//! training (validation metrics for early stopping). Conventions follow scikit-learn so numbers
//! compare with CLAM / TRIDENT / STAMP reports:
//! - balanced accuracy: mean recall over the classes present in the labels;
//! - macro precision / recall / F1: unweighted mean over the classes present in the labels or
//!   the predictions; a 0/0 ratio counts as 0; F1 is averaged per class (not F1 of the means);
//! - macro one-vs-rest ROC AUC: mean over the classes that have both positives and negatives
//!   in the split (the others are skipped and reported); ties get average ranks;
//! - cross-entropy: mean of `-ln p(true class)`, with `p` clipped to `[1e-15, 1]`.

use crate::error::MilError;
use serde_json::{json, Value};

/// Probabilities below this are clipped in the cross-entropy, so one confident mistake gives a
/// large but finite loss (as scikit-learn's `log_loss`).
pub const CROSS_ENTROPY_EPS: f64 = 1e-15;

/// The metrics of one split.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationMetrics {
    pub n: usize,
    pub balanced_accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Macro one-vs-rest AUC; `None` when no class has both positives and negatives.
    pub auc: Option<f64>,
    /// One-vs-rest AUC per class; `None` for the classes skipped.
    pub auc_per_class: Vec<Option<f64>>,
    pub cross_entropy: f64,
    /// `confusion_matrix[true][predicted]` over every class.
    pub confusion_matrix: Vec<Vec<u64>>,
}

impl ClassificationMetrics {
    /// Computes every metric. `probs` is row-major `labels.len() x n_classes`.
    pub fn compute(
        labels: &[usize],
        predicted: &[usize],
        probs: &[f32],
        n_classes: usize,
    ) -> Result<Self, MilError> {
        let n = labels.len();
        if n == 0 {
            return Err(MilError::Metrics("no predictions to evaluate".into()));
        }
        if predicted.len() != n || probs.len() != n * n_classes {
            return Err(MilError::Metrics(format!(
                "{n} labels, {} predictions and {} probabilities for {n_classes} classes",
                predicted.len(),
                probs.len()
            )));
        }
        if let Some(bad) = labels.iter().chain(predicted).find(|&&c| c >= n_classes) {
            return Err(MilError::Metrics(format!(
                "class index {bad} with {n_classes} classes"
            )));
        }
        let cm = confusion_matrix(labels, predicted, n_classes);
        let (precision, recall, f1) = macro_precision_recall_f1(&cm);
        let (auc, auc_per_class) = macro_auc_ovr(labels, probs, n_classes);
        Ok(ClassificationMetrics {
            n,
            balanced_accuracy: balanced_accuracy(&cm),
            precision,
            recall,
            f1,
            auc,
            auc_per_class,
            cross_entropy: cross_entropy(labels, probs, n_classes),
            confusion_matrix: cm,
        })
    }

    /// The JSON of `metrics.json` for one split (keys `balanced_accuracy`, `precision`,
    /// `recall`, `f1`, `auc`, `cross_entropy`, `confusion_matrix`, `classes`, `n`, plus the
    /// per-class AUC and the classes skipped in the macro AUC).
    pub fn to_json(&self, classes: &[String]) -> Value {
        let skipped: Vec<&str> = self
            .auc_per_class
            .iter()
            .zip(classes)
            .filter(|(a, _)| a.is_none())
            .map(|(_, c)| c.as_str())
            .collect();
        let per_class: serde_json::Map<String, Value> = classes
            .iter()
            .zip(&self.auc_per_class)
            .map(|(c, a)| (c.clone(), json!(a)))
            .collect();
        json!({
            "balanced_accuracy": self.balanced_accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "auc": self.auc,
            "cross_entropy": self.cross_entropy,
            "confusion_matrix": self.confusion_matrix,
            "classes": classes,
            "n": self.n,
            "auc_per_class": per_class,
            "auc_skipped_classes": skipped,
        })
    }
}

/// `cm[true][predicted]` counts.
pub fn confusion_matrix(labels: &[usize], predicted: &[usize], n_classes: usize) -> Vec<Vec<u64>> {
    let mut cm = vec![vec![0u64; n_classes]; n_classes];
    for (&t, &p) in labels.iter().zip(predicted) {
        if t < n_classes && p < n_classes {
            cm[t][p] += 1;
        }
    }
    cm
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Mean recall over the classes present in the labels.
pub fn balanced_accuracy(cm: &[Vec<u64>]) -> f64 {
    let recalls: Vec<f64> = cm
        .iter()
        .enumerate()
        .filter(|(_, row)| row.iter().sum::<u64>() > 0)
        .map(|(c, row)| ratio(row[c], row.iter().sum()))
        .collect();
    mean(&recalls).unwrap_or(0.0)
}

/// Macro precision, recall and F1 over the classes present in labels or predictions.
pub fn macro_precision_recall_f1(cm: &[Vec<u64>]) -> (f64, f64, f64) {
    let (mut p, mut r, mut f) = (Vec::new(), Vec::new(), Vec::new());
    for c in 0..cm.len() {
        let support: u64 = cm[c].iter().sum();
        let predicted: u64 = cm.iter().map(|row| row[c]).sum();
        if support == 0 && predicted == 0 {
            continue;
        }
        let (precision, recall) = (ratio(cm[c][c], predicted), ratio(cm[c][c], support));
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        p.push(precision);
        r.push(recall);
        f.push(f1);
    }
    (
        mean(&p).unwrap_or(0.0),
        mean(&r).unwrap_or(0.0),
        mean(&f).unwrap_or(0.0),
    )
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// ROC AUC of `scores` for `positive`, as the Mann-Whitney U statistic with average ranks for
/// ties (equal to the area under the ROC curve with ties drawn as diagonal segments).
/// `None` without both positives and negatives.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|p| **p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum_pos = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        // Ranks start..end (0-based) share their average, 1-based.
        let average_rank = (start + end + 1) as f64 / 2.0;
        rank_sum_pos +=
            average_rank * order[start..end].iter().filter(|&&i| positive[i]).count() as f64;
        start = end;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos * n_neg) as f64)
}

/// Macro one-vs-rest AUC and the AUC of every class (`None` where skipped).
pub fn macro_auc_ovr(
    labels: &[usize],
    probs: &[f32],
    n_classes: usize,
) -> (Option<f64>, Vec<Option<f64>>) {
    let per_class: Vec<Option<f64>> = (0..n_classes)
        .map(|c| {
            let scores: Vec<f64> = (0..labels.len())
                .map(|i| f64::from(probs[i * n_classes + c]))
                .collect();
            let positive: Vec<bool> = labels.iter().map(|&l| l == c).collect();
            roc_auc(&scores, &positive)
        })
        .collect();
    let present: Vec<f64> = per_class.iter().flatten().copied().collect();
    (mean(&present), per_class)
}

/// Mean negative log-probability of the true class.
pub fn cross_entropy(labels: &[usize], probs: &[f32], n_classes: usize) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let total: f64 = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let p = f64::from(probs[i * n_classes + l]);
            -p.clamp(CROSS_ENTROPY_EPS, 1.0).ln()
        })
        .sum();
    total / labels.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-6, "{a} != {b}");
    }

    #[test]
    fn auc_without_ties_counts_ordered_pairs() {
        // Pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4.
        let auc = roc_auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
        close(auc, 0.75);
    }

    #[test]
    fn auc_counts_ties_as_half() {
        // Pairs: (0.5 vs 0.5) = 1/2, (0.5 vs 0.2) = 1, (0.9 vs 0.5) = 1, (0.9 vs 0.2) = 1.
        let auc = roc_auc(&[0.5, 0.5, 0.2, 0.9], &[false, true, false, true]).unwrap();
        close(auc, 3.5 / 4.0);
        // All scores equal: chance.
        close(
            roc_auc(&[0.3; 4], &[true, false, true, false]).unwrap(),
            0.5,
        );
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn perfect_and_inverted_binary_predictions() {
        let labels = [0, 0, 1, 1];
        let probs = [0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.1, 0.9];
        let m = ClassificationMetrics::compute(&labels, &[0, 0, 1, 1], &probs, 2).unwrap();
        for v in [
            m.balanced_accuracy,
            m.precision,
            m.recall,
            m.f1,
            m.auc.unwrap(),
        ] {
            close(v, 1.0);
        }
        close(
            m.cross_entropy,
            -(0.9f64.ln() + 0.8f64.ln() + 0.7f64.ln() + 0.9f64.ln()) / 4.0,
        );
        assert_eq!(m.confusion_matrix, vec![vec![2, 0], vec![0, 2]]);
        // Swap the columns: everything is wrong.
        let inverted: Vec<f32> = probs.chunks(2).flat_map(|r| [r[1], r[0]]).collect();
        let m = ClassificationMetrics::compute(&labels, &[1, 1, 0, 0], &inverted, 2).unwrap();
        for v in [
            m.balanced_accuracy,
            m.precision,
            m.recall,
            m.f1,
            m.auc.unwrap(),
        ] {
            close(v, 0.0);
        }
        assert_eq!(m.confusion_matrix, vec![vec![0, 2], vec![2, 0]]);
    }

    #[test]
    fn multiclass_macro_metrics_match_hand_computation() {
        // cm rows (true): [1,1,0], [0,2,0], [1,0,1].
        let labels = [0, 0, 1, 1, 2, 2];
        let predicted = [0, 1, 1, 1, 2, 0];
        let probs = [
            0.6, 0.3, 0.1, //
            0.3, 0.5, 0.2, //
            0.1, 0.8, 0.1, //
            0.2, 0.7, 0.1, //
            0.1, 0.2, 0.7, //
            0.5, 0.1, 0.4, //
        ];
        let m = ClassificationMetrics::compute(&labels, &predicted, &probs, 3).unwrap();
        assert_eq!(
            m.confusion_matrix,
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]
        );
        // Recalls 1/2, 1, 1/2; precisions 1/2, 2/3, 1; F1s 1/2, 4/5, 2/3.
        close(m.balanced_accuracy, 2.0 / 3.0);
        close(m.recall, 2.0 / 3.0);
        close(m.precision, (0.5 + 2.0 / 3.0 + 1.0) / 3.0);
        close(m.f1, (0.5 + 0.8 + 2.0 / 3.0) / 3.0);
        // Class 0 scores: pos {0.6, 0.3}, neg {0.1, 0.2, 0.1, 0.5}: 0.6 beats 4, 0.3 beats 3 -> 7/8.
        // Class 1: pos {0.8, 0.7}, neg {0.3, 0.5, 0.2, 0.1}: 8/8.
        // Class 2: pos {0.7, 0.4}, neg {0.1, 0.2, 0.1, 0.1}: 8/8.
        close(m.auc_per_class[0].unwrap(), 7.0 / 8.0);
        close(m.auc.unwrap(), (7.0 / 8.0 + 1.0 + 1.0) / 3.0);
        let ce = -[0.6f64, 0.3, 0.8, 0.7, 0.7, 0.4]
            .iter()
            .map(|p| p.ln())
            .sum::<f64>()
            / 6.0;
        assert!((m.cross_entropy - ce).abs() < 1e-6);
    }

    #[test]
    fn a_class_absent_from_the_split_is_skipped_and_reported() {
        // Three classes, the split only has classes 0 and 1; class 2 is never predicted.
        let labels = [0, 1, 1];
        let probs = [0.7, 0.2, 0.1, 0.4, 0.5, 0.1, 0.2, 0.2, 0.6];
        let predicted = [0, 1, 2];
        let m = ClassificationMetrics::compute(&labels, &predicted, &probs, 3).unwrap();
        assert_eq!(m.auc_per_class[2], None);
        // Class 0: pos {0.7}, neg {0.4, 0.2} -> 1. Class 1: pos {0.5, 0.2}, neg {0.2}: 1 + 1/2 -> 3/4.
        close(m.auc.unwrap(), (1.0 + 0.75) / 2.0);
        // Balanced accuracy over the present classes: (1 + 1/2) / 2.
        close(m.balanced_accuracy, 0.75);
        // Precision/recall include class 2 (predicted once, never true): P = (1 + 1 + 0) / 3.
        close(m.precision, 2.0 / 3.0);
        close(m.recall, 0.5);
        let json = m.to_json(&["a".into(), "b".into(), "c".into()]);
        assert_eq!(json["auc_skipped_classes"], json!(["c"]));
        assert_eq!(json["n"], json!(3));
        assert!(json["auc_per_class"]["c"].is_null());
    }

    #[test]
    fn cross_entropy_is_clipped_and_inputs_are_checked() {
        let ce = cross_entropy(&[0], &[0.0, 1.0], 2);
        close(ce, -CROSS_ENTROPY_EPS.ln());
        close(
            cross_entropy(&[0, 1], &[0.8, 0.2, 0.4, 0.6], 2),
            0.366_984_6,
        );
        assert!(ClassificationMetrics::compute(&[0], &[3], &[0.5, 0.5], 2).is_err());
        assert!(ClassificationMetrics::compute(&[0], &[0], &[0.5], 2).is_err());
        assert!(ClassificationMetrics::compute(&[], &[], &[], 2).is_err());
    }
}
