//! The crate's typed errors; stages convert them to `StageError` at the boundary.

use std::path::PathBuf;

/// What went wrong while loading a model or embedding tiles.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A tensor operation failed (shape mismatch, missing weight, device error).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// The weights file could not be used.
    #[error("weights {path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// The requested device is not available in this build or on this machine.
    #[error("device {device}: {message}")]
    Device { device: String, message: String },
    /// Tile pixels did not match what the table says about them.
    #[error("tile row {row}: {message}")]
    Pixels { row: usize, message: String },
    /// Arrow rejected data built from model output.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// Result type of this crate.
pub type EmbedResult<T> = Result<T, EmbedError>;
