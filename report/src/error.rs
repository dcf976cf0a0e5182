//! What can go wrong while writing results or drawing figures.

use std::path::{Path, PathBuf};

/// A report failure, naming the file involved where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Table { path: PathBuf, message: String },
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(
        "{0} holds neither sweep.json nor metrics.json: give the output folder of `tessera run`"
    )]
    NotARun(PathBuf),
    #[error("no font to draw text with: {0}")]
    Font(String),
    #[error("statistics of {what}: {source}")]
    Stats {
        what: String,
        source: tessera_stats::StatsError,
    },
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

impl ReportError {
    /// An I/O error about `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ReportError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
