//! Embeddings computed elsewhere, read as tessera's embeddings table: these stages read files,
//! they do not embed (that is `tessera-embed`).
//!
//! - `kind: features` ([`FeaturesParams`]): Parquet in the embeddings-table schema.
//! - `kind: h5_features` ([`H5FeaturesParams`]): CLAM / TRIDENT / STAMP per-slide HDF5 files.
//! - [`export`]: TRIDENT-layout HDF5 files from tessera's embeddings (`tessera export`).
//! - `kind: slideflow_features` ([`SlideflowParams`]): slideflow's `.pt` bags + `.index.npz`.

pub mod error;
pub mod export;
pub mod features;
pub mod h5_features;
pub mod parquet_stream;
pub mod slideflow_features;

pub use error::{FeaturesError, FeaturesResult};
pub use features::FeaturesParams;
pub use h5_features::{H5FeaturesParams, H5Layout};
pub use slideflow_features::SlideflowParams;
