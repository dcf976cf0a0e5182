//! Slide-classification metrics of one split as `metrics.json` reports them, shared by
//! `evaluate` and by training (validation metrics for early stopping). The numbers come from
//! [`tessera_stats`] (re-exported here, so `tessera_mil::metrics::*` keeps working), which
//! follows scikit-learn so numbers compare with CLAM / TRIDENT / STAMP reports:
//! - balanced accuracy: mean recall over the classes present in the labels;
//! - macro precision / recall / F1: unweighted mean over the classes present in the labels or
//!   the predictions; a 0/0 ratio counts as 0; F1 is averaged per class (not F1 of the means);
//! - macro one-vs-rest ROC AUC and AUPRC (average precision, step-wise, no interpolation):
//!   mean over the classes that have both positives and negatives in the split (the others are
//!   skipped and reported); tied scores are one threshold;
//! - cross-entropy: mean of `-ln p(true class)`, with `p` clipped to `[1e-15, 1]`.

use crate::error::MilError;
use serde_json::{json, Map, Value};
pub use tessera_stats::{
    average_precision, balanced_accuracy, confusion_matrix, cross_entropy, macro_auc_ovr,
    macro_auprc_ovr, macro_precision_recall_f1, roc_auc, ClassStats, Evaluator, Metric,
    CROSS_ENTROPY_EPS,
};

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
    /// Macro one-vs-rest average precision; `None` like the AUC.
    pub auprc: Option<f64>,
    /// Every class's precision, recall, F1, AUC, AUPRC and support.
    pub per_class: Vec<ClassStats>,
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
        let evaluator = Evaluator::new(labels, predicted, probs, n_classes)
            .map_err(|e| MilError::Metrics(e.to_string()))?;
        Ok(Self::of(&evaluator))
    }

    /// The metrics of prepared predictions (the same evaluator then serves the bootstrap).
    pub fn of(evaluator: &Evaluator) -> Self {
        let e = evaluator.evaluate();
        let value = |m: Metric| e.values.get(m);
        ClassificationMetrics {
            n: evaluator.len(),
            balanced_accuracy: value(Metric::BalancedAccuracy).unwrap_or(0.0),
            precision: value(Metric::Precision).unwrap_or(0.0),
            recall: value(Metric::Recall).unwrap_or(0.0),
            f1: value(Metric::F1).unwrap_or(0.0),
            auc: value(Metric::Auc),
            auc_per_class: e.per_class.iter().map(|c| c.auc).collect(),
            auprc: value(Metric::Auprc),
            cross_entropy: value(Metric::CrossEntropy).unwrap_or(0.0),
            per_class: e.per_class,
            confusion_matrix: e.confusion_matrix,
        }
    }

    /// The JSON of `metrics.json` for one split: `balanced_accuracy`, `precision`, `recall`,
    /// `f1`, `auc`, `auprc`, `cross_entropy`, `confusion_matrix`, `classes`, `n`, `per_class`
    /// (`{class: {precision, recall, f1, auc, auprc, support}}`), the per-class AUC and the
    /// classes skipped in the macro AUC and AUPRC.
    pub fn to_json(&self, classes: &[String]) -> Value {
        let skipped = |pick: fn(&ClassStats) -> Option<f64>| -> Vec<&str> {
            self.per_class
                .iter()
                .zip(classes)
                .filter(|(c, _)| pick(c).is_none())
                .map(|(_, name)| name.as_str())
                .collect()
        };
        let auc_per_class: Map<String, Value> = classes
            .iter()
            .zip(&self.auc_per_class)
            .map(|(c, a)| (c.clone(), json!(a)))
            .collect();
        let per_class: Map<String, Value> = classes
            .iter()
            .zip(&self.per_class)
            .map(|(name, c)| {
                (
                    name.clone(),
                    json!({
                        "precision": c.precision,
                        "recall": c.recall,
                        "f1": c.f1,
                        "auc": c.auc,
                        "auprc": c.auprc,
                        "support": c.support,
                    }),
                )
            })
            .collect();
        json!({
            "balanced_accuracy": self.balanced_accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "auc": self.auc,
            "auprc": self.auprc,
            "cross_entropy": self.cross_entropy,
            "confusion_matrix": self.confusion_matrix,
            "classes": classes,
            "n": self.n,
            "per_class": per_class,
            "auc_per_class": auc_per_class,
            "auc_skipped_classes": skipped(|c| c.auc),
            "auprc_skipped_classes": skipped(|c| c.auprc),
        })
    }
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
        // Class 0 ranked: 0.6 pos, 0.5 neg, 0.3 pos -> AP = 1/2 * 1 + 1/2 * 2/3. Classes 1, 2:
        // both positives on top -> 1.
        close(m.per_class[0].auprc.unwrap(), 5.0 / 6.0);
        close(m.auprc.unwrap(), (5.0 / 6.0 + 1.0 + 1.0) / 3.0);
        close(m.per_class[1].f1, 0.8);
        assert_eq!(m.per_class[2].support, 2);
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
        // Class 1: 0.5 pos, then the tie {0.2 neg, 0.2 pos} is one threshold:
        // AP = 1/2 * 1 + 1/2 * 2/3; class 0: 1.
        close(m.per_class[1].auprc.unwrap(), 5.0 / 6.0);
        close(m.auprc.unwrap(), (1.0 + 5.0 / 6.0) / 2.0);
        assert_eq!(json["auprc_skipped_classes"], json!(["c"]));
        assert_eq!(json["per_class"]["c"]["support"], json!(0));
        assert!(json["per_class"]["c"]["auprc"].is_null());
        assert_eq!(json["per_class"]["b"]["recall"], json!(0.5));
        close(json["auprc"].as_f64().unwrap(), 11.0 / 12.0);
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
