//! Bags (one slide's sampled instances) and the device batches that models consume.

use candle_core::{DType, Device, Tensor};

pub use super::rows::EmbeddingRows;
pub use crate::columns::TilePixels;
pub use crate::splits::Split;

/// One slide's instances for one epoch: embeddings row-major `[len, dim]` (or, in end-to-end
/// training, the tiles' pixels, which the trainer embeds itself) and, for spatial models, each
/// instance's cell on the sparse map.
#[derive(Debug, Clone, PartialEq)]
pub struct Bag {
    pub slide_id: String,
    /// Index of the label in the sorted class list.
    pub label_index: usize,
    pub split: Split,
    pub dim: usize,
    /// Owned, or mapped from `train`'s spill file when the epoch outgrows its memory budget.
    pub embeddings: EmbeddingRows,
    /// `(map_i, map_j)` per instance, when the input carries a sparse map.
    pub positions: Option<Vec<[i64; 2]>>,
    /// The tiles' pixels (then `embeddings` is empty and `dim` 0), for end-to-end training.
    pub pixels: Option<Vec<TilePixels>>,
}

impl Bag {
    /// Number of instances.
    pub fn len(&self) -> usize {
        match &self.pixels {
            Some(p) => p.len(),
            None => self.embeddings.len().checked_div(self.dim).unwrap_or(0),
        }
    }

