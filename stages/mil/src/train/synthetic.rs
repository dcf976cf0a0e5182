//! A synthetic benchmark where only the spatial arrangement of instances carries the label,
//! proving that a model uses spatial context. Every bag is a square patch of tissue tiles with
//! the same number of "positive" instances (background embedding + a fixed signal direction);
//! in `clustered` bags the positives form one connected blob, in `scattered` bags no two
//! positives touch (8-neighbourhood). The multiset of embeddings has the same distribution in
//! both classes, so any permutation-invariant model is at chance, whereas a 3x3 sparse
//! convolution sees whether positives have positive neighbours.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tessera_pipeline::schema::{embedding_type, embeddings_schema};

use crate::columns::embeddings_array;
use crate::error::MilError;
use crate::models::{Bag, Split};
use crate::seeding::stream_rng;

/// The two classes, in sorted (class-index) order.
pub const CLASSES: [&str; 2] = ["clustered", "scattered"];

/// Shape of the synthetic dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct SpatialConfig {
    pub n_bags: usize,
    /// Instances per bag (the first `tiles` cells, row-major, of the smallest square grid).
    pub tiles: usize,
    pub dim: usize,
    /// Positive instances per bag (the same in both classes).
    pub positives: usize,
    /// Norm of the signal added to positive instances (noise has unit variance per dim).
    pub signal: f32,
    /// Level-0 tile size written in `tile_size` (positions are multiples of it).
    pub tile_size: i64,
    /// Fractions of bags in val and test (the rest trains); classes alternate so every split
    /// is balanced.
    pub val_fraction: f64,
    pub test_fraction: f64,
    pub seed: u64,
}

impl SpatialConfig {
    /// `n_bags` bags of `tiles` instances of width `dim`, 1 in 6 instances positive, 60/20/20
    /// splits.
    pub fn new(n_bags: usize, tiles: usize, dim: usize, seed: u64) -> Self {
        SpatialConfig {
            n_bags,
            tiles,
            dim,
            positives: (tiles / 6).max(2),
            signal: 6.0,
            tile_size: 256,
            val_fraction: 0.2,
            test_fraction: 0.2,
            seed,
        }
    }
}

/// One dataset row (`slide_id,label,split`).
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRow {
    pub slide_id: String,
    pub label: String,
    pub split: Split,
}

/// One synthetic slide: its row, its cells `(i, j)` and embeddings `[tiles, dim]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSlide {
    pub row: DatasetRow,
    pub cells: Vec<[i64; 2]>,
    pub embeddings: Vec<f32>,
    /// Which instances are positive.
    pub positive: Vec<bool>,
}

/// Why a synthetic dataset cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error("synthetic dataset: {0}")]
    Config(String),
    #[error(transparent)]
    Mil(#[from] MilError),
    #[error("synthetic dataset: writing {path}: {message}")]
    Write { path: String, message: String },
}

/// The brief's entry point: dataset CSV rows plus the embeddings table (`slide_id, x, y,
/// tile_size, embedding`) of `n_bags` bags. Deterministic in `seed`.
pub fn spatial_dataset(
    n_bags: usize,
    tiles: usize,
    dim: usize,
    seed: u64,
) -> Result<(Vec<DatasetRow>, RecordBatch), SyntheticError> {
    let config = SpatialConfig::new(n_bags, tiles, dim, seed);
    let slides = spatial_slides(&config)?;
    let batch = to_record_batch(&slides, &config)?;
    Ok((slides.into_iter().map(|s| s.row).collect(), batch))
}

