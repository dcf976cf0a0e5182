//! Stratified bootstrap confidence intervals: the slides are resampled with replacement within
//! each class (every class keeps its number of slides, so a resample never loses the only
//! positive of a class and the class balance — which balanced accuracy and AUPRC depend on —
//! stays that of the split), every metric is recomputed on each resample, and the interval is
//! the percentile interval of those values. Seeded: the same seed gives the same interval.
//!
//! A row of the predictions is a *unit*; the slides drawn are *clusters* of units. Usually one
//! slide is one row ([`Clusters::units`]); when the predictions of several runs are pooled, a
//! slide predicted by every run is one cluster of several rows ([`Clusters::by_key`]) and is
//! drawn as a whole, so repeats of the same slides do not pass for more slides than there are.

use crate::error::StatsError;
use crate::evaluator::{Evaluator, Scratch};
use crate::metric::Metric;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::hash::Hash;

/// How to bootstrap: `resamples` draws, a two-sided `level` interval, the generator's seed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BootstrapConfig {
    /// Number of resamples drawn.
    pub resamples: usize,
    /// Coverage of the interval, e.g. 0.95.
    pub level: f64,
    /// Seed of the generator: the same seed draws the same resamples.
    pub seed: u64,
}

impl Default for BootstrapConfig {
    /// 1000 resamples, 95% intervals, seed 0.
    fn default() -> Self {
        BootstrapConfig {
            resamples: 1000,
            level: 0.95,
            seed: 0,
        }
    }
}

impl BootstrapConfig {
    /// At least one resample and a level strictly between 0 and 1.
    pub fn check(&self) -> Result<(), StatsError> {
        if self.resamples == 0 {
            return Err(StatsError::Config("needs at least one resample".into()));
        }
        if !(self.level > 0.0 && self.level < 1.0) {
            return Err(StatsError::Config(format!(
                "level {} is not strictly between 0 and 1",
                self.level
            )));
        }
        Ok(())
    }
}

/// Which slide (cluster) each row belongs to, and the class of each slide.
#[derive(Debug, Clone, PartialEq)]
pub struct Clusters {
    unit_cluster: Vec<u32>,
    cluster_class: Vec<usize>,
}

impl Clusters {
    /// Every row its own slide.
    pub fn units(labels: &[usize]) -> Clusters {
        Clusters {
            unit_cluster: (0..labels.len() as u32).collect(),
            cluster_class: labels.to_vec(),
        }
    }

    /// Rows with equal keys (the same slide in several runs) form one slide, numbered in order
    /// of first appearance. A key with two labels is an error.
    pub fn by_key<K: Eq + Hash + std::fmt::Debug>(
        keys: &[K],
        labels: &[usize],
    ) -> Result<Clusters, StatsError> {
        if keys.len() != labels.len() {
            return Err(StatsError::Clusters(format!(
                "{} keys for {} labels",
                keys.len(),
                labels.len()
            )));
        }
        let mut index: HashMap<&K, u32> = HashMap::new();
        let mut cluster_class = Vec::new();
        let mut unit_cluster = Vec::with_capacity(keys.len());
        for (key, &label) in keys.iter().zip(labels) {
            let next = cluster_class.len() as u32;
            let c = *index.entry(key).or_insert(next);
            if c == next {
                cluster_class.push(label);
            } else if cluster_class[c as usize] != label {
                return Err(StatsError::Clusters(format!(
                    "{key:?} has labels {} and {label}",
                    cluster_class[c as usize]
                )));
            }
            unit_cluster.push(c);
        }
        Ok(Clusters {
            unit_cluster,
            cluster_class,
        })
    }

    /// Number of rows.
    pub fn n_units(&self) -> usize {
        self.unit_cluster.len()
    }

    /// Number of slides.
    pub fn n_clusters(&self) -> usize {
        self.cluster_class.len()
    }

