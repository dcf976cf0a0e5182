//! Synthetic survival and regression cohorts whose outcome depends only on the spatial
//! arrangement of the instances, the time-to-event and numeric counterparts of the spatial
//! benchmark ([`super::synthetic`]): every slide is a square patch of tiles holding the same
//! number of "positive" instances (background + a signal direction); `k` of them form one
//! connected blob and the others are scattered (no two touching, none touching the blob).
//! The blob size `k` (1: all scattered, `positives`: one blob) drives the outcome:
//! - **survival**: Weibull event times (shape `shape`) with proportional hazards
//!   `base_hazard * exp(beta * (k - mean k))` (a larger tumour-like cluster, an earlier
//!   event), censored by uniform follow-up times;
//! - **regression**: the target is `k` plus Gaussian noise.
//!
//! The multiset of embeddings is the same whatever `k`, so a permutation-invariant model can
//! only guess (C-index ~0.5, R^2 ~0); a 3x3 sparse convolution sees how many positives have
//! positive neighbours.

use std::collections::HashSet;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::synthetic::{
    blob, gaussian, slides_record_batch, DatasetRow, SyntheticError, SyntheticSlide,
};
use crate::models::Split;
use crate::seeding::stream_rng;

/// Which outcome the cohort carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    Survival,
    Regression,
}

/// What drives the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeDriver {
    /// The size `k` of the blob among a fixed number of positives (spatial: only a model that
    /// sees neighbourhoods can rank the slides).
    Arrangement,
    /// The number `k` of positives, all scattered (not spatial: any MIL model that counts
    /// positives can rank the slides; the control of the spatial cohorts).
    Count,
}

/// Shape of a synthetic outcome cohort.
#[derive(Debug, Clone, PartialEq)]
pub struct OutcomeConfig {
    pub kind: OutcomeKind,
    pub driver: OutcomeDriver,
    pub n_slides: usize,
    /// Tiles per slide (the first `tiles` cells of the smallest square grid, row-major).
    pub tiles: usize,
    pub dim: usize,
    /// Positive instances per slide (the same in every slide).
    pub positives: usize,
    /// Norm of the signal added to positive instances (noise: unit variance per dimension).
    pub signal: f32,
    /// Survival: hazard scale at the mean blob size, log hazard ratio per blob cell, and the
    /// Weibull shape (1: exponential times; larger: less spread around the median).
    pub base_hazard: f64,
    pub beta: f64,
    pub shape: f64,
    /// Survival: follow-up times are uniform on `[0, max_follow_up]`.
    pub max_follow_up: f64,
    /// Regression: standard deviation of the target's noise.
    pub noise: f64,
    pub seed: u64,
}

impl OutcomeConfig {
    /// `n_slides` slides of 36 tiles (6x6), 16-d, 6 positives.
    pub fn new(kind: OutcomeKind, n_slides: usize, seed: u64) -> Self {
        OutcomeConfig {
            kind,
            driver: OutcomeDriver::Arrangement,
            n_slides,
            tiles: 36,
            dim: 16,
            positives: 6,
            signal: 6.0,
            base_hazard: 1e-3,
            beta: 1.0,
            shape: 3.0,
            max_follow_up: 40.0,
            noise: 0.3,
            seed,
        }
    }
}

/// One slide of an outcome cohort: its instances and outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct OutcomeSlide {
    pub slide: SyntheticSlide,
    /// What drives the outcome: positives in the blob ([`OutcomeDriver::Arrangement`]) or
    /// positives in the slide ([`OutcomeDriver::Count`]).
    pub blob: usize,
    /// Survival: (time, event); regression: `None`.
    pub survival: Option<(f64, bool)>,
    /// Regression: the target.
    pub target: Option<f64>,
}

/// `k` positives in one blob and the rest scattered away from it and from each other.
fn mixed(
    tissue: &[[i64; 2]],
    k: usize,
    n: usize,
    rng: &mut ChaCha8Rng,
) -> Option<HashSet<[i64; 2]>> {
    let touches = |a: [i64; 2], b: [i64; 2]| (a[0] - b[0]).abs() <= 1 && (a[1] - b[1]).abs() <= 1;
    for _ in 0..200 {
        let mut chosen = blob(tissue, k, rng)?;
        let mut order = tissue.to_vec();
        order.shuffle(rng);
        for c in order {
            if chosen.len() == n {
                break;
            }
            if chosen.iter().all(|&p| !touches(p, c)) {
                chosen.insert(c);
            }
        }
        if chosen.len() == n {
            return Some(chosen);
        }
    }
    None
}

