//! Metrics of the hard predictions, from the confusion matrix: balanced accuracy and macro
//! precision / recall / F1 as scikit-learn computes them (`balanced_accuracy_score`,
//! `precision_recall_fscore_support(average="macro", zero_division=0)`).

/// One class's row and column totals of a confusion matrix: all the hard-prediction metrics
/// need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassCounts {
    /// Slides of the class predicted as the class.
    pub true_positives: u64,
    /// Slides predicted as the class.
    pub predicted: u64,
    /// Slides of the class.
    pub support: u64,
}

impl ClassCounts {
    /// The counts of every class of `cm[true][predicted]`.
    pub fn of_matrix(cm: &[Vec<u64>]) -> Vec<ClassCounts> {
        (0..cm.len())
            .map(|c| ClassCounts {
                true_positives: cm[c].get(c).copied().unwrap_or(0),
                predicted: cm.iter().map(|row| row.get(c).copied().unwrap_or(0)).sum(),
                support: cm[c].iter().sum(),
            })
            .collect()
    }

    /// Precision, recall and F1 of the class; a 0/0 ratio counts as 0.
    pub fn precision_recall_f1(&self) -> (f64, f64, f64) {
        let precision = ratio(self.true_positives, self.predicted);
        let recall = ratio(self.true_positives, self.support);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        (precision, recall, f1)
    }
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// `cm[true][predicted]` counts (pairs with an index out of range are left out).
pub fn confusion_matrix(labels: &[usize], predicted: &[usize], n_classes: usize) -> Vec<Vec<u64>> {
    let mut cm = vec![vec![0u64; n_classes]; n_classes];
    for (&t, &p) in labels.iter().zip(predicted) {
        if t < n_classes && p < n_classes {
            cm[t][p] += 1;
        }
    }
    cm
}

/// Mean recall over the classes present in the labels (0 without any).
pub fn balanced_accuracy(cm: &[Vec<u64>]) -> f64 {
    balanced_accuracy_of(&ClassCounts::of_matrix(cm))
}

/// Macro precision, recall and F1 over the classes present in the labels or the predictions.
pub fn macro_precision_recall_f1(cm: &[Vec<u64>]) -> (f64, f64, f64) {
    macro_precision_recall_f1_of(&ClassCounts::of_matrix(cm))
}

/// Precision, recall, F1 of every class of `cm` (0/0 counts as 0).
pub fn per_class_precision_recall_f1(cm: &[Vec<u64>]) -> Vec<(f64, f64, f64)> {
    ClassCounts::of_matrix(cm)
        .iter()
        .map(ClassCounts::precision_recall_f1)
        .collect()
}

/// [`balanced_accuracy`] from the class totals.
pub(crate) fn balanced_accuracy_of(counts: &[ClassCounts]) -> f64 {
    mean(
        counts
            .iter()
            .filter(|c| c.support > 0)
            .map(|c| ratio(c.true_positives, c.support)),
    )
    .unwrap_or(0.0)
}

/// [`macro_precision_recall_f1`] from the class totals.
pub(crate) fn macro_precision_recall_f1_of(counts: &[ClassCounts]) -> (f64, f64, f64) {
    let (mut p, mut r, mut f, mut n) = (0.0, 0.0, 0.0, 0usize);
    for c in counts.iter().filter(|c| c.support > 0 || c.predicted > 0) {
        let (precision, recall, f1) = c.precision_recall_f1();
        p += precision;
        r += recall;
        f += f1;
        n += 1;
    }
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let n = n as f64;
    (p / n, r / n, f / n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_counts_and_macro_averages_by_hand() {
        // cm rows (true): [1,1,0], [0,2,0], [1,0,1].
        let cm = confusion_matrix(&[0, 0, 1, 1, 2, 2], &[0, 1, 1, 1, 2, 0], 3);
        assert_eq!(cm, vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]);
        let counts = ClassCounts::of_matrix(&cm);
        assert_eq!(
            counts[0],
            ClassCounts {
                true_positives: 1,
                predicted: 2,
                support: 2
            }
        );
        assert!((balanced_accuracy(&cm) - 2.0 / 3.0).abs() < 1e-12);
        let (p, r, f) = macro_precision_recall_f1(&cm);
        assert!((p - (0.5 + 2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
        assert!((r - 2.0 / 3.0).abs() < 1e-12);
        assert!((f - (0.5 + 0.8 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        let per = per_class_precision_recall_f1(&cm);
        assert!((per[1].2 - 0.8).abs() < 1e-12);
        // A class neither present nor predicted is left out of the macro averages.
        let cm = confusion_matrix(&[0, 1], &[0, 1], 3);
        assert_eq!(macro_precision_recall_f1(&cm), (1.0, 1.0, 1.0));
        assert_eq!(balanced_accuracy(&confusion_matrix(&[], &[], 2)), 0.0);
    }
}
