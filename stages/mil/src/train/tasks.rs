//! The data sets the training defaults were chosen on (docs/defaults-study.md), built so that
//! the right answer is known: **spatial** tasks, whose label depends only on how identical
//! instance sets are arranged (a permutation-invariant model must stay at chance, a spatial
//! one should reach ~1), and **presence** tasks in the style of MNIST-bags (Ilse et al. 2018),
//! whose label says which key instance a bag holds (every MIL model should solve them, and
//! the embedding-level poolings as well as the best one). They vary the number of classes
//! (2 to 6), the bag size (16 to 800 instances), the embedding width (16 to 128), the witness
//! rate and the signal, so that a default that only works on one shape shows up as a failure.

use std::collections::HashSet;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::synthetic::{
    blob, gaussian, scattered, spatial_slides, DatasetRow, SpatialConfig, SyntheticError,
    SyntheticSlide,
};
use crate::models::{Bag, Split};
use crate::seeding::stream_rng;

/// Every data set of the study, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// The shipped spatial benchmark's shape: clustered vs scattered positives, 6x6 tiles,
    /// 16-d, strong signal.
    Spatial,
    /// Three arrangements of the same 12 positives on a 12x12 patch (144 tiles, 32-d): one
    /// blob, one straight line, or scattered.
    SpatialShapes,
    /// Clustered vs scattered with a faint signal (norm 3 against unit noise), 8x8 tiles, 64-d.
    SpatialFaint,
    /// MNIST-bags as Ilse et al. (2018) build it: 10 instance prototypes ("digits") in 64-d,
    /// bags of about 10 instances (6-14), positive when a bag holds the key prototype; in a
    /// positive bag each instance is the key with probability 0.1 (at least one).
    MnistBags,
    /// Presence at a lower witness rate: bags of 10-50 instances, 1-3 witnesses.
    Presence,
    /// Six classes: which of five key prototypes a bag holds (or none), bags of 20-100.
    PresenceMany,
    /// Large bags at a low witness rate: 400-800 instances, 128-d, 4-8 witnesses (~1%).
    LargeBags,
}

impl Task {
    /// Every task, spatial first.
    pub const ALL: [Task; 7] = [
        Task::Spatial,
        Task::SpatialShapes,
        Task::SpatialFaint,
        Task::MnistBags,
        Task::Presence,
        Task::PresenceMany,
        Task::LargeBags,
    ];

    /// The name of its folder and table rows.
    pub fn name(self) -> &'static str {
        match self {
            Task::Spatial => "spatial",
            Task::SpatialShapes => "spatial_shapes",
            Task::SpatialFaint => "spatial_faint",
            Task::MnistBags => "mnist_bags",
            Task::Presence => "presence",
            Task::PresenceMany => "presence_many",
            Task::LargeBags => "large_bags",
        }
    }

    /// Parses [`Task::name`].
    pub fn parse(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the label depends on the arrangement only.
    pub fn is_spatial(self) -> bool {
        matches!(
            self,
            Task::Spatial | Task::SpatialShapes | Task::SpatialFaint
        )
    }
}

/// A generated data set.
#[derive(Debug, Clone)]
pub struct TaskData {
    pub task: Task,
    /// Sorted class names (label indices follow this order).
    pub classes: Vec<String>,
    pub slides: Vec<SyntheticSlide>,
    pub dim: usize,
    pub tile_size: i64,
    pub seed: u64,
}

impl TaskData {
    /// The slides as training bags on their grid cells.
    pub fn bags(&self) -> Vec<Bag> {
        self.slides
            .iter()
            .map(|s| Bag {
                slide_id: s.row.slide_id.clone(),
                label_index: self
                    .classes
                    .iter()
                    .position(|c| *c == s.row.label)
                    .unwrap_or(0),
                split: s.row.split,
                dim: self.dim,
                embeddings: s.embeddings.clone().into(),
                positions: Some(s.cells.clone()),
                pixels: None,
            })
            .collect()
    }

    /// Writes `dataset.csv` and `features.parquet` into `dir`.
    pub fn write(&self, dir: &std::path::Path) -> Result<(), SyntheticError> {
        super::synthetic::write_slides(dir, &self.slides, self.dim, self.tile_size, self.seed)
    }
}

