//! tessera's multiple-instance-learning stages: everything between a table of tile embeddings
//! and the metrics of a trained slide classifier.
//!
//! # The dataflow contract
//!
//! The stages of this crate agree on the following, and the training stage relies on it.
//!
//! 1. **Embeddings** arrive per slide (`slide_id: Utf8, x: Int64, y: Int64, tile_size: Int64,
//!    embedding: FixedSizeList<Float32|Float16, D>`, level-0 pixel coordinates of the tile's
//!    top-left corner) from `embed`, from an external `features` reader, or from the cache.
//! 2. **`sample`** ([`sample`]) is the epoch driver. It gathers every slide's embeddings, assigns
//!    splits ([`splits::assign`]) and then, in `finish`, loops over epochs: for epoch `e` it emits
//!    every training slide (in an order shuffled per epoch), then every validation slide, then
//!    every test slide, each as one bag of at most `tiles_per_slide` rows drawn without
//!    replacement, each followed by `end_slide`; then `end_epoch(e)`. Training bags are drawn
//!    from (seed, epoch, slide); validation and test bags from (seed, slide) only, so they are
//!    the same every epoch. It stops when its consumer closes its inputs (`emit` returns
//!    `Stopped`) or after `epochs` epochs. It adds `split: Utf8` (`train` | `val` | `test`),
//!    `label: Utf8` (the dataset's label) and `grid_step: Int64` (the slide's tile-grid step in
//!    level-0 pixels, measured on all of its tiles), and drops `pixels`/`pixels_size` next to
//!    embeddings. Fed tiles without embeddings (end-to-end training), it keeps the pixels as
//!    the instances instead; `sparse_map` and `augment` then keep one tile per cell
//!    (`collision: first`) and `train` (`finetune_embedder: true`) embeds them with a
//!    trainable ResNet in every step ([`train::finetune`]).
//! 3. **`sparse_map`** ([`sparse_map`]) places each bag on the sparse map: it adds
//!    `map_i: Int64` (row, from `y`) and `map_j: Int64` (column, from `x`), both shifted so the
//!    bag's minimum is 0, and `collisions: Int64` (how many tiles were merged into the cell,
//!    1 = none). One row per occupied cell, rows sorted by `(map_i, map_j)`; the embedding of a
//!    cell is merged by the collision policy ([`sparse_map::CollisionPolicy`]).
//! 4. **`augment`** ([`augment`]) moves the cells of `train` rows (flips, rotations, scaling,
//!    shifts, local shuffles) and re-merges the cells that now coincide with the same policy;
//!    rows of other splits pass through unchanged. Same columns as its input.
//! 5. **`train`** ([`train`]) consumes these per-epoch bags and `EndOfEpoch` markers, closes its
//!    inputs when done and emits one prediction row per slide with [`predictions::predictions_schema`].
//! 6. **`evaluate`** ([`evaluate`]) computes the metrics ([`metrics`]) per split and writes
//!    `metrics.json` and `predictions.parquet` into the run's output folder.
//!
//! Class order everywhere is [`splits::classes`]: the sorted unique labels of the dataset.

pub mod augment;
pub mod columns;
pub mod error;
pub mod evaluate;
pub mod importance;
pub mod metrics;
pub mod models;
pub mod placement;
pub mod predictions;
pub mod sample;
pub mod seeding;
pub mod slab;
pub mod sparse_map;
pub mod spill;
pub mod splits;
pub mod task_metrics;
pub mod train;

pub use augment::AugmentParams;
pub use error::MilError;
pub use evaluate::EvaluateParams;
pub use placement::Placement;
pub use sample::SampleParams;
pub use sparse_map::{CollisionPolicy, SparseMapParams};
pub use splits::{classes, Split, SplitParams};
