//! Errors of the sparse layer library.
//!
//! Layer `forward`s return [`candle_core::Result`] so that they compose with candle code; the
//! conditions candle has no variant for (bad coordinates, duplicate sites, mismatched
//! coordinate sets) are described by [`SparseError`], which converts into a candle error
//! (and back) with `?`.

/// Why a sparse tensor or a sparse operation was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SparseError {
    /// Two active sites share one `(batch, i, j)`: a sparse tensor holds at most one feature
    /// row per site (collisions must be resolved before, e.g. by the sparse-map stage).
    #[error("duplicate active site (batch {0}, i {1}, j {2}) at rows {3} and {4}")]
    DuplicateCoordinate(i32, i32, i32, usize, usize),
    /// A spatial coordinate is negative or too large for the packed 24-bit key.
    #[error("coordinate (batch {0}, i {1}, j {2}) out of range: i and j must lie in [0, {max})", max = crate::coords::MAX_SPATIAL)]
    CoordinateOutOfRange(i32, i32, i32),
    /// A batch index is negative or not below the declared batch size.
    #[error("batch index {0} out of range for batch size {1}")]
    BatchOutOfRange(i32, usize),
    /// The batch size exceeds what the packed 16-bit key can hold.
    #[error("batch size {0} exceeds the maximum {max}", max = crate::coords::MAX_BATCH)]
    BatchTooLarge(usize),
    /// Features do not have one row per active site, or not the expected channels.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// A layer was given an invalid hyper-parameter (even kernel, zero stride, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Two sparse tensors were expected to share one coordinate set.
    #[error("coordinate sets differ: {0}")]
    CoordinateMismatch(String),
    /// A batch entry has no active site, so its global pooling is undefined.
    #[error("batch entry {0} has no active site; global pooling is undefined")]
    EmptyBatchEntry(usize),
    /// An error raised by candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<SparseError> for candle_core::Error {
    fn from(e: SparseError) -> Self {
        match e {
            SparseError::Candle(c) => c,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Result of the sparse-specific constructors (coordinates, rulebooks).
pub type Result<T> = std::result::Result<T, SparseError>;