/// Fractions of bags in train / val (the rest tests): many test bags, so that "at chance" is
/// measured to about +-0.05.
const TRAIN_FRACTION: f64 = 0.5;
const VAL_FRACTION: f64 = 0.15;

/// Bags per data set.
pub const N_BAGS: usize = 320;

fn split_of(b: usize, n: usize) -> Split {
    let n_train = (n as f64 * TRAIN_FRACTION).round() as usize;
    let n_val = (n as f64 * VAL_FRACTION).round() as usize;
    if b < n_train {
        Split::Train
    } else if b < n_train + n_val {
        Split::Val
    } else {
        Split::Test
    }
}

/// Generates `task` with `n_bags` bags (classes alternate, so every split is balanced).
pub fn generate(task: Task, n_bags: usize, seed: u64) -> Result<TaskData, SyntheticError> {
    match task {
        Task::Spatial => spatial_two(task, n_bags, 36, 16, 6, 6.0, seed),
        Task::SpatialFaint => spatial_two(task, n_bags, 64, 64, 10, 3.0, seed),
        Task::SpatialShapes => spatial_shapes(n_bags, seed),
        Task::MnistBags => presence(
            task,
            PresenceShape {
                n_bags,
                dim: 64,
                prototypes: 10,
                keys: 1,
                size: (6, 14),
                witnesses: Witnesses::Rate(0.1),
                signal: 6.0,
            },
            seed,
        ),
        Task::Presence => presence(
            task,
            PresenceShape {
                n_bags,
                dim: 64,
                prototypes: 10,
                keys: 1,
                size: (10, 50),
                witnesses: Witnesses::Count(1, 3),
                signal: 6.0,
            },
            seed,
        ),
        Task::PresenceMany => presence(
            task,
            PresenceShape {
                n_bags,
                dim: 64,
                prototypes: 12,
                keys: 5,
                size: (20, 100),
                witnesses: Witnesses::Count(1, 4),
                signal: 6.0,
            },
            seed,
        ),
        Task::LargeBags => presence(
            task,
            PresenceShape {
                n_bags,
                dim: 128,
                prototypes: 10,
                keys: 1,
                size: (400, 800),
                witnesses: Witnesses::Count(4, 8),
                signal: 6.0,
            },
            seed,
        ),
    }
}

/// The two-class clustered / scattered generator with the study's splits.
fn spatial_two(
    task: Task,
    n_bags: usize,
    tiles: usize,
    dim: usize,
    positives: usize,
    signal: f32,
    seed: u64,
) -> Result<TaskData, SyntheticError> {
    let config = SpatialConfig {
        positives,
        signal,
        val_fraction: VAL_FRACTION,
        test_fraction: 1.0 - TRAIN_FRACTION - VAL_FRACTION,
        ..SpatialConfig::new(n_bags, tiles, dim, seed)
    };
    let mut slides = spatial_slides(&config)?;
    rename(&mut slides, task);
    Ok(TaskData {
        task,
        classes: super::synthetic::CLASSES
            .iter()
            .map(|c| c.to_string())
            .collect(),
        slides,
        dim,
        tile_size: config.tile_size,
        seed,
    })
}

fn rename(slides: &mut [SyntheticSlide], task: Task) {
    let width = slides.len().to_string().len();
    for (b, s) in slides.iter_mut().enumerate() {
        s.row.slide_id = format!("{}_{b:0width$}", task.name());
    }
}

/// A unit-variance Gaussian vector scaled to norm `norm`.
fn direction(rng: &mut ChaCha8Rng, dim: usize, norm: f32) -> Vec<f32> {
    let mut d: Vec<f32> = (0..dim).map(|_| gaussian(rng)).collect();
    let n = d
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    d.iter_mut().for_each(|v| *v *= norm / n);
    d
}

/// Background noise plus `shift` on the positive instances.
fn embed(rng: &mut ChaCha8Rng, positive: &[bool], shift: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(positive.len() * shift.len());
    for &p in positive {
        for s in shift {
            out.push(gaussian(rng) + if p { *s } else { 0.0 });
        }
    }
    out
}