    /// True for a bag without instances (models cannot pool it).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why bags could not be turned into a model batch.
#[derive(Debug, thiserror::Error)]
pub enum BagError {
    #[error("no bags in the batch")]
    NoBags,
    #[error("slide `{0}` has no instances; a bag needs at least one")]
    EmptyBag(String),
    #[error("slide `{slide}` has embeddings of width {found}, the batch expects {expected}")]
    WidthMismatch {
        slide: String,
        expected: usize,
        found: usize,
    },
    #[error(
        "slide `{0}` carries no sparse-map positions (`map_i`, `map_j`), which this model needs"
    )]
    NoPositions(String),
    #[error("slide `{slide}`: sparse-map position ({i}, {j}) spans more than the 2^23 cells a sparse map can hold; use a larger downsampling factor")]
    PositionOutOfRange { slide: String, i: i64, j: i64 },
    #[error("slide `{0}` carries tile pixels, not embeddings: only end-to-end training (`finetune_embedder: true`) can embed them")]
    PixelsWithoutEmbedder(String),
    #[error("slide `{slide}`: instance {instance} has a non-finite embedding value ({value}) in dimension {dimension}; training and prediction stop here (fix or drop the slide's features)")]
    NonFinite {
        slide: String,
        instance: usize,
        dimension: usize,
        value: f32,
    },
    #[error("{rows} feature rows for {instances} instances")]
    FeatureRows { rows: usize, instances: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Several bags on the model's device: every instance's embedding stacked `[N, D]` in bag
/// order, the bag lengths, and (when every bag has positions) the sparse-map sites
/// `(bag, i, j)` shifted so each bag's minimum is 0.
#[derive(Debug, Clone)]
pub struct BagBatch {
    features: Tensor,
    lengths: Vec<usize>,
    sites: Option<Vec<[i32; 3]>>,
    duplicate_sites: usize,
}

/// Largest spatial coordinate a sparse site may take (the sparse crate packs 24 bits).
const MAX_CELL: i64 = (1 << 23) - 1;

impl BagBatch {
    /// Stacks `bags` onto `device`. Instances sharing a cell of one bag (which the sparse-map
    /// stage should have resolved) keep their first occurrence on the sparse map; their count
    /// is reported by [`BagBatch::duplicate_sites`].
    pub fn from_bags(bags: &[&Bag], device: &Device) -> Result<BagBatch, BagError> {
        let first = bags.first().ok_or(BagError::NoBags)?;
        let dim = first.dim;
        for bag in bags {
            if bag.pixels.is_some() {
                return Err(BagError::PixelsWithoutEmbedder(bag.slide_id.clone()));
            }
            if bag.dim != dim {
                return Err(BagError::WidthMismatch {
                    slide: bag.slide_id.clone(),
                    expected: dim,
                    found: bag.dim,
                });
            }
            // A NaN would pass a ReLU as 0 and be silently ignored: refuse it by name.
            if let Some(k) = bag.embeddings.iter().position(|v| !v.is_finite()) {
                return Err(BagError::NonFinite {
                    slide: bag.slide_id.clone(),
                    instance: k / dim.max(1),
                    dimension: k % dim.max(1),
                    value: bag.embeddings[k],
                });
            }
        }
        let arrangement = Arrangement::of(bags)?;
        let total: usize = arrangement.lengths.iter().sum();
        let mut data = Vec::with_capacity(total * dim);
        for (bag, kept) in bags.iter().zip(&arrangement.kept) {
            match kept {
                None => data.extend_from_slice(&bag.embeddings),
                Some(rows) => {
                    for &r in rows {
                        data.extend_from_slice(&bag.embeddings[r * dim..(r + 1) * dim]);
                    }
                }
            }
            // Spilled bags: the batch has its copy; keep the resident set to one batch.
            bag.embeddings.release_pages();
        }
        let n = data.len() / dim.max(1);
        let features = Tensor::from_vec(data, (n, dim), device)?;
        Ok(arrangement.with_features(features))
    }

    /// Like [`BagBatch::from_bags`], with the instances' features computed elsewhere:
    /// `features` holds one row per instance of every bag, bag after bag (e.g. a trainable
    /// embedder's output, so gradients flow back into it). Rows dropped as duplicate sites
    /// are removed with a differentiable `index_select`.
    pub fn from_features(bags: &[&Bag], features: Tensor) -> Result<BagBatch, BagError> {
        let arrangement = Arrangement::of(bags)?;
        let rows: usize = bags.iter().map(|b| b.len()).sum();
        let (n, _) = features.dims2()?;
        if n != rows {
            return Err(BagError::FeatureRows {
                rows: n,
                instances: rows,
            });
        }
        if arrangement.kept.iter().all(Option::is_none) {
            return Ok(arrangement.with_features(features));
        }
        let mut index = Vec::with_capacity(rows);
        let mut start = 0u32;
        for (bag, kept) in bags.iter().zip(&arrangement.kept) {
            match kept {
                None => index.extend(start..start + bag.len() as u32),
                Some(k) => index.extend(k.iter().map(|&r| start + r as u32)),
            }
            start += bag.len() as u32;
        }
        let index = Tensor::from_vec(index, rows_len(&arrangement), features.device())?;
        let features = features.index_select(&index, 0)?;
        Ok(arrangement.with_features(features))
    }

    /// All instances' embeddings `[N, D]`, bag after bag.
    pub fn features(&self) -> &Tensor {
        &self.features
    }

    /// The same bags with other features `[N, D]` (e.g. a `Var` to differentiate with
    /// respect to the inputs).
    pub fn with_features(&self, features: Tensor) -> candle_core::Result<BagBatch> {
        if features.dims() != self.features.dims() {
            candle_core::bail!(
                "replacement features {:?} differ from the batch's {:?}",
                features.dims(),
                self.features.dims()
            );
        }
        Ok(BagBatch {
            features,
            ..self.clone()
        })
    }

    /// The same bags with per-instance features of any width `[N, D']` (the instance
    /// encoder's output): one row per instance, as [`BagBatch::features`].
    pub fn with_instance_features(&self, features: Tensor) -> candle_core::Result<BagBatch> {
        let (n, _) = features.dims2()?;
        let (rows, _) = self.features.dims2()?;
        if n != rows {
            candle_core::bail!("{n} encoded instances for a batch of {rows}");
        }
        Ok(BagBatch {
            features,
            ..self.clone()
        })
    }

    /// Number of instances of each bag.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Number of bags.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// Sparse-map sites `(bag, i, j)`, one per row of [`BagBatch::features`], when every bag
    /// carried positions.
    pub fn sites(&self) -> Option<&[[i32; 3]]> {
        self.sites.as_deref()
    }

    /// Instances dropped from the sparse map because their cell was already taken.
    pub fn duplicate_sites(&self) -> usize {
        self.duplicate_sites
    }

    /// The instances as a padded `[B, K_max, D]` tensor plus, when bags differ in length, a
    /// `[B, K_max]` mask (1 for real instances, 0 for padding): what permutation-invariant
    /// poolings consume.
    pub fn padded(&self) -> candle_core::Result<Padded> {
        let (n, d) = self.features.dims2()?;
        let b = self.lengths.len();
        let k_max = self.lengths.iter().copied().max().unwrap_or(0);
        if self.lengths.iter().all(|&l| l == k_max) {
            return Ok(Padded {
                x: self.features.reshape((b, k_max, d))?,
                mask: None,
            });
        }
        let mut index = Vec::with_capacity(b * k_max);
        let mut mask = Vec::with_capacity(b * k_max);
        let mut start = 0u32;
        for &len in &self.lengths {
            for k in 0..k_max {
                if k < len {
                    index.push(start + k as u32);
                    mask.push(1f32);
                } else {
                    index.push(n as u32);
                    mask.push(0f32);
                }
            }
            start += len as u32;
        }
        let dev = self.features.device();
        let pad = Tensor::zeros((1, d), self.features.dtype(), dev)?;
        let index = Tensor::from_vec(index, b * k_max, dev)?;
        let x = Tensor::cat(&[&self.features, &pad], 0)?
            .index_select(&index, 0)?
            .reshape((b, k_max, d))?;
        let mask = Tensor::from_vec(mask, (b, k_max), dev)?.to_dtype(self.features.dtype())?;
        Ok(Padded {
            x,
            mask: Some(mask),
        })
    }
}

/// Where each bag's instances go: lengths, sparse-map sites, and the rows kept when duplicate
/// sites were dropped (`None`: every row).
struct Arrangement {
    lengths: Vec<usize>,
    sites: Option<Vec<[i32; 3]>>,
    kept: Vec<Option<Vec<usize>>>,
    duplicate_sites: usize,
}

fn rows_len(a: &Arrangement) -> usize {
    a.lengths.iter().sum()
}

impl Arrangement {
    fn of(bags: &[&Bag]) -> Result<Arrangement, BagError> {
        if bags.is_empty() {
            return Err(BagError::NoBags);
        }
        let mut lengths = Vec::with_capacity(bags.len());
        for bag in bags {
            if bag.is_empty() {
                return Err(BagError::EmptyBag(bag.slide_id.clone()));
            }
            lengths.push(bag.len());
        }
        let total: usize = lengths.iter().sum();
        let all_positioned = bags.iter().all(|b| b.positions.is_some());
        let mut sites = all_positioned.then(|| Vec::with_capacity(total));
        let mut duplicate_sites = 0;
        let mut kept_rows = Vec::with_capacity(bags.len());
        for (b, bag) in bags.iter().enumerate() {
            match (&mut sites, &bag.positions) {
                (Some(sites), Some(positions)) => {
                    let kept = place_bag(bag, positions, b as i32, sites)?;
                    duplicate_sites += bag.len() - kept.len();
                    lengths[b] = kept.len();
                    kept_rows.push((kept.len() != bag.len()).then_some(kept));
                }
                _ => kept_rows.push(None),
            }
        }
        Ok(Arrangement {
            lengths,
            sites,
            kept: kept_rows,
            duplicate_sites,
        })
    }

    fn with_features(self, features: Tensor) -> BagBatch {
        BagBatch {
            features,
            lengths: self.lengths,
            sites: self.sites,
            duplicate_sites: self.duplicate_sites,
        }
    }
}

/// Appends one bag's sites (shifted to a zero minimum) and returns the rows kept.
fn place_bag(
    bag: &Bag,
    positions: &[[i64; 2]],
    b: i32,
    sites: &mut Vec<[i32; 3]>,
) -> Result<Vec<usize>, BagError> {
    if positions.len() != bag.len() {
        return Err(BagError::NoPositions(bag.slide_id.clone()));
    }
    let min_i = positions.iter().map(|p| p[0]).min().unwrap_or(0);
    let min_j = positions.iter().map(|p| p[1]).min().unwrap_or(0);
    let mut seen = std::collections::HashSet::with_capacity(positions.len());
    let mut kept = Vec::with_capacity(positions.len());
    for (r, p) in positions.iter().enumerate() {
        let (i, j) = (p[0] - min_i, p[1] - min_j);
        if i > MAX_CELL || j > MAX_CELL {
            return Err(BagError::PositionOutOfRange {
                slide: bag.slide_id.clone(),
                i: p[0],
                j: p[1],
            });
        }
        if seen.insert((i, j)) {
            sites.push([b, i as i32, j as i32]);
            kept.push(r);
        }
    }
    Ok(kept)
}

/// Bags padded to a common length (see [`BagBatch::padded`]).
#[derive(Debug, Clone)]
pub struct Padded {
    /// `[B, K_max, D]`.
    pub x: Tensor,
    /// `[B, K_max]`, 1 for instances and 0 for padding; `None` when no bag is padded.
    pub mask: Option<Tensor>,
}

impl Padded {
    /// An additive mask `[B, K_max, 1]`: 0 on instances, a large negative value on padding, so
    /// that max, log-sum-exp and softmax ignore padding.
    pub fn additive_mask(&self) -> candle_core::Result<Option<Tensor>> {
        match &self.mask {
            None => Ok(None),
            Some(m) => Ok(Some(((m - 1.0)? * 1e9)?.unsqueeze(2)?)),
        }
    }

    /// Number of real instances per bag, `[B, 1]`.
    pub fn counts(&self) -> candle_core::Result<Tensor> {
        let (b, k, _) = self.x.dims3()?;
        match &self.mask {
            None => Tensor::full(k as f32, (b, 1), self.x.device())?.to_dtype(self.x.dtype()),
            Some(m) => m.sum_keepdim(1),
        }
    }
}

/// The dtype every model computes in.
pub const MODEL_DTYPE: DType = DType::F32;