/// Generates the slides of `config`.
pub fn spatial_slides(config: &SpatialConfig) -> Result<Vec<SyntheticSlide>, SyntheticError> {
    let c = config;
    if c.tiles < 4 || c.dim == 0 || c.n_bags < 2 {
        return Err(SyntheticError::Config(
            "needs at least 2 bags, 4 tiles and 1 dimension".into(),
        ));
    }
    let side = (c.tiles as f64).sqrt().ceil() as i64;
    let tissue: Vec<[i64; 2]> = (0..c.tiles as i64).map(|k| [k / side, k % side]).collect();
    // Non-touching positives need room: at most one per 2x2 block.
    let room = (((side + 1) / 2) * ((side + 1) / 2)) as usize;
    if c.positives < 2 || c.positives > room * 2 / 3 {
        return Err(SyntheticError::Config(format!(
            "{} positives among {} tiles: needs 2 to {} so that scattered placements exist",
            c.positives,
            c.tiles,
            room * 2 / 3
        )));
    }
    let mut rng = stream_rng(c.seed, "synthetic-direction", None, "");
    let mut direction: Vec<f32> = (0..c.dim).map(|_| gaussian(&mut rng)).collect();
    let norm = direction
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    direction.iter_mut().for_each(|v| *v *= c.signal / norm);

    let n_val = ((c.n_bags as f64) * c.val_fraction).round() as usize;
    let n_test = ((c.n_bags as f64) * c.test_fraction).round() as usize;
    let n_train = c.n_bags.saturating_sub(n_val + n_test);
    let width = c.n_bags.to_string().len();
    (0..c.n_bags)
        .map(|b| {
            let slide_id = format!("spatial_{b:0width$}");
            let clustered = b % 2 == 0;
            let split = if b < n_train {
                Split::Train
            } else if b < n_train + n_val {
                Split::Val
            } else {
                Split::Test
            };
            let mut rng = stream_rng(c.seed, "synthetic-bag", None, &slide_id);
            let chosen = if clustered {
                blob(&tissue, c.positives, &mut rng)
            } else {
                scattered(&tissue, c.positives, &mut rng)
            }
            .ok_or_else(|| {
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
            let label = CLASSES[usize::from(!clustered)].to_string();
            Ok(SyntheticSlide {
                row: DatasetRow {
                    slide_id,
                    label,
                    split,
                },
                cells: tissue.clone(),
                embeddings,
                positive,
            })
        })
        .collect()
}

/// The slides as training bags, placed on the sparse map at their grid cells (what
/// `sparse_map` produces with a downsampling factor equal to the tile size).
pub fn to_bags(slides: &[SyntheticSlide], dim: usize) -> Vec<Bag> {
    slides
        .iter()
        .map(|s| Bag {
            slide_id: s.row.slide_id.clone(),
            label_index: CLASSES.iter().position(|c| *c == s.row.label).unwrap_or(0),
            split: s.row.split,
            dim,
            embeddings: s.embeddings.clone().into(),
            positions: Some(s.cells.clone()),
            pixels: None,
        })
        .collect()
}

/// The embeddings table: level-0 `x = (j + offset) * tile_size`, `y = (i + offset) *
/// tile_size`, with a per-slide random offset so absolute positions carry nothing.
pub fn to_record_batch(
    slides: &[SyntheticSlide],
    config: &SpatialConfig,
) -> Result<RecordBatch, SyntheticError> {
    slides_record_batch(slides, config.dim, config.tile_size, config.seed)
}

/// [`to_record_batch`] for slides of any synthetic data set (embeddings of width `dim`).
pub fn slides_record_batch(
    slides: &[SyntheticSlide],
    dim: usize,
    tile_size: i64,
    seed: u64,
) -> Result<RecordBatch, SyntheticError> {
    let config = SlideGeometry {
        dim,
        tile_size,
        seed,
    };
    let mut ids = Vec::new();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    let mut values = Vec::new();
    for s in slides {
        let mut rng = stream_rng(config.seed, "synthetic-offset", None, &s.row.slide_id);
        let (oi, oj) = (rng.random_range(0..64i64), rng.random_range(0..64i64));
        for cell in &s.cells {
            ids.push(s.row.slide_id.clone());
            ys.push((cell[0] + oi) * config.tile_size);
            xs.push((cell[1] + oj) * config.tile_size);
        }
        values.extend_from_slice(&s.embeddings);
    }
    let n = ids.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids)),
        Arc::new(Int64Array::from(xs)),
        Arc::new(Int64Array::from(ys)),
        Arc::new(Int64Array::from(vec![config.tile_size; n])),
        embeddings_array(&values, &embedding_type(config.dim, false))?,
    ];
    RecordBatch::try_new(embeddings_schema(config.dim, false), columns)
        .map_err(|e| SyntheticError::Mil(MilError::Arrow(e)))
}

/// What the embeddings table needs besides the slides.
struct SlideGeometry {
    dim: usize,
    tile_size: i64,
    seed: u64,
}

/// Writes `dataset.csv` (`slide_id,label,split`) and `features.parquet` into `dir`.
pub fn write_example(dir: &Path, config: &SpatialConfig) -> Result<(), SyntheticError> {
    let slides = spatial_slides(config)?;
    write_slides(dir, &slides, config.dim, config.tile_size, config.seed)
}

