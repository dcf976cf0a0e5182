//! ROC curves from a run's per-slide predictions (`predictions.parquet`: `split`,
//! `label_index`, `probs` in class order). Binary: the second class is the positive one.
//! Multi-class: the micro-averaged one-vs-rest curve (every (slide, class) pair a decision).

use crate::error::ReportError;
use arrow::array::AsArray;
use arrow::datatypes::{Float32Type, Int64Type};
use std::path::Path;

/// (score, is positive) pairs of one split of a predictions file.
pub fn read_scores(path: &Path, split: &str) -> Result<Vec<(f64, bool)>, ReportError> {
    let bad = |message: String| ReportError::Table {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| ReportError::io(path, e))?;
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut pairs = Vec::new();
    for batch in reader {
        let batch = batch?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| bad(format!("no `{name}` column")))
        };
        let splits = column("split")?
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("`split` is not Utf8".into()))?;
        let labels = column("label_index")?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| bad("`label_index` is not Int64".into()))?;
        let probs = column("probs")?
            .as_list_opt::<i32>()
            .ok_or_else(|| bad("`probs` is not a list".into()))?;
        for row in 0..batch.num_rows() {
            if splits.value(row) != split {
                continue;
            }
            let p = probs.value(row);
            let p = p
                .as_primitive_opt::<Float32Type>()
                .ok_or_else(|| bad("`probs` items are not Float32".into()))?;
            let label = labels.value(row);
            let n = p.len();
            if n == 2 {
                pairs.push((f64::from(p.value(1)), label == 1));
            } else {
                for c in 0..n {
                    pairs.push((f64::from(p.value(c)), label == c as i64));
                }
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
