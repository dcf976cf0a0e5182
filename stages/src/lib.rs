//! tessera's built-in stages, registered the same way a user's crate registers its own.
//!
//! Naming rule: a stage kind's parameters and `StageKind` impl live in its crate's `src/<kind>.rs`
//! (or `src/<kind>/mod.rs`), e.g. `tile/src/tile.rs`, `mil/src/train/mod.rs`.

pub use tessera_embed as embed;
pub use tessera_features as features;
pub use tessera_heatmap as heatmap;
pub use tessera_mil as mil;
pub use tessera_sparse as sparse;
pub use tessera_tile as tile;

use tessera_pipeline::Registry;

/// Adds every built-in stage kind to `registry`, and notes the OpenSlide the tiling runs on.
pub fn register_builtins(registry: &mut Registry) -> &mut Registry {
    registry.note_library("OpenSlide", tessera_tile::openslide_version());
    registry.register::<tessera_tile::TileParams>();
    registry.register::<tessera_embed::EmbedParams>();
    registry.register::<tessera_features::FeaturesParams>();
    registry.register::<tessera_features::H5FeaturesParams>();
    registry.register::<tessera_features::SlideflowParams>();
    registry.register_exporter("trident", tessera_features::export::trident_exporter);
    registry.register::<tessera_mil::SampleParams>();
    registry.register::<tessera_mil::SparseMapParams>();
    registry.register::<tessera_mil::AugmentParams>();
    registry.register::<tessera_mil::EvaluateParams>();
    registry.register::<tessera_mil::train::TrainParams>();
    registry.register::<tessera_heatmap::HeatmapParams>();
    registry
}

/// A registry holding the built-in stages.
pub fn builtin_registry() -> Registry {
    let mut registry = Registry::new();
    register_builtins(&mut registry);
    registry
}
