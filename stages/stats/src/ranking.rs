//! Metrics of the scores: one-vs-rest ROC AUC and average precision (AUPRC) of one class,
//! exactly as scikit-learn's `roc_auc_score` and `average_precision_score`:
//! - tied scores form one threshold (the ROC curve takes them as one diagonal step, i.e. a tie
//!   between a positive and a negative counts one half);
//! - average precision is the step-wise sum `sum_n (R_n - R_{n-1}) P_n` over the distinct
//!   score thresholds, from the highest down, with no interpolation.
//!
//! The scores are sorted once ([`RankedScores`]); every weighting of the same rows (a bootstrap
//! resample) is then one pass over that order.

/// The rows in decreasing order of score, cut into groups of equal scores.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedScores {
    /// Row indices, highest score first.
    order: Vec<u32>,
    /// The end (exclusive, into `order`) of every group of equal scores.
    ends: Vec<u32>,
}

/// The ranking metrics of one class.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RankMetrics {
    /// ROC AUC; `None` without both positives and negatives.
    pub auc: Option<f64>,
    /// Average precision; `None` without both positives and negatives (scikit-learn gives 1
    /// for a class without negatives, a number that says nothing about the model).
    pub average_precision: Option<f64>,
}

impl RankedScores {
    /// Sorts the rows by decreasing score. Scores must be comparable (no NaN), which
    /// [`crate::Evaluator`] checks.
    pub fn new(scores: &[f64]) -> RankedScores {
        let mut order: Vec<u32> = (0..scores.len() as u32).collect();
        order.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
        let mut ends = Vec::new();
        for k in 1..order.len() {
            if scores[order[k] as usize] != scores[order[k - 1] as usize] {
                ends.push(k as u32);
            }
        }
        if !order.is_empty() {
            ends.push(order.len() as u32);
        }
        RankedScores { order, ends }
    }

    /// AUC and average precision with row `i` counted `weight(i)` times (0 leaves it out).
    pub fn metrics(
        &self,
        positive: impl Fn(usize) -> bool,
        weight: impl Fn(usize) -> u64,
    ) -> RankMetrics {
        // Positives / negatives above the current group, and twice the number of
        // (positive, negative) pairs ranked in order (a tie counts one, i.e. half a pair).
        let (mut tp, mut fp, mut ordered_pairs_x2) = (0u64, 0u64, 0u128);
        let mut precision_sum = 0.0f64;
        let mut start = 0usize;
        for &end in &self.ends {
            let (mut dp, mut dn) = (0u64, 0u64);
            for &row in &self.order[start..end as usize] {
                let (row, w) = (row as usize, weight(row as usize));
                if positive(row) {
                    dp += w;
                } else {
                    dn += w;
                }
            }
            start = end as usize;
            // Every negative of this group is outranked by the positives above it and ties
            // with the positives of the group.
            ordered_pairs_x2 += u128::from(dn) * (2 * u128::from(tp) + u128::from(dp));
            tp += dp;
            fp += dn;
            if dp > 0 {
                // (R_n - R_{n-1}) P_n, times the number of positives.
                precision_sum += dp as f64 * (tp as f64 / (tp + fp) as f64);
            }
        }
        if tp == 0 || fp == 0 {
            return RankMetrics::default();
        }
        RankMetrics {
            auc: Some(ordered_pairs_x2 as f64 / (2.0 * tp as f64 * fp as f64)),
            average_precision: Some(precision_sum / tp as f64),
        }
    }
}

/// ROC AUC of `scores` for `positive`; ties count one half. `None` without both positives and
/// negatives.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    RankedScores::new(scores)
        .metrics(|i| positive[i], |_| 1)
        .auc
}

/// Average precision (area under the precision-recall curve as a step function, no
/// interpolation) of `scores` for `positive`. `None` without both positives and negatives.
pub fn average_precision(scores: &[f64], positive: &[bool]) -> Option<f64> {
    RankedScores::new(scores)
        .metrics(|i| positive[i], |_| 1)
        .average_precision
}

