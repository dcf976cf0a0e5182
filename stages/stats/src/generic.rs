//! Bootstrap intervals and paired tests for any metrics computed from per-row multiplicities:
//! what survival (C-index) and regression (MAE, R^2, ...) tables use, with the same resampling
//! ([`Resampler`], stratified by the clusters' class: for survival the event indicator, for
//! regression one stratum), the same percentile intervals and the same one-sided p-value as
//! the classification metrics of [`crate::bootstrap`] and [`crate::paired`].

use crate::bootstrap::{interval, BootstrapConfig, Clusters, Resampler};
use crate::error::StatsError;

/// Per-metric percentile intervals (`None`: the metric is undefined in some resample).
pub fn intervals_of(
    clusters: &Clusters,
    config: &BootstrapConfig,
    n_metrics: usize,
    mut metrics: impl FnMut(&[u32]) -> Result<Vec<Option<f64>>, StatsError>,
) -> Result<Vec<Option<(f64, f64)>>, StatsError> {
    config.check()?;
    let mut resampler = Resampler::new(clusters, config.seed);
    let mut weights = Vec::new();
    let mut values: Vec<Vec<f64>> = vec![Vec::with_capacity(config.resamples); n_metrics];
    let mut defined = vec![true; n_metrics];
    for _ in 0..config.resamples {
        clusters.unit_weights_into(resampler.draw(), &mut weights);
        for (k, v) in metrics(&weights)?.into_iter().enumerate().take(n_metrics) {
            match v {
                Some(x) if x.is_finite() => values[k].push(x),
                _ => defined[k] = false,
            }
        }
    }
    Ok(values
        .iter_mut()
        .zip(defined)
        .map(|(v, ok)| if ok { interval(v, config.level) } else { None })
        .collect())
}

/// One metric's paired comparison of A against B.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedResult {
    /// metric(A) − metric(B) on the rows as they are.
    pub difference: Option<f64>,
    /// Percentile interval of the difference over the resamples.
    pub interval: Option<(f64, f64)>,
    /// One-sided p-value of "B is worse than A".
    pub p_worse: Option<f64>,
}

/// Paired bootstrap of two models' metrics on the same rows (`a`, `b`: the metrics under a
/// weighting; `lower_is_better[k]` for metric `k`).
pub fn paired_of(
    clusters: &Clusters,
    config: &BootstrapConfig,
    lower_is_better: &[bool],
    mut a: impl FnMut(Option<&[u32]>) -> Result<Vec<Option<f64>>, StatsError>,
    mut b: impl FnMut(Option<&[u32]>) -> Result<Vec<Option<f64>>, StatsError>,
) -> Result<Vec<PairedResult>, StatsError> {
    config.check()?;
    let n = lower_is_better.len();
    let (full_a, full_b) = (a(None)?, b(None)?);
    let mut resampler = Resampler::new(clusters, config.seed);
    let mut weights = Vec::new();
    let mut differences: Vec<Vec<f64>> = vec![Vec::with_capacity(config.resamples); n];
    let mut defined = vec![true; n];
    let mut not_worse = vec![0usize; n];
    for _ in 0..config.resamples {
        clusters.unit_weights_into(resampler.draw(), &mut weights);
        let (va, vb) = (a(Some(&weights))?, b(Some(&weights))?);
        for k in 0..n {
            match (va.get(k).copied().flatten(), vb.get(k).copied().flatten()) {
                (Some(x), Some(y)) if x.is_finite() && y.is_finite() => {
                    let d = x - y;
                    let advantage = if lower_is_better[k] { -d } else { d };
                    if advantage <= 0.0 {
                        not_worse[k] += 1;
                    }
                    differences[k].push(d);
                }
                _ => defined[k] = false,
            }
        }
    }
    Ok((0..n)
        .map(|k| PairedResult {
            difference: full_a
                .get(k)
                .copied()
                .flatten()
                .zip(full_b.get(k).copied().flatten())
                .map(|(x, y)| x - y),
            interval: if defined[k] {
                interval(&mut differences[k], config.level)
            } else {
                None
            },
            p_worse: defined[k].then(|| (1 + not_worse[k]) as f64 / (1 + config.resamples) as f64),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regression::RegressionMetrics;

    #[test]
    fn regression_intervals_cover_the_point_estimate_and_paired_finds_the_worse_model() {
        let truth: Vec<f64> = (0..60).map(|i| f64::from(i) / 10.0).collect();
        let good: Vec<f64> = truth
            .iter()
            .enumerate()
            .map(|(i, t)| t + if i % 2 == 0 { 0.1 } else { -0.1 })
            .collect();
        let bad: Vec<f64> = truth
            .iter()
            .enumerate()
            .map(|(i, t)| t + if i % 3 == 0 { 2.0 } else { -1.0 })
            .collect();
        let clusters = Clusters::units(&vec![0; truth.len()]);
        let config = BootstrapConfig {
            resamples: 200,
            level: 0.95,
            seed: 3,
        };
        let mae = |p: &[f64], w: Option<&[u32]>| -> Result<Vec<Option<f64>>, StatsError> {
            Ok(vec![
                RegressionMetrics::compute(&truth, p, w)?.map(|m| m.mae)
            ])
        };
        let ci = intervals_of(&clusters, &config, 1, |w| mae(&good, Some(w))).unwrap();
        let (lo, hi) = ci[0].unwrap();
        assert!(lo <= 0.1 + 1e-12 && 0.1 - 1e-12 <= hi, "{lo} {hi}");
        let paired = paired_of(
            &clusters,
            &config,
            &[true],
            |w| mae(&good, w),
            |w| mae(&bad, w),
        )
        .unwrap();
        assert!(paired[0].p_worse.unwrap() < 0.01, "{:?}", paired[0]);
        let same = paired_of(
            &clusters,
            &config,
            &[true],
            |w| mae(&good, w),
            |w| mae(&good, w),
        )
        .unwrap();
        assert_eq!(same[0].p_worse, Some(1.0));
    }
}
