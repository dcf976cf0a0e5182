//! The crate's typed errors; stages convert them to `StageError` at the boundary.

use std::path::PathBuf;

/// What went wrong while importing or exporting embeddings: always names the file.
#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    /// A features file is unusable (missing column or dataset, wrong type, unreadable).
    #[error("features {path}: {message}")]
    File { path: PathBuf, message: String },
    /// Arrow rejected data built from a file's values.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// Result type of this crate.
pub type FeaturesResult<T> = Result<T, FeaturesError>;