/// Generates the cohort of `config`. Deterministic in its seed.
pub fn outcome_slides(config: &OutcomeConfig) -> Result<Vec<OutcomeSlide>, SyntheticError> {
    let c = config;
    if c.tiles < 9 || c.dim == 0 || c.n_slides < 4 || c.positives < 2 {
        return Err(SyntheticError::Config(
            "needs at least 4 slides, 9 tiles, 1 dimension and 2 positives".into(),
        ));
    }
    let side = (c.tiles as f64).sqrt().ceil() as i64;
    let tissue: Vec<[i64; 2]> = (0..c.tiles as i64).map(|k| [k / side, k % side]).collect();
    let mut rng = stream_rng(c.seed, "outcome-direction", None, "");
    let mut direction: Vec<f32> = (0..c.dim).map(|_| gaussian(&mut rng)).collect();
    let norm = direction
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    direction.iter_mut().for_each(|v| *v *= c.signal / norm);
    let mean_k = (1 + c.positives) as f64 / 2.0;
    let width = c.n_slides.to_string().len();
    let prefix = match c.kind {
        OutcomeKind::Survival => "surv",
        OutcomeKind::Regression => "reg",
    };
    (0..c.n_slides)
        .map(|s| {
            let slide_id = format!("{prefix}_{s:0width$}");
            let mut rng = stream_rng(c.seed, "outcome-slide", None, &slide_id);
            let k = 1 + s % c.positives;
            let (blob_size, n_positive) = match c.driver {
                OutcomeDriver::Arrangement => (k, c.positives),
                OutcomeDriver::Count => (1, k),
            };
            let chosen = mixed(&tissue, blob_size, n_positive, &mut rng).ok_or_else(|| {
                SyntheticError::Config(format!(
                    "could not place {} positives in {slide_id}",
                    c.positives
                ))
            })?;
            let positive: Vec<bool> = tissue.iter().map(|cell| chosen.contains(cell)).collect();
            let mut embeddings = Vec::with_capacity(c.tiles * c.dim);
            for &p in &positive {
                for shift in &direction {
                    embeddings.push(gaussian(&mut rng) + if p { *shift } else { 0.0 });
                }
            }
            let (survival, target) = match c.kind {
                OutcomeKind::Survival => {
                    let hazard = c.base_hazard * (c.beta * (k as f64 - mean_k)).exp();
                    let u: f64 = 1.0 - rng.random::<f64>();
                    let time = (-u.ln() / hazard).powf(1.0 / c.shape);
                    let follow_up = rng.random::<f64>() * c.max_follow_up;
                    let observed = time <= follow_up;
                    let t = if observed { time } else { follow_up };
                    (Some(((t * 100.0).round() / 100.0, observed)), None)
                }
                OutcomeKind::Regression => {
                    let y = k as f64 + c.noise * f64::from(gaussian(&mut rng));
                    (None, Some((y * 1000.0).round() / 1000.0))
                }
            };
            Ok(OutcomeSlide {
                slide: SyntheticSlide {
                    row: DatasetRow {
                        slide_id,
                        label: String::new(),
                        split: Split::Train,
                    },
                    cells: tissue.clone(),
                    embeddings,
                    positive,
                },
                blob: k,
                survival,
                target,
            })
        })
        .collect()
}

/// Writes `dataset.csv` (`slide_id,time,event` or `slide_id,target`, no `split` column: the
/// `sample` stage splits, stratified by event for survival) and `features.parquet` into `dir`.
pub fn write_outcomes(dir: &Path, config: &OutcomeConfig) -> Result<(), SyntheticError> {
    let slides = outcome_slides(config)?;
    let write_err = |path: &Path, e: &dyn std::fmt::Display| SyntheticError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, &e))?;
    let mut csv = match config.kind {
        OutcomeKind::Survival => String::from("slide_id,time,event\n"),
        OutcomeKind::Regression => String::from("slide_id,target\n"),
    };
    for s in &slides {
        match (s.survival, s.target) {
            (Some((t, e)), _) => {
                csv.push_str(&format!("{},{t},{}\n", s.slide.row.slide_id, u8::from(e)))
            }
            (None, Some(y)) => csv.push_str(&format!("{},{y}\n", s.slide.row.slide_id)),
            _ => {}
        }
    }
    let csv_path = dir.join("dataset.csv");
    std::fs::write(&csv_path, csv).map_err(|e| write_err(&csv_path, &e))?;
    let batch = slides_record_batch(
        &slides.iter().map(|s| s.slide.clone()).collect::<Vec<_>>(),
        config.dim,
        256,
        config.seed,
    )?;
    let parquet_path = dir.join("features.parquet");
    let file = std::fs::File::create(&parquet_path).map_err(|e| write_err(&parquet_path, &e))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props))
        .map_err(|e| write_err(&parquet_path, &e))?;
    writer
        .write(&batch)
        .map_err(|e| write_err(&parquet_path, &e))?;
    writer.close().map_err(|e| write_err(&parquet_path, &e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_cohorts_scatter_k_positives() {
        let config = OutcomeConfig {
            driver: OutcomeDriver::Count,
            ..OutcomeConfig::new(OutcomeKind::Survival, 24, 3)
        };
        let slides = outcome_slides(&config).unwrap();
        for s in &slides {
            let cells: Vec<[i64; 2]> = s
                .slide
                .cells
                .iter()
                .zip(&s.slide.positive)
                .filter(|(_, &p)| p)
                .map(|(c, _)| *c)
                .collect();
            assert_eq!(cells.len(), s.blob);
            for (i, a) in cells.iter().enumerate() {
                for b in &cells[i + 1..] {
                    assert!((a[0] - b[0]).abs() > 1 || (a[1] - b[1]).abs() > 1);
                }
            }
        }
    }

    #[test]
    fn blobs_have_the_asked_size_and_outcomes_follow_them() {
        let config = OutcomeConfig::new(OutcomeKind::Survival, 120, 5);
        let slides = outcome_slides(&config).unwrap();
        for s in &slides {
            assert_eq!(s.slide.positive.iter().filter(|&&p| p).count(), 6);
        }
        // Larger blobs: shorter times on average.
        let mean_time = |k: usize| {
            let t: Vec<f64> = slides
                .iter()
                .filter(|s| s.blob == k)
                .map(|s| s.survival.unwrap().0)
                .collect();
            t.iter().sum::<f64>() / t.len() as f64
        };
        assert!(
            mean_time(6) < mean_time(1),
            "{} vs {}",
            mean_time(6),
            mean_time(1)
        );
        let events = slides.iter().filter(|s| s.survival.unwrap().1).count();
        assert!(events > 30 && events < 110, "{events} events");
        let reg = outcome_slides(&OutcomeConfig::new(OutcomeKind::Regression, 12, 5)).unwrap();
        assert!(reg
            .iter()
            .all(|s| (s.target.unwrap() - s.blob as f64).abs() < 2.0));
    }
}
