//! Module traits for layers over [`SparseTensor`]s, mirroring candle-nn's `Module`/`ModuleT`.

use crate::tensor::SparseTensor;

/// A layer mapping a sparse tensor to a sparse tensor, like [`candle_core::Module`].
pub trait SparseModule {
    /// Applies the layer.
    fn forward(&self, x: &SparseTensor) -> candle_core::Result<SparseTensor>;
}

/// A layer whose behaviour depends on training mode (batch-norm, dropout), like
/// [`candle_core::ModuleT`]. Every [`SparseModule`] is one (ignoring the flag).
pub trait SparseModuleT {
    /// Applies the layer; `train` selects batch statistics / active dropout.
    fn forward_t(&self, x: &SparseTensor, train: bool) -> candle_core::Result<SparseTensor>;
}

impl<M: SparseModule> SparseModuleT for M {
    fn forward_t(&self, x: &SparseTensor, _train: bool) -> candle_core::Result<SparseTensor> {
        self.forward(x)
    }
}

/// A chain of sparse layers applied in order: the usual way to declare a sparse CNN.
#[derive(Default)]
pub struct SparseSequential {
    layers: Vec<Box<dyn SparseModuleT + Send + Sync>>,
}

impl SparseSequential {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a layer (builder style).
    #[allow(clippy::should_implement_trait)]
    pub fn add<M: SparseModuleT + Send + Sync + 'static>(mut self, layer: M) -> Self {
        self.layers.push(Box::new(layer));
        self
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// True when the chain has no layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl SparseModuleT for SparseSequential {
    fn forward_t(&self, x: &SparseTensor, train: bool) -> candle_core::Result<SparseTensor> {
        let mut x = x.clone();
        for l in &self.layers {
            x = l.forward_t(&x, train)?;
        }
        Ok(x)
    }
}
