//! Errors of training; converted into the engine's `StageError` at the stage boundary.

use std::path::PathBuf;

use tessera_pipeline::StageError;

use super::checkpoint::CheckpointError;
use crate::error::MilError;
use crate::models::bag::BagError;

/// What can stop training; messages name the epoch, batch, slide or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("epoch {epoch}, batch {batch} (slides {slides}): the loss is {value}; training stopped and the last good checkpoint is kept (lower `lr`, check the embeddings for NaN/inf, or enable batch-norm)")]
    NonFiniteLoss {
        epoch: usize,
        batch: usize,
        slides: String,
        value: f32,
    },
    #[error("epoch {epoch}, batch {batch} (slides {slides}): the gradient norm is {norm}; training stopped and the last good checkpoint is kept (lower `lr`)")]
    NonFiniteGradient {
        epoch: usize,
        batch: usize,
        slides: String,
        norm: f64,
    },
    #[error("{context}: {source}")]
    Candle {
        context: String,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Bag(#[from] BagError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("resuming from {path}: {message}")]
    Resume { path: PathBuf, message: String },
    #[error(transparent)]
    Mil(#[from] MilError),
    #[error("epoch {0}: no training bags arrived (is any slide in the `train` split?)")]
    NoTrainingBags(usize),
    #[error("slide `{slide}`: {message}")]
    Slide { slide: String, message: String },
    #[error("embedder: {message}")]
    Embedder { message: String },
    #[error("spill file of the epoch's bags {path}: {message}")]
    Spill { path: PathBuf, message: String },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<TrainError> for StageError {
    fn from(e: TrainError) -> Self {
        StageError::msg(e)
    }
}

/// Adds what was being done to a candle error.
pub trait CandleContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, TrainError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, TrainError> {
        self.map_err(|source| TrainError::Candle {
            context: what(),
            source,
        })
    }
}
