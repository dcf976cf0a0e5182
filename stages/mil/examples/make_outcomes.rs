//! Writes the synthetic survival and regression examples (`dataset.csv`, `features.parquet`)
//! into `examples/survival/` and `examples/regression/` of the workspace: outcomes driven by
//! the size of a cluster of positive tiles, which only a spatial model can see
//! (see `tessera_mil::train::outcomes`).
//! Run: `cargo run -p tessera-mil --example make_outcomes`

use std::path::PathBuf;

use tessera_mil::train::outcomes::{write_outcomes, OutcomeConfig, OutcomeKind};

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for (kind, folder) in [
        (OutcomeKind::Survival, "survival"),
        (OutcomeKind::Regression, "regression"),
    ] {
        // 180 slides of 6x6 tiles, 16-d embeddings, 6 positives of which 1-6 form a blob.
        let config = OutcomeConfig::new(kind, 180, 2026);
        let dir = root.join(folder);
        if let Err(e) = write_outcomes(&dir, &config) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        println!("wrote {}/dataset.csv and features.parquet", dir.display());
    }
}
