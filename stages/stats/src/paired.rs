//! A paired bootstrap test of two models' predictions on the same slides: the slides are
//! resampled jointly (stratified by class, as in [`crate::bootstrap`]), both models are scored
//! on every resample, and the distribution of their difference says whether B is worse than A
//! beyond what the choice of test slides explains.
//!
//! The p-value is that of the percentile bootstrap: the share of resamples in which B is at
//! least as good as A, `(1 + #{advantage of A <= 0}) / (1 + resamples)` — the smallest
//! one-sided level at which the percentile interval of the difference excludes 0. Identical
//! predictions give p = 1; a model worse on every resample gives `1 / (1 + resamples)`.

use crate::bootstrap::{interval, BootstrapConfig, Clusters, Resampler};
use crate::error::StatsError;
use crate::evaluator::{Evaluator, Scratch};
use crate::metric::Metric;

/// The comparison of A and B on one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedComparison {
    pub metric: Metric,
    /// metric(A) − metric(B) on the slides as they are.
    pub difference: Option<f64>,
    /// The percentile interval of metric(A) − metric(B) over the resamples.
    pub interval: Option<(f64, f64)>,
    /// One-sided p-value of "B is worse than A" (worse: lower, or higher for the
    /// cross-entropy); `None` when the metric is undefined in some resample.
    pub p_worse: Option<f64>,
}

/// Compares `b` with `a` on every metric. `a` and `b` hold the predictions of the same rows
/// (same labels, same order); `clusters` says which rows are the same slide.
pub fn paired_bootstrap(
    a: &Evaluator,
    b: &Evaluator,
    clusters: &Clusters,
    config: &BootstrapConfig,
) -> Result<Vec<PairedComparison>, StatsError> {
    config.check()?;
    if a.labels() != b.labels() || a.n_classes() != b.n_classes() {
        return Err(StatsError::Unpaired(format!(
            "{} rows of {} classes against {} rows of {} classes, or other labels",
            a.len(),
            a.n_classes(),
            b.len(),
            b.n_classes()
        )));
    }
    if clusters.n_units() != a.len() {
        return Err(StatsError::Clusters(format!(
            "{} rows in the clusters, {} predictions",
            clusters.n_units(),
            a.len()
        )));
    }
    let (full_a, full_b) = (a.evaluate().values, b.evaluate().values);
    let mut resampler = Resampler::new(clusters, config.seed);
    let (mut scratch_a, mut scratch_b) = (Scratch::default(), Scratch::default());
    let mut weights = Vec::new();
    let mut differences: Vec<Vec<f64>> = (0..7)
        .map(|_| Vec::with_capacity(config.resamples))
        .collect();
    let mut defined = [true; 7];
    let mut not_worse = [0usize; 7];
    for _ in 0..config.resamples {
        clusters.unit_weights_into(resampler.draw(), &mut weights);
        let va = a.values_into(|i| u64::from(weights[i]), &mut scratch_a);
        let vb = b.values_into(|i| u64::from(weights[i]), &mut scratch_b);
        for m in Metric::ALL {
            let k = m as usize;
            match (va.get(m), vb.get(m)) {
                (Some(x), Some(y)) => {
                    let d = x - y;
                    let advantage = if m.lower_is_better() { -d } else { d };
                    if advantage <= 0.0 {
                        not_worse[k] += 1;
                    }
                    differences[k].push(d);
                }
                _ => defined[k] = false,
            }
        }
    }
    Ok(Metric::ALL
        .into_iter()
        .map(|m| {
            let k = m as usize;
            let ok = defined[k];
            PairedComparison {
                metric: m,
                difference: full_a.get(m).zip(full_b.get(m)).map(|(x, y)| x - y),
                interval: if ok {
                    interval(&mut differences[k], config.level)
                } else {
                    None
                },
                p_worse: ok.then(|| (1 + not_worse[k]) as f64 / (1 + config.resamples) as f64),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 80 binary slides: A ranks them well; B is A with its scores for half of the slides of
    /// each class swapped towards the other class.
    fn models() -> (Vec<usize>, Evaluator, Evaluator) {
        let labels: Vec<usize> = (0..80).map(|i| i % 2).collect();
        let score_a: Vec<f32> = (0..80)
            .map(|i| {
                let base = if i % 2 == 1 { 0.7 } else { 0.3 };
                base + ((i * 7) % 5) as f32 / 25.0 - 0.08
            })
            .collect();
        let score_b: Vec<f32> = score_a
            .iter()
            .enumerate()
            .map(|(i, &s)| if (i / 2) % 2 == 0 { 1.0 - s } else { s })
            .collect();
        let ev = |scores: &[f32]| {
            let probs: Vec<f32> = scores.iter().flat_map(|&s| [1.0 - s, s]).collect();
            let predicted: Vec<usize> = scores.iter().map(|&s| usize::from(s > 0.5)).collect();
            Evaluator::new(&labels, &predicted, &probs, 2).unwrap()
        };
        let (a, b) = (ev(&score_a), ev(&score_b));
        (labels, a, b)
    }

    fn config(seed: u64) -> BootstrapConfig {
        BootstrapConfig {
            resamples: 1000,
            level: 0.95,
            seed,
        }
    }

    #[test]
    fn identical_predictions_are_not_worse() {
        let (labels, a, _) = models();
        let clusters = Clusters::units(&labels);
        for c in paired_bootstrap(&a, &a.clone(), &clusters, &config(1)).unwrap() {
            assert_eq!(c.p_worse, Some(1.0), "{c:?}");
            assert_eq!(c.difference, Some(0.0));
            assert_eq!(c.interval, Some((0.0, 0.0)));
        }
    }

    #[test]
    fn a_clearly_worse_model_is_significantly_worse_and_the_test_is_seeded() {
        let (labels, a, b) = models();
        let clusters = Clusters::units(&labels);
        let result = paired_bootstrap(&a, &b, &clusters, &config(1)).unwrap();
        for m in [Metric::BalancedAccuracy, Metric::Auc, Metric::CrossEntropy] {
            let c = result[m as usize];
            assert_eq!(c.metric, m);
            assert!(c.p_worse.unwrap() < 0.05, "{c:?}");
            let (lo, hi) = c.interval.unwrap();
            let d = c.difference.unwrap();
            assert!(lo <= d && d <= hi, "{c:?}");
        }
        // Seen from B, A is not worse.
        let reverse = paired_bootstrap(&b, &a, &clusters, &config(1)).unwrap();
        assert!(reverse[Metric::Auc as usize].p_worse.unwrap() > 0.5);
        assert_eq!(
            result,
            paired_bootstrap(&a, &b, &clusters, &config(1)).unwrap()
        );
        assert_ne!(
            result[Metric::Auc as usize].interval,
            paired_bootstrap(&a, &b, &clusters, &config(2)).unwrap()[Metric::Auc as usize].interval
        );
    }

    #[test]
    fn unpaired_predictions_are_refused() {
        let (labels, a, _) = models();
        let other = Evaluator::new(&[0, 1], &[0, 1], &[0.9, 0.1, 0.2, 0.8], 2).unwrap();
        let err = paired_bootstrap(&a, &other, &Clusters::units(&labels), &config(0));
        assert!(matches!(err, Err(StatsError::Unpaired(_))), "{err:?}");
    }
}