    /// Per-row weights from per-slide multiplicities.
    pub(crate) fn unit_weights_into(&self, counts: &[u32], out: &mut Vec<u32>) {
        out.clear();
        out.extend(self.unit_cluster.iter().map(|&c| counts[c as usize]));
    }
}

/// Draws stratified resamples of the slides.
#[derive(Debug, Clone)]
pub struct Resampler {
    rng: ChaCha8Rng,
    /// The slides of every class, in slide order.
    strata: Vec<Vec<u32>>,
    counts: Vec<u32>,
}

impl Resampler {
    /// A generator of resamples of `clusters`' slides, seeded.
    pub fn new(clusters: &Clusters, seed: u64) -> Resampler {
        let n_classes = clusters.cluster_class.iter().max().map_or(0, |&c| c + 1);
        let mut strata = vec![Vec::new(); n_classes];
        for (i, &c) in clusters.cluster_class.iter().enumerate() {
            strata[c].push(i as u32);
        }
        strata.retain(|s| !s.is_empty());
        Resampler {
            rng: ChaCha8Rng::seed_from_u64(seed),
            strata,
            counts: vec![0; clusters.n_clusters()],
        }
    }

    /// One resample: how many times each slide is drawn. Each class's slides are drawn with
    /// replacement as many times as the class has slides.
    pub fn draw(&mut self) -> &[u32] {
        self.counts.fill(0);
        for stratum in &self.strata {
            for _ in 0..stratum.len() {
                let k = self.rng.random_range(0..stratum.len());
                self.counts[stratum[k] as usize] += 1;
            }
        }
        &self.counts
    }
}

/// The `q`-quantile (0..=1) of sorted values, interpolated linearly between the two nearest
/// ranks (numpy's default `percentile` method).
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let position = q.clamp(0.0, 1.0) * last as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(last);
    let fraction = position - below as f64;
    Some(sorted[below] + (sorted[above] - sorted[below]) * fraction)
}

/// The percentile interval of the values, or `None` for none.
pub(crate) fn interval(values: &mut [f64], level: f64) -> Option<(f64, f64)> {
    values.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    Some((percentile(values, tail)?, percentile(values, 1.0 - tail)?))
}

/// Bootstrap confidence intervals of every metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Intervals {
    /// The bootstrap that gave the intervals.
    pub config: BootstrapConfig,
    bounds: [Option<(f64, f64)>; 7],
}

impl Intervals {
    /// The `(low, high)` interval of `metric`; `None` when the metric is undefined in some
    /// resample (an AUC of a split with one class).
    pub fn get(&self, metric: Metric) -> Option<(f64, f64)> {
        self.bounds[metric as usize]
    }

    /// The metrics without an interval.
    pub fn undefined(&self) -> Vec<Metric> {
        Metric::ALL
            .into_iter()
            .filter(|&m| self.get(m).is_none())
            .collect()
    }
}