/// Macro one-vs-rest AUC and AUPRC of row-major `probs` (`labels.len() x n_classes`), and
/// every class's ranking metrics (`None` where the class has no positives or no negatives).
fn macro_ovr(labels: &[usize], probs: &[f32], n_classes: usize) -> Vec<RankMetrics> {
    (0..n_classes)
        .map(|c| {
            let scores: Vec<f64> = (0..labels.len())
                .map(|i| f64::from(probs[i * n_classes + c]))
                .collect();
            RankedScores::new(&scores).metrics(|i| labels[i] == c, |_| 1)
        })
        .collect()
}

fn mean_defined(values: &[Option<f64>]) -> Option<f64> {
    let defined: Vec<f64> = values.iter().flatten().copied().collect();
    (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64)
}

/// Macro one-vs-rest ROC AUC (mean over the classes with positives and negatives) and the AUC
/// of every class.
pub fn macro_auc_ovr(
    labels: &[usize],
    probs: &[f32],
    n_classes: usize,
) -> (Option<f64>, Vec<Option<f64>>) {
    let per_class: Vec<Option<f64>> = macro_ovr(labels, probs, n_classes)
        .iter()
        .map(|r| r.auc)
        .collect();
    (mean_defined(&per_class), per_class)
}

/// Macro one-vs-rest average precision (mean over the classes with positives and negatives)
/// and the average precision of every class.
pub fn macro_auprc_ovr(
    labels: &[usize],
    probs: &[f32],
    n_classes: usize,
) -> (Option<f64>, Vec<Option<f64>>) {
    let per_class: Vec<Option<f64>> = macro_ovr(labels, probs, n_classes)
        .iter()
        .map(|r| r.average_precision)
        .collect();
    (mean_defined(&per_class), per_class)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn average_precision_by_hand_without_ties() {
        // Ranked: 0.9 pos, 0.8 neg, 0.7 pos, 0.1 neg. Thresholds: P@1 = 1 (R 1/2), P@3 = 2/3
        // (R 1) -> 1/2 * 1 + 1/2 * 2/3.
        let ap = average_precision(&[0.1, 0.7, 0.8, 0.9], &[false, true, false, true]).unwrap();
        close(ap, 0.5 + 1.0 / 3.0);
    }

    #[test]
    fn average_precision_takes_tied_scores_as_one_threshold() {
        // 0.9 pos; then {0.5 pos, 0.5 neg, 0.5 pos} tied; then 0.2 neg.
        // Threshold 0.9: R 1/3, P 1. Threshold 0.5: R 1, P 3/4 (3 of 4 above).
        // AP = 1/3 * 1 + 2/3 * 3/4 = 5/6 (an interpolating or tie-splitting version differs).
        let scores = [0.5, 0.9, 0.5, 0.2, 0.5];
        let positive = [true, true, false, false, true];
        close(average_precision(&scores, &positive).unwrap(), 5.0 / 6.0);
        // Every score tied: one threshold, P = prevalence.
        close(
            average_precision(&[0.3; 4], &[true, false, false, false]).unwrap(),
            0.25,
        );
        assert_eq!(average_precision(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(average_precision(&[0.1, 0.2], &[false, false]), None);
    }

    #[test]
    fn auc_counts_ordered_pairs_and_ties_as_half() {
        close(
            roc_auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap(),
            0.75,
        );
        close(
            roc_auc(&[0.5, 0.5, 0.2, 0.9], &[false, true, false, true]).unwrap(),
            3.5 / 4.0,
        );
        close(
            roc_auc(&[0.3; 4], &[true, false, true, false]).unwrap(),
            0.5,
        );
    }

    #[test]
    fn weights_equal_repeated_rows() {
        let scores = [0.5, 0.9, 0.5, 0.2, 0.5, 0.7];
        let positive = [true, true, false, false, true, false];
        let weights = [2u64, 0, 1, 3, 1, 2];
        let ranked = RankedScores::new(&scores);
        let weighted = ranked.metrics(|i| positive[i], |i| weights[i]);
        let (mut s, mut p) = (Vec::new(), Vec::new());
        for i in 0..scores.len() {
            for _ in 0..weights[i] {
                s.push(scores[i]);
                p.push(positive[i]);
            }
        }
        close(weighted.auc.unwrap(), roc_auc(&s, &p).unwrap());
        close(
            weighted.average_precision.unwrap(),
            average_precision(&s, &p).unwrap(),
        );
    }
}
