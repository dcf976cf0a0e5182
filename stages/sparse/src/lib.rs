//! Sparse 2D convolutions for candle, with no knowledge of slides or pipelines.
//!
//! A [`SparseTensor`] is a batch of sparse maps: integer sites `(batch, i, j)` and a candle
//! feature matrix `[N, C]` (row `r` belongs to site `r`). Layers take and return sparse
//! tensors and are trained through candle's autograd:
//! [`SubmanifoldConv2d`], [`SparseConv2d`] (strided), [`SparseConvTranspose2d`],
//! [`SparseMaxPool2d`], [`SparseAvgPool2d`], [`SparseBatchNorm`], activations
//! ([`sparse_relu`], [`SparseActivation`]), dropout, and the global poolings
//! [`global_avg_pool`] / [`global_max_pool`] that end a network with a dense `[B, C]` tensor.
//!
//! # Rulebooks
//! A sparse convolution needs, for each kernel offset, the pairs (input row, output row) it
//! connects: the *rulebook*. A [`CoordSet`] sorts its sites once by a packed
//! `(batch, i, j)` key; a rulebook is then built by merging sorted image rows (O(N x kernel),
//! never a dense grid of the slide's size, never O(N^2)), stored as `[n_out, K]` and
//! `[n_in, K]` neighbour tables, and cached in the coordinate set under
//! `(kind, kernel, stride)`. Every layer at the same resolution shares the same
//! `Arc<CoordSet>` (layers that keep the sites return it), so a rulebook is built once per
//! forward pass however many layers use it; strided layers cache their output
//! coordinate set inside their rulebook, so a strided conv and a pooling of the same geometry
//! also share sites and rulebooks downstream.
//!
//! # Threads and determinism
//! On CPU (f32/f64) convolutions run the blocked gather -> GEMM -> accumulate kernels of
//! [`kernels`] on the current rayon pool. Output rows are partitioned into fixed blocks, each
//! owned by exactly one task, and every reduction (over offsets, over row chunks of the weight
//! gradient) runs in a fixed order: **results are bit-identical whatever the number of
//! threads** (tested with 1, 2 and 3), and there is no concurrent scatter-add to race on.
//! Other devices (CUDA) and dtypes run the same maths as an im2col gather and one candle
//! matmul ([`ops::gather_conv`]); the gather's backward pass is a gather too ([`RowGather`]),
//! because candle's CUDA `index_add` runs one thread per channel.
//!
//! # Conventions
//! Weights are `[K, C_in, C_out]`, offset `k = di * kernel + dj` (PyTorch sparseconvnet's
//! layout); see [`conv`] for the mapping to a dense `conv2d` weight and the init. Strided
//! geometries follow dense unpadded convolution: output `o` covers `[o * s, o * s + kernel)`.

#![warn(missing_docs)]

pub mod activation;
pub mod conv;
pub mod coords;
pub mod error;
pub mod gather;
pub mod global;
pub mod kernels;
pub mod module;
pub mod norm;
pub mod ops;
pub mod pool;
pub mod rulebook;
pub mod tensor;

#[cfg(test)]
mod testutil;

pub use activation::{sparse_dropout, sparse_relu, SparseActivation, SparseDropout};
pub use conv::{dense_weight, SparseConv2d, SparseConvTranspose2d, SubmanifoldConv2d};
pub use coords::CoordSet;
pub use error::SparseError;
pub use gather::RowGather;
pub use global::{global_avg_pool, global_max_pool};
pub use module::{SparseModule, SparseModuleT, SparseSequential};
pub use norm::SparseBatchNorm;
pub use ops::{sparse_conv, Direction};
pub use pool::{AvgDivisor, SparseAvgPool2d, SparseMaxPool2d};
pub use rulebook::{RuleKey, RuleKind, Rulebook};
pub use tensor::SparseTensor;
