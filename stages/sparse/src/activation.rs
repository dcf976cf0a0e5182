//! Point-wise functions on active sites: activations and dropout. Inactive sites stay
//! inactive (a sparse ReLU never creates sites), so these only map the feature matrix.

use candle_core::Tensor;

use crate::error::SparseError;
use crate::module::{SparseModule, SparseModuleT};
use crate::tensor::SparseTensor;

/// ReLU on the active sites' features.
pub fn sparse_relu(x: &SparseTensor) -> candle_core::Result<SparseTensor> {
    x.map_features(|f| f.relu())
}

/// Dropout of feature entries on active sites (inverted scaling by `1 / (1 - p)`); identity
/// when `train` is false or `p == 0`.
pub fn sparse_dropout(x: &SparseTensor, p: f32, train: bool) -> candle_core::Result<SparseTensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(SparseError::InvalidConfig(format!(
            "dropout probability {p} must lie in [0, 1)"
        ))
        .into());
    }
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    x.map_features(|f| candle_nn::ops::dropout(f, p))
}

/// A point-wise activation as a layer (for [`crate::SparseSequential`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SparseActivation {
    /// `max(x, 0)`.
    Relu,
    /// `x` if positive else `slope * x`.
    LeakyRelu(f64),
    /// Gaussian error linear unit (erf form).
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
}

fn apply(a: SparseActivation, f: &Tensor) -> candle_core::Result<Tensor> {
    match a {
        SparseActivation::Relu => f.relu(),
        SparseActivation::LeakyRelu(s) => candle_nn::ops::leaky_relu(f, s),
        SparseActivation::Gelu => f.gelu_erf(),
        SparseActivation::Silu => f.silu(),
        SparseActivation::Sigmoid => candle_nn::ops::sigmoid(f),
        SparseActivation::Tanh => f.tanh(),
    }
}

impl SparseModule for SparseActivation {
    fn forward(&self, x: &SparseTensor) -> candle_core::Result<SparseTensor> {
        x.map_features(|f| apply(*self, f))
    }
}

/// Dropout as a layer: active only in training mode.
#[derive(Clone, Copy, Debug)]
pub struct SparseDropout {
    p: f32,
}

impl SparseDropout {
    /// Drops each feature entry with probability `p` in `[0, 1)`.
    pub fn new(p: f32) -> candle_core::Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(SparseError::InvalidConfig(format!(
                "dropout probability {p} must lie in [0, 1)"
            ))
            .into());
        }
        Ok(SparseDropout { p })
    }
}

impl SparseModuleT for SparseDropout {
    fn forward_t(&self, x: &SparseTensor, train: bool) -> candle_core::Result<SparseTensor> {
        sparse_dropout(x, self.p, train)
    }
}