/// Runs the bootstrap: `config.resamples` stratified resamples of `clusters`' slides, every
/// metric of `evaluator` on each, and their percentile intervals.
pub fn confidence_intervals(
    evaluator: &Evaluator,
    clusters: &Clusters,
    config: &BootstrapConfig,
) -> Result<Intervals, StatsError> {
    config.check()?;
    if clusters.n_units() != evaluator.len() {
        return Err(StatsError::Clusters(format!(
            "{} rows in the clusters, {} predictions",
            clusters.n_units(),
            evaluator.len()
        )));
    }
    let mut resampler = Resampler::new(clusters, config.seed);
    let mut scratch = Scratch::default();
    let mut values: Vec<Vec<f64>> = (0..7)
        .map(|_| Vec::with_capacity(config.resamples))
        .collect();
    let mut defined = [true; 7];
    for _ in 0..config.resamples {
        let mut weights = std::mem::take(&mut scratch.weights);
        clusters.unit_weights_into(resampler.draw(), &mut weights);
        let v = evaluator.values_into(|i| u64::from(weights[i]), &mut scratch);
        scratch.weights = weights;
        for m in Metric::ALL {
            match v.get(m) {
                Some(x) => values[m as usize].push(x),
                None => defined[m as usize] = false,
            }
        }
    }
    let mut bounds = [None; 7];
    for m in Metric::ALL {
        if defined[m as usize] {
            bounds[m as usize] = interval(&mut values[m as usize], config.level);
        }
    }
    Ok(Intervals {
        config: *config,
        bounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 60 slides of 3 classes with informative but noisy scores on a 0.1 grid (ties).
    fn sample() -> (Vec<usize>, Vec<usize>, Vec<f32>) {
        let mut state = 12345u64;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as f32 / (1u64 << 31) as f32
        };
        let (mut labels, mut predicted, mut probs) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..60usize {
            let label = i % 3;
            let mut p: Vec<f32> = (0..3).map(|_| uniform()).collect();
            p[label] += 0.6;
            let sum: f32 = p.iter().sum();
            let p: Vec<f32> = p.iter().map(|x| (x / sum * 10.0).round() / 10.0).collect();
            let argmax = (0..3).fold(0, |a, k| if p[k] > p[a] { k } else { a });
            labels.push(label);
            predicted.push(argmax);
            probs.extend(p);
        }
        (labels, predicted, probs)
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        // np.percentile(v, [2.5, 50, 97.5]) -> 1.1, 3.0, 9.4
        assert!((percentile(&v, 0.025).unwrap() - 1.1).abs() < 1e-12);
        assert_eq!(percentile(&v, 0.5), Some(3.0));
        assert!((percentile(&v, 0.975).unwrap() - 9.4).abs() < 1e-12);
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[2.0], 0.9), Some(2.0));
    }

    #[test]
    fn resamples_keep_every_class_count_and_repeat_with_the_seed() {
        let labels = [0, 0, 0, 1, 1, 2, 0, 1];
        let clusters = Clusters::units(&labels);
        let mut a = Resampler::new(&clusters, 7);
        let mut b = Resampler::new(&clusters, 7);
        let mut c = Resampler::new(&clusters, 8);
        let mut differs = false;
        for _ in 0..20 {
            let counts = a.draw().to_vec();
            for class in 0..3 {
                let drawn: u32 = (0..labels.len())
                    .filter(|&i| labels[i] == class)
                    .map(|i| counts[i])
                    .sum();
                let size = labels.iter().filter(|&&l| l == class).count() as u32;
                assert_eq!(drawn, size);
            }
            assert_eq!(counts, b.draw());
            differs |= counts != c.draw();
        }
        assert!(differs, "another seed draws other resamples");
    }

    #[test]
    fn intervals_contain_the_estimate_and_depend_only_on_the_seed() {
        let (labels, predicted, probs) = sample();
        let e = Evaluator::new(&labels, &predicted, &probs, 3).unwrap();
        let clusters = Clusters::units(&labels);
        let config = BootstrapConfig {
            resamples: 500,
            level: 0.95,
            seed: 3,
        };
        let ci = confidence_intervals(&e, &clusters, &config).unwrap();
        let estimate = e.evaluate().values;
        for m in Metric::ALL {
            let (lo, hi) = ci.get(m).unwrap();
            let x = estimate.get(m).unwrap();
            assert!(lo <= x && x <= hi, "{m:?}: {x} not in [{lo}, {hi}]");
            assert!(lo < hi, "{m:?}: an interval of zero width");
        }
        assert_eq!(ci, confidence_intervals(&e, &clusters, &config).unwrap());
        let other =
            confidence_intervals(&e, &clusters, &BootstrapConfig { seed: 4, ..config }).unwrap();
        assert_ne!(ci.get(Metric::Auc), other.get(Metric::Auc));
        // A wider level gives a wider interval from the same resamples.
        let wide = confidence_intervals(
            &e,
            &clusters,
            &BootstrapConfig {
                level: 0.99,
                ..config
            },
        )
        .unwrap();
        let (lo, hi) = ci.get(Metric::BalancedAccuracy).unwrap();
        let (wlo, whi) = wide.get(Metric::BalancedAccuracy).unwrap();
        assert!(wlo <= lo && hi <= whi);
        assert!(ci.undefined().is_empty());
    }

    #[test]
    fn a_split_with_one_class_has_no_ranking_intervals() {
        let labels = [1, 1, 1, 1];
        let e = Evaluator::new(
            &labels,
            &[1, 0, 1, 1],
            &[0.2, 0.8, 0.6, 0.4, 0.3, 0.7, 0.1, 0.9],
            2,
        )
        .unwrap();
        let ci = confidence_intervals(&e, &Clusters::units(&labels), &BootstrapConfig::default())
            .unwrap();
        assert_eq!(ci.undefined(), [Metric::Auc, Metric::Auprc]);
        let (lo, hi) = ci.get(Metric::BalancedAccuracy).unwrap();
        assert!(lo <= 0.75 && 0.75 <= hi);
    }

    #[test]
    fn pooled_repeats_are_drawn_as_one_slide() {
        // Two runs on the same four slides: eight rows, four slides.
        let keys = ["a", "b", "c", "d", "a", "b", "c", "d"];
        let labels = [0, 0, 1, 1, 0, 0, 1, 1];
        let clusters = Clusters::by_key(&keys, &labels).unwrap();
        assert_eq!((clusters.n_units(), clusters.n_clusters()), (8, 4));
        let mut r = Resampler::new(&clusters, 1);
        let mut weights = Vec::new();
        for _ in 0..10 {
            clusters.unit_weights_into(r.draw(), &mut weights);
            assert_eq!(
                weights[..4],
                weights[4..],
                "a slide's rows are drawn together"
            );
            assert_eq!(weights.iter().sum::<u32>(), 8);
        }
        assert!(Clusters::by_key(&["a", "a"], &[0, 1]).is_err());
        assert!(Clusters::by_key(&["a"], &[0, 1]).is_err());
    }

    #[test]
    fn a_thousand_resamples_of_a_thousand_slides_take_well_under_a_second() {
        let mut state = 99u64;
        let (mut labels, mut predicted, mut probs) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..1000usize {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let s = ((state >> 40) as f32 / (1u64 << 24) as f32 + (i % 2) as f32) / 2.0;
            labels.push(i % 2);
            predicted.push(usize::from(s > 0.5));
            probs.extend([1.0 - s, s]);
        }
        let start = std::time::Instant::now();
        let e = Evaluator::new(&labels, &predicted, &probs, 2).unwrap();
        let ci = confidence_intervals(&e, &Clusters::units(&labels), &BootstrapConfig::default())
            .unwrap();
        let seconds = start.elapsed().as_secs_f64();
        println!("1000 slides x 1000 resamples: {seconds:.3} s");
        assert!(ci.undefined().is_empty());
        // Generous for unoptimized builds on a loaded machine; the release build takes ~0.03 s.
        assert!(seconds < 5.0, "{seconds} s");
    }

    #[test]
    fn bad_configurations_are_refused() {
        let e = Evaluator::new(&[0, 1], &[0, 1], &[0.9, 0.1, 0.2, 0.8], 2).unwrap();
        let clusters = Clusters::units(&[0, 1]);
        for config in [
            BootstrapConfig {
                resamples: 0,
                ..BootstrapConfig::default()
            },
            BootstrapConfig {
                level: 1.0,
                ..BootstrapConfig::default()
            },
            BootstrapConfig {
                level: f64::NAN,
                ..BootstrapConfig::default()
            },
        ] {
            assert!(confidence_intervals(&e, &clusters, &config).is_err());
        }
        assert!(
            confidence_intervals(&e, &Clusters::units(&[0]), &BootstrapConfig::default()).is_err()
        );
    }
}
