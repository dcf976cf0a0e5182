//! Regression metrics of predicted against true values, as scikit-learn and scipy define them:
//! mean absolute error, root mean squared error, Pearson's r, Spearman's rho (Pearson's r of
//! average ranks, ties sharing their mean rank) and the coefficient of determination R^2
//! (`1 - SS_res / SS_tot`; scikit-learn's convention for a constant truth: 1 when the
//! predictions are exact, else 0).
//!
//! Like every metric of this crate they take optional per-row multiplicities (a bootstrap
//! resample): a multiplicity `k` is the row repeated `k` times.

use crate::error::StatsError;

/// The metrics of one set of predictions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegressionMetrics {
    pub mae: f64,
    pub rmse: f64,
    /// `None` when the truth or the predictions are constant.
    pub pearson: Option<f64>,
    /// `None` when the truth or the predictions are constant.
    pub spearman: Option<f64>,
    pub r2: f64,
    /// Rows (with multiplicity).
    pub n: f64,
}

impl RegressionMetrics {
    /// The metrics of `predicted` against `truth`; `None` without a row.
    pub fn compute(
        truth: &[f64],
        predicted: &[f64],
        weights: Option<&[u32]>,
    ) -> Result<Option<RegressionMetrics>, StatsError> {
        if truth.len() != predicted.len() || weights.is_some_and(|w| w.len() != truth.len()) {
            return Err(StatsError::Regression(format!(
                "{} true values, {} predictions, {} weights",
                truth.len(),
                predicted.len(),
                weights.map_or(truth.len(), <[u32]>::len)
            )));
        }
        if let Some(i) =
            (0..truth.len()).find(|&i| !truth[i].is_finite() || !predicted[i].is_finite())
        {
            return Err(StatsError::Regression(format!(
                "row {i}: true value {} / prediction {} is not finite",
                truth[i], predicted[i]
            )));
        }
        let w: Vec<f64> = (0..truth.len())
            .map(|i| weights.map_or(1.0, |w| f64::from(w[i])))
            .collect();
        let n: f64 = w.iter().sum();
        if n == 0.0 {
            return Ok(None);
        }
        let mean = |x: &[f64]| x.iter().zip(&w).map(|(v, w)| v * w).sum::<f64>() / n;
        let mae = truth
            .iter()
            .zip(predicted)
            .zip(&w)
            .map(|((t, p), w)| w * (t - p).abs())
            .sum::<f64>()
            / n;
        let ss_res: f64 = truth
            .iter()
            .zip(predicted)
            .zip(&w)
            .map(|((t, p), w)| w * (t - p) * (t - p))
            .sum();
        let mean_truth = mean(truth);
        let ss_tot: f64 = truth
            .iter()
            .zip(&w)
            .map(|(t, w)| w * (t - mean_truth) * (t - mean_truth))
            .sum();
        let r2 = if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else if ss_res == 0.0 {
            1.0
        } else {
            0.0
        };
        Ok(Some(RegressionMetrics {
            mae,
            rmse: (ss_res / n).sqrt(),
            pearson: pearson(truth, predicted, &w),
            spearman: pearson(&ranks(truth, &w), &ranks(predicted, &w), &w),
            r2,
            n,
        }))
    }
}

/// Weighted Pearson correlation; `None` when either side is constant.
fn pearson(x: &[f64], y: &[f64], w: &[f64]) -> Option<f64> {
    let n: f64 = w.iter().sum();
    let mx = x.iter().zip(w).map(|(v, w)| v * w).sum::<f64>() / n;
    let my = y.iter().zip(w).map(|(v, w)| v * w).sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..x.len() {
        let (dx, dy) = (x[i] - mx, y[i] - my);
        sxy += w[i] * dx * dy;
        sxx += w[i] * dx * dx;
        syy += w[i] * dy * dy;
    }
    (sxx > 0.0 && syy > 0.0).then(|| (sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0))
}

/// Average ranks (1-based) of `x` in the data set where row `i` appears `w[i]` times.
fn ranks(x: &[f64], w: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).filter(|&i| w[i] > 0.0).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut out = vec![0.0; x.len()];
    let mut below = 0.0;
    let mut k = 0;
    while k < order.len() {
        let mut end = k;
        let mut count = 0.0;
        while end < order.len() && x[order[end]] == x[order[k]] {
            count += w[order[end]];
            end += 1;
        }
        // Ranks below+1 ..= below+count share their mean.
        let rank = below + (count + 1.0) / 2.0;
        for &i in &order[k..end] {
            out[i] = rank;
        }
        below += count;
        k = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_metrics() {
        let truth = [1.0, 2.0, 3.0, 4.0];
        let predicted = [1.5, 2.0, 2.0, 5.0];
        let m = RegressionMetrics::compute(&truth, &predicted, None)
            .unwrap()
            .unwrap();
        assert!((m.mae - (0.5 + 0.0 + 1.0 + 1.0) / 4.0).abs() < 1e-15);
        assert!((m.rmse - (2.25f64 / 4.0).sqrt()).abs() < 1e-15);
        // SS_tot = 5, SS_res = 2.25.
        assert!((m.r2 - (1.0 - 2.25 / 5.0)).abs() < 1e-15);
        // Ranks of predicted: 1, 2.5, 2.5, 4 against 1, 2, 3, 4.
        let rho = m.spearman.unwrap();
        let expected = {
            let (x, y) = ([1.0, 2.0, 3.0, 4.0], [1.0, 2.5, 2.5, 4.0]);
            let (mx, my) = (2.5, 2.5);
            let sxy: f64 = (0..4).map(|i| (x[i] - mx) * (y[i] - my)).sum();
            let sxx: f64 = (0..4).map(|i| (x[i] - mx) * (x[i] - mx)).sum();
            let syy: f64 = (0..4).map(|i| (y[i] - my) * (y[i] - my)).sum();
            sxy / (sxx * syy).sqrt()
        };
        assert!((rho - expected).abs() < 1e-15);
    }

    #[test]
    fn multiplicities_are_repeated_rows() {
        let truth = [1.0, 2.0, 3.0];
        let predicted = [1.2, 1.9, 3.5];
        let w = [2, 0, 1];
        let a = RegressionMetrics::compute(&truth, &predicted, Some(&w))
            .unwrap()
            .unwrap();
        let b = RegressionMetrics::compute(&[1.0, 1.0, 3.0], &[1.2, 1.2, 3.5], None)
            .unwrap()
            .unwrap();
        assert!((a.mae - b.mae).abs() < 1e-15 && (a.r2 - b.r2).abs() < 1e-12);
        assert_eq!(a.spearman, b.spearman);
        let constant = RegressionMetrics::compute(&[2.0, 2.0], &[2.0, 2.0], None)
            .unwrap()
            .unwrap();
        assert_eq!((constant.r2, constant.pearson), (1.0, None));
    }
}