/// Writes any synthetic data set's `dataset.csv` and `features.parquet` into `dir`.
pub fn write_slides(
    dir: &Path,
    slides: &[SyntheticSlide],
    dim: usize,
    tile_size: i64,
    seed: u64,
) -> Result<(), SyntheticError> {
    let write_err = |path: &Path, e: &dyn std::fmt::Display| SyntheticError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, &e))?;
    let csv_path = dir.join("dataset.csv");
    let mut csv = String::from("slide_id,label,split\n");
    for s in slides {
        csv.push_str(&format!(
            "{},{},{}\n",
            s.row.slide_id,
            s.row.label,
            s.row.split.as_str()
        ));
    }
    std::fs::write(&csv_path, csv).map_err(|e| write_err(&csv_path, &e))?;
    let batch = slides_record_batch(slides, dim, tile_size, seed)?;
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

/// A standard normal draw (Box-Muller).
pub fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn neighbours8(c: [i64; 2]) -> impl Iterator<Item = [i64; 2]> {
    (-1..=1)
        .flat_map(move |di| (-1..=1).map(move |dj| [c[0] + di, c[1] + dj]))
        .filter(move |n| *n != c)
}

/// `n` 4-connected cells grown from a random seed cell.
pub fn blob(tissue: &[[i64; 2]], n: usize, rng: &mut ChaCha8Rng) -> Option<HashSet<[i64; 2]>> {
    let cells: HashSet<[i64; 2]> = tissue.iter().copied().collect();
    for _ in 0..100 {
        let start = *tissue.choose(rng)?;
        let mut chosen = HashSet::from([start]);
        let mut order = vec![start];
        while chosen.len() < n {
            let frontier: Vec<[i64; 2]> = order
                .iter()
                .flat_map(|c| {
                    [
                        [c[0] - 1, c[1]],
                        [c[0] + 1, c[1]],
                        [c[0], c[1] - 1],
                        [c[0], c[1] + 1],
                    ]
                })
                .filter(|c| cells.contains(c) && !chosen.contains(c))
                .collect();
            let Some(next) = frontier.choose(rng).copied() else {
                break;
            };
            chosen.insert(next);
            order.push(next);
        }
        if chosen.len() == n {
            return Some(chosen);
        }
    }
    None
}

/// `n` cells of which no two touch (8-neighbourhood).
pub fn scattered(tissue: &[[i64; 2]], n: usize, rng: &mut ChaCha8Rng) -> Option<HashSet<[i64; 2]>> {
    for _ in 0..100 {
        let mut order = tissue.to_vec();
        order.shuffle(rng);
        let mut chosen = HashSet::new();
        for c in order {
            if neighbours8(c).all(|nb| !chosen.contains(&nb)) {
                chosen.insert(c);
                if chosen.len() == n {
                    return Some(chosen);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_differ_only_by_arrangement() {
        let config = SpatialConfig::new(40, 64, 8, 3);
        let slides = spatial_slides(&config).unwrap();
        assert_eq!(slides.len(), 40);
        for s in &slides {
            let pos: Vec<[i64; 2]> = s
                .cells
                .iter()
                .zip(&s.positive)
                .filter(|(_, p)| **p)
                .map(|(c, _)| *c)
                .collect();
            assert_eq!(
                pos.len(),
                config.positives,
                "same positive count in both classes"
            );
            let touching = pos
                .iter()
                .filter(|c| neighbours8(**c).any(|n| pos.contains(&n)))
                .count();
            if s.row.label == "clustered" {
                assert_eq!(
                    touching,
                    pos.len(),
                    "{}: every positive touches another",
                    s.row.slide_id
                );
            } else {
                assert_eq!(
                    touching, 0,
                    "{}: no positive touches another",
                    s.row.slide_id
                );
            }
        }
        let count = |split| slides.iter().filter(|s| s.row.split == split).count();
        assert_eq!(
            (count(Split::Train), count(Split::Val), count(Split::Test)),
            (24, 8, 8)
        );
        assert_eq!(spatial_slides(&config).unwrap(), slides, "deterministic");
    }

    #[test]
    fn record_batch_has_the_embeddings_schema_and_grid_positions() {
        let (rows, batch) = spatial_dataset(4, 16, 3, 1).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(batch.num_rows(), 64);
        assert_eq!(batch.schema(), embeddings_schema(3, false));
        let x = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert!(x.values().iter().all(|v| v % 256 == 0));
    }
}
