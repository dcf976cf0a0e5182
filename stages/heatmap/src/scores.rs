//! Per-tile scores of one slide: every tile's embedding, placed on the sparse map exactly as
//! training placed its bags (same downsampling factor, grid step and collision policy), run
//! through the trained model, and each cell's score handed back to every tile in that cell.
//!
//! **Collisions**: tiles that land on one sparse-map cell are merged into one site before the
//! model sees them (as in training), so they share that site's score. The `cell_tiles` of a
//! tile says how many tiles shared its cell (1 = none).

use std::collections::HashMap;

use arrow::record_batch::RecordBatch;
use tessera_mil::columns::{int64_values, read_embeddings};
use tessera_mil::importance::{LoadedModel, Method};
use tessera_mil::models::{Bag, Split};
use tessera_mil::placement::Placement;
use tessera_mil::sparse_map::merge_cells;
use tessera_pipeline::schema::{EMBEDDING, TILE_SIZE, X, Y};

use crate::HeatmapError;

/// One slide's tiles (level-0 position and size) and embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct SlideTiles {
    pub slide_id: String,
    pub xs: Vec<i64>,
    pub ys: Vec<i64>,
    pub sizes: Vec<i64>,
    /// Row-major `[tiles, dim]`.
    pub embeddings: Vec<f32>,
    pub dim: usize,
}

impl SlideTiles {
    /// Reads the tile keys and embeddings of a slide's batches (in arrival order).
    pub fn from_batches(slide_id: &str, batches: &[RecordBatch]) -> Result<Self, HeatmapError> {
        const WHAT: &str = "the heatmap";
        let mut tiles = SlideTiles {
            slide_id: slide_id.to_string(),
            xs: Vec::new(),
            ys: Vec::new(),
            sizes: Vec::new(),
            embeddings: Vec::new(),
            dim: 0,
        };
        for batch in batches.iter().filter(|b| b.num_rows() > 0) {
            tiles.xs.extend(int64_values(batch, X, WHAT)?);
            tiles.ys.extend(int64_values(batch, Y, WHAT)?);
            tiles.sizes.extend(int64_values(batch, TILE_SIZE, WHAT)?);
            let emb = read_embeddings(batch, EMBEDDING)?;
            if tiles.dim != 0 && emb.dim != tiles.dim {
                return Err(HeatmapError::Invalid(format!(
                    "slide `{slide_id}`: embeddings of width {} and {} in one slide",
                    tiles.dim, emb.dim
                )));
            }
            tiles.dim = emb.dim;
            tiles.embeddings.extend(emb.values);
        }
        Ok(tiles)
    }

    pub fn len(&self) -> usize {
        self.xs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.xs.is_empty()
    }
}

/// Every tile's score for every class, and the slide's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct TileScores {
    pub slide_id: String,
    pub xs: Vec<i64>,
    pub ys: Vec<i64>,
    pub sizes: Vec<i64>,
    pub classes: Vec<String>,
    /// Row-major `[tiles, classes]`.
    pub scores: Vec<f32>,
    /// Tiles sharing each tile's sparse-map cell (1 for non-spatial models).
    pub cell_tiles: Vec<i64>,
    pub method: Method,
    /// The slide's class probabilities on all its tiles.
    pub probs: Vec<f32>,
}

impl TileScores {
    pub fn len(&self) -> usize {
        self.xs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.xs.is_empty()
    }

    /// Score of tile `i` for class `c`.
    pub fn score(&self, i: usize, c: usize) -> f32 {
        self.scores[i * self.classes.len() + c]
    }

    /// Every tile's score for class `c`.
    pub fn class_scores(&self, c: usize) -> Vec<f32> {
        (0..self.len()).map(|i| self.score(i, c)).collect()
    }

    /// The predicted class (index).
    pub fn predicted(&self) -> usize {
        tessera_mil::train::epochs::argmax(&self.probs)
    }

