//! Errors of the MIL data stages (sampling, sparse maps, augmentation, splits, evaluation).
//! Converted into the engine's `StageError` at the stage boundary.

use tessera_pipeline::StageError;

/// What can go wrong in this crate's data stages; every message names the column, slide or
/// file concerned so a user can find the culprit.
#[derive(Debug, thiserror::Error)]
pub enum MilError {
    #[error("input has no column `{column}` (needed for {purpose})")]
    MissingColumn {
        column: String,
        purpose: &'static str,
    },
    #[error("column `{column}` is {found}, expected {expected}")]
    WrongType {
        column: String,
        expected: &'static str,
        found: String,
    },
    #[error("column `{column}` has a null value at row {row}")]
    Null { column: String, row: usize },
    #[error("slide `{slide}` has no label in the dataset CSV (column `label`)")]
    NoLabel { slide: String },
    #[error("splits: {0}")]
    Split(String),
    #[error("prediction for slide `{slide}`: {message}")]
    Prediction { slide: String, message: String },
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("{0}")]
    Invalid(String),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Spill(#[from] crate::spill::SpillError),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<MilError> for StageError {
    fn from(e: MilError) -> Self {
        match e {
            MilError::Arrow(a) => StageError::Arrow(a),
            other => StageError::msg(other),
        }
    }
}