/// `n` cells of one straight horizontal or vertical segment.
fn line(side: i64, n: usize, rng: &mut ChaCha8Rng) -> Option<HashSet<[i64; 2]>> {
    let n = n as i64;
    if n > side {
        return None;
    }
    let fixed = rng.random_range(0..side);
    let start = rng.random_range(0..=side - n);
    let horizontal = rng.random_bool(0.5);
    Some(
        (start..start + n)
            .map(|k| if horizontal { [fixed, k] } else { [k, fixed] })
            .collect(),
    )
}

/// Blob, line or scattered: 12 positives of the same distribution on a 12x12 patch.
fn spatial_shapes(n_bags: usize, seed: u64) -> Result<TaskData, SyntheticError> {
    const SIDE: i64 = 12;
    const DIM: usize = 32;
    const POSITIVES: usize = 12;
    let classes = ["blob", "line", "scattered"];
    let tissue: Vec<[i64; 2]> = (0..SIDE * SIDE).map(|k| [k / SIDE, k % SIDE]).collect();
    let mut rng = stream_rng(seed, "shapes-direction", None, "");
    let shift = direction(&mut rng, DIM, 5.0);
    let width = n_bags.to_string().len();
    let slides = (0..n_bags)
        .map(|b| {
            let slide_id = format!("{}_{b:0width$}", Task::SpatialShapes.name());
            let class = b % classes.len();
            let mut rng = stream_rng(seed, "shapes-bag", None, &slide_id);
            let chosen = match class {
                0 => blob(&tissue, POSITIVES, &mut rng),
                1 => line(SIDE, POSITIVES, &mut rng),
                _ => scattered(&tissue, POSITIVES, &mut rng),
            }
            .ok_or_else(|| SyntheticError::Config(format!("could not place {slide_id}")))?;
            let positive: Vec<bool> = tissue.iter().map(|c| chosen.contains(c)).collect();
            Ok(SyntheticSlide {
                row: DatasetRow {
                    slide_id: slide_id.clone(),
                    label: classes[class].to_string(),
                    split: split_of(b, n_bags),
                },
                cells: tissue.clone(),
                embeddings: embed(&mut rng, &positive, &shift),
                positive,
            })
        })
        .collect::<Result<Vec<_>, SyntheticError>>()?;
    Ok(TaskData {
        task: Task::SpatialShapes,
        classes: classes.iter().map(|c| c.to_string()).collect(),
        slides,
        dim: DIM,
        tile_size: 256,
        seed,
    })
}

/// The shape of a presence data set.
struct PresenceShape {
    n_bags: usize,
    dim: usize,
    /// Instance prototypes (the "digits"); the first `keys` are the keys.
    prototypes: usize,
    keys: usize,
    /// Instances per bag, inclusive range.
    size: (usize, usize),
    /// Key instances in a bag that holds its key.
    witnesses: Witnesses,
    /// Norm of each prototype against unit-variance noise (6: a key instance stands 6 noise
    /// standard deviations from the others along its own direction, so that instance-level
    /// evidence is clear and the task measures the pooling, not the sample size).
    signal: f32,
}

/// How many key instances a bag that holds its key has.
#[derive(Debug, Clone, Copy)]
enum Witnesses {
    /// Uniform in the inclusive range.
    Count(usize, usize),
    /// Each instance is a key with this probability (at least one).
    Rate(f64),
}