    /// The class a tile speaks for: its highest-scoring class, or the slide's prediction for
    /// class-agnostic methods (attention).
    pub fn tile_class(&self, i: usize) -> usize {
        if !self.method.class_specific() {
            return self.predicted();
        }
        tessera_mil::train::epochs::argmax(
            &self.scores[i * self.classes.len()..(i + 1) * self.classes.len()],
        )
    }
}

/// Scores every tile of `tiles` with `model`; `placement` places the tiles for spatial models
/// (the one training used, from the checkpoint).
pub fn score_slide(
    model: &LoadedModel,
    tiles: &SlideTiles,
    placement: Option<&Placement>,
) -> Result<TileScores, HeatmapError> {
    let config = &model.meta.model;
    if model.meta.embedder.is_some() {
        return Err(HeatmapError::Invalid(
            "the checkpoint was trained end to end (finetune_embedder): its scores need tile \
             pixels through the fine-tuned embedder, which heatmaps do not support yet; use a \
             model trained on cached embeddings"
                .into(),
        ));
    }
    if tiles.is_empty() {
        return Err(HeatmapError::Invalid(format!(
            "slide `{}` has no tiles",
            tiles.slide_id
        )));
    }
    if tiles.dim != config.input_dim {
        return Err(HeatmapError::Invalid(format!(
            "slide `{}`: embeddings of width {}, the checkpoint's model expects {} (was it trained on these features?)",
            tiles.slide_id, tiles.dim, config.input_dim
        )));
    }
    let n = tiles.len();
    let mut bag = Bag {
        slide_id: tiles.slide_id.clone(),
        label_index: 0,
        split: Split::Test,
        dim: tiles.dim,
        embeddings: Default::default(),
        positions: None,
        pixels: None,
    };
    // Which bag instance each tile's score comes from, and how many tiles share it.
    let (instance_of, cell_tiles): (Vec<usize>, Vec<i64>) = if config.pooling.is_spatial() {
        let placement = placement.ok_or_else(|| {
            HeatmapError::Invalid(
                "a sparseconvmil checkpoint needs the sparse-map placement it was trained with"
                    .into(),
            )
        })?;
        // All the slide's tiles are here: the grid step is measured on them, as `sample`
        // measures it for training.
        let tile_size = tiles.sizes.first().copied().unwrap_or(1);
        let (cells, _) = placement.cells(&tiles.xs, &tiles.ys, tile_size, None);
        let merged = merge_cells(
            &cells,
            &vec![1; n],
            &tiles.embeddings,
            tiles.dim,
            placement.collision,
        );
        let index: HashMap<(i64, i64), usize> = merged
            .cells
            .iter()
            .enumerate()
            .map(|(k, c)| (*c, k))
            .collect();
        let instance_of: Vec<usize> = cells.iter().map(|c| index[c]).collect();
        let cell_tiles = instance_of.iter().map(|&k| merged.counts[k]).collect();
        bag.positions = Some(merged.cells.iter().map(|&(i, j)| [i, j]).collect());
        bag.embeddings = merged.embeddings.into();
        (instance_of, cell_tiles)
    } else {
        bag.embeddings = tiles.embeddings.clone().into();
        ((0..n).collect(), vec![1; n])
    };
    let importance = model.explain(&bag)?;
    let c = importance.n_classes;
    if c != model.meta.classes.len() {
        return Err(HeatmapError::Invalid(format!(
            "the checkpoint's model gives {c} scores for the classes {:?}",
            model.meta.classes
        )));
    }
    let mut scores = Vec::with_capacity(n * c);
    for &k in &instance_of {
        let row = importance.row(k);
        if let Some(bad) = row.iter().find(|v| !v.is_finite()) {
            return Err(HeatmapError::Invalid(format!(
                "slide `{}`: non-finite importance {bad}",
                tiles.slide_id
            )));
        }
        scores.extend_from_slice(row);
    }
    Ok(TileScores {
        slide_id: tiles.slide_id.clone(),
        xs: tiles.xs.clone(),
        ys: tiles.ys.clone(),
        sizes: tiles.sizes.clone(),
        classes: model.meta.classes.clone(),
        scores,
        cell_tiles,
        method: importance.method,
        probs: importance.probs,
    })
}
