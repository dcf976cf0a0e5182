//! ROC curves from a run's per-slide predictions (`predictions.parquet`: `split`,
//! `label_index`, `probs` in class order). Binary: the second class is the positive one.
//! Multi-class: the micro-averaged one-vs-rest curve (every (slide, class) pair a decision).

use crate::error::ReportError;
use crate::runs::read_predictions;
use std::path::Path;

/// (score, is positive) pairs of one split of a predictions file (read by
/// [`crate::runs::read_predictions`]): the positive class's probability for two classes, every
/// class's one-vs-rest probability otherwise.
pub fn read_scores(path: &Path, split: &str) -> Result<Vec<(f64, bool)>, ReportError> {
    let mut pairs = Vec::new();
    for row in read_predictions(path)?
        .into_iter()
        .filter(|r| r.split == split)
    {
        if row.probs.len() == 2 {
            pairs.push((f64::from(row.probs[1]), row.label_index == 1));
        } else {
            for (c, p) in row.probs.iter().enumerate() {
                pairs.push((f64::from(*p), row.label_index == c));
            }
        }
    }
    Ok(pairs)
}

/// The ROC curve's (false positive rate, true positive rate) points, from (0,0) to (1,1), tied
/// scores taken together (a diagonal step). `None` when either class is absent.
pub fn roc_curve(pairs: &[(f64, bool)]) -> Option<Vec<(f64, f64)>> {
    let positives = pairs.iter().filter(|p| p.1).count();
    let negatives = pairs.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut sorted = pairs.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < sorted.len() {
        let score = sorted[i].0;
        while i < sorted.len() && sorted[i].0 == score {
            if sorted[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        points.push((fp as f64 / negatives as f64, tp as f64 / positives as f64));
    }
    Some(points)
}

/// Area under a curve by the trapezoidal rule (= the ROC AUC with ties counted half).
pub fn area(points: &[(f64, f64)]) -> f64 {
    points
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_by_hand_with_ties() {
        // scores: pos 0.9, neg 0.8, pos 0.5, neg 0.5 (tie), neg 0.1
        let pairs = [
            (0.9, true),
            (0.8, false),
            (0.5, true),
            (0.5, false),
            (0.1, false),
        ];
        let c = roc_curve(&pairs).unwrap();
        let third = 1.0 / 3.0;
        let expected = [
            (0.0, 0.0),
            (0.0, 0.5),
            (third, 0.5),
            (2.0 * third, 1.0),
            (1.0, 1.0),
        ];
        assert_eq!(c.len(), expected.len());
        for (a, b) in c.iter().zip(expected) {
            assert!(
                (a.0 - b.0).abs() < 1e-12 && (a.1 - b.1).abs() < 1e-12,
                "{c:?}"
            );
        }
        // AUC by pairs: (0.9 beats 3 negatives) + (0.5 beats 0.1, ties 0.5: 1.5) = 4.5 of 6
        assert!((area(&c) - 0.75).abs() < 1e-12);
        assert!(roc_curve(&[(0.3, true)]).is_none());
    }
}