/// Bags of prototype instances; class `k < keys` holds key `k`, class `keys` ("none") holds
/// no key. Instances lie on random cells of a compact patch: positions carry nothing.
fn presence(task: Task, shape: PresenceShape, seed: u64) -> Result<TaskData, SyntheticError> {
    let s = &shape;
    let most_witnesses = match s.witnesses {
        Witnesses::Count(_, hi) => hi,
        Witnesses::Rate(_) => 1,
    };
    if s.keys == 0 || s.prototypes <= s.keys || s.size.0 < most_witnesses || s.size.0 > s.size.1 {
        return Err(SyntheticError::Config(format!(
            "{}: inconsistent shape",
            task.name()
        )));
    }
    let mut rng = stream_rng(seed, "presence-prototypes", None, task.name());
    let prototypes: Vec<Vec<f32>> = (0..s.prototypes)
        .map(|_| direction(&mut rng, s.dim, s.signal))
        .collect();
    // Class names sort in class-index order: key_0.. then none (2 classes: key / none).
    let mut classes: Vec<String> = (0..s.keys).map(|k| format!("key_{k}")).collect();
    classes.push("none".into());
    let others: Vec<usize> = (s.keys..s.prototypes).collect();
    let n_classes = classes.len();
    let width = s.n_bags.to_string().len();
    let slides = (0..s.n_bags)
        .map(|b| {
            let slide_id = format!("{}_{b:0width$}", task.name());
            let class = b % n_classes;
            let mut rng = stream_rng(seed, "presence-bag", None, &slide_id);
            let n = rng.random_range(s.size.0..=s.size.1);
            let mut kinds: Vec<usize> = (0..n)
                .map(|_| *others.choose(&mut rng).unwrap_or(&s.keys))
                .collect();
            if class < s.keys {
                let w = match s.witnesses {
                    Witnesses::Count(lo, hi) => rng.random_range(lo..=hi),
                    Witnesses::Rate(p) => (0..n).filter(|_| rng.random_bool(p)).count().max(1),
                };
                kinds[..w].iter_mut().for_each(|k| *k = class);
            }
            kinds.shuffle(&mut rng);
            let side = (n as f64).sqrt().ceil() as i64 + 2;
            let mut cells: Vec<[i64; 2]> = (0..side * side).map(|k| [k / side, k % side]).collect();
            cells.shuffle(&mut rng);
            cells.truncate(n);
            let mut embeddings = Vec::with_capacity(n * s.dim);
            for &k in &kinds {
                for v in &prototypes[k] {
                    embeddings.push(v + gaussian(&mut rng));
                }
            }
            let positive = kinds.iter().map(|&k| k < s.keys).collect();
            Ok(SyntheticSlide {
                row: DatasetRow {
                    slide_id,
                    label: classes[class].clone(),
                    split: split_of(b, s.n_bags),
                },
                cells,
                embeddings,
                positive,
            })
        })
        .collect::<Result<Vec<_>, SyntheticError>>()?;
    let mut sorted = classes.clone();
    sorted.sort();
    debug_assert_eq!(sorted, classes);
    Ok(TaskData {
        task,
        classes,
        slides,
        dim: s.dim,
        tile_size: 256,
        seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_is_balanced_and_well_formed() {
        for task in Task::ALL {
            let data = generate(task, 60, 3).unwrap();
            assert_eq!(data.slides.len(), 60);
            let bags = data.bags();
            for split in [Split::Train, Split::Val, Split::Test] {
                assert!(bags.iter().any(|b| b.split == split), "{}", task.name());
            }
            let mut per_class = vec![0usize; data.classes.len()];
            for (bag, slide) in bags.iter().zip(&data.slides) {
                per_class[bag.label_index] += 1;
                assert_eq!(bag.embeddings.len(), bag.len() * data.dim);
                let cells: HashSet<[i64; 2]> = slide.cells.iter().copied().collect();
                assert_eq!(cells.len(), slide.cells.len(), "distinct cells");
                assert!(bag.embeddings.iter().all(|v| v.is_finite()));
            }
            let (lo, hi) = (
                per_class.iter().min().unwrap(),
                per_class.iter().max().unwrap(),
            );
            assert!(hi - lo <= 1, "{}: {per_class:?}", task.name());
        }
    }

    /// Spatial tasks hold the same number of positives in every class; presence tasks hold
    /// witnesses exactly in the classes that name a key.
    #[test]
    fn instance_sets_carry_the_label_only_where_they_should() {
        for task in Task::ALL {
            let data = generate(task, 30, 1).unwrap();
            for s in &data.slides {
                let positives = s.positive.iter().filter(|p| **p).count();
                if task.is_spatial() {
                    let expected = if task == Task::Spatial {
                        6
                    } else if task == Task::SpatialFaint {
                        10
                    } else {
                        12
                    };
                    assert_eq!(positives, expected, "{}", s.row.slide_id);
                } else {
                    assert_eq!(positives > 0, s.row.label != "none", "{}", s.row.slide_id);
                }
            }
        }
        assert_eq!(Task::parse("large_bags"), Some(Task::LargeBags));
        assert_eq!(Task::parse("nope"), None);
    }
}
