//! Embeddings computed elsewhere, read as tessera's embeddings table: these stages read files,
//! they do not embed (that is `tessera-embed`).
//!
//! - `kind: features` ([`FeaturesParams`]): Parquet in the embeddings-table schema.
//! - `kind: h5_features` ([`H5FeaturesParams`]): CLAM / TRIDENT per-slide HDF5 feature files.

pub mod error;
pub mod h5_features;
pub mod parquet_import;

pub use error::{FeaturesError, FeaturesResult};
pub use h5_features::H5FeaturesParams;
pub use parquet_import::FeaturesParams;
