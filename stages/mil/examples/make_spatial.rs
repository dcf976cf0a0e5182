//! Writes the synthetic spatial benchmark (`dataset.csv`, `features.parquet`) into
//! `examples/spatial/` of the workspace (or the folder given as the first argument).
//! Run: `cargo run -p tessera-mil --example make_spatial`

use std::path::PathBuf;

use tessera_mil::train::synthetic::{write_example, SpatialConfig};

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/spatial")
        });
    // 200 slides of 6x6 tiles, 16-d embeddings, 6 positives each: 60/20/20 splits.
    let config = SpatialConfig::new(200, 36, 16, 2021);
    if let Err(e) = write_example(&dir, &config) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    println!("wrote {}/dataset.csv and features.parquet", dir.display());
}
