//! `tessera export` writes a cached stage's embeddings as TRIDENT-layout HDF5 files and as one
//! Parquet file; both re-import (`h5_features`, `features`) to exactly the rows exported.

mod common;

use common::{run, tessera_with, write_yaml};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn spatial_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/spatial")
}

/// An experiment whose only stage is the cached source `source`.
fn experiment(dir: &Path, name: &str, source: &str) -> PathBuf {
    let text = format!(
        "name: {name}\nseed: 0\ncache_dir: cache\nout_dir: out\ndataset: {}\nstages:\n  features:\n    kind: {source}\n    cache: true\n",
        spatial_dir().join("dataset.csv").display()
    );
    write_yaml(dir, &format!("{name}.yaml"), &text)
}

/// Every row of a Parquet file, one text line each (slide_id, x, y, tile_size, embedding).
fn rows(path: &Path) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let text = arrow::util::pretty::pretty_format_batches(std::slice::from_ref(&b))
            .unwrap()
            .to_string();
        out.extend(
            text.lines()
                .filter(|l| l.starts_with("| ") && !l.contains("slide_id"))
                .map(str::to_string),
        );
    }
    out
}

#[test]
fn exported_h5_and_parquet_reimport_to_the_exported_rows() {
    let dir = TempDir::new().unwrap();
    let source = format!(
        "features\n    params:\n      path: {}",
        spatial_dir().join("features.parquet").display()
    );
    let first = experiment(dir.path(), "first", &source);
    let (r, _) = run(&first, &dir.path().join("out1"), &[]);
    assert!(r.ok(), "{r:?}");
    let (h5, pq) = (dir.path().join("h5"), dir.path().join("all.parquet"));
    let exp = first.to_string_lossy().into_owned();
    let r = tessera_with(&[
        "export",
        &exp,
        "--h5",
        &h5.to_string_lossy(),
        "--parquet",
        &pq.to_string_lossy(),
    ]);
    assert!(r.ok(), "{r:?}");
    let original = rows(&spatial_dir().join("features.parquet"));
    assert_eq!(
        rows(&pq),
        original,
        "the Parquet export holds the imported rows"
    );
    let n_slides = std::fs::read_dir(&h5).unwrap().count();
    assert_eq!(
        n_slides + 1,
        std::fs::read_to_string(spatial_dir().join("dataset.csv"))
            .unwrap()
            .lines()
            .count()
    );

    // The TRIDENT files re-import with h5_features, and export again to the same rows.
    let second = experiment(
        dir.path(),
        "second",
        &format!("h5_features\n    params:\n      path: {}", h5.display()),
    );
    let (r, _) = run(&second, &dir.path().join("out2"), &[]);
    assert!(r.ok(), "{r:?}");
    let again = dir.path().join("again.parquet");
    let exp2 = second.to_string_lossy().into_owned();
    let r = tessera_with(&["export", &exp2, "--parquet", &again.to_string_lossy()]);
    assert!(r.ok(), "{r:?}");
    assert_eq!(
        rows(&again),
        original,
        "TRIDENT export re-imports identically"
    );

    // Nothing cached: a clear error, not an empty file.
    let empty = experiment(
        dir.path(),
        "empty",
        &format!(
            "h5_features\n    params:\n      path: {}\n      tile_size: 3",
            h5.display()
        ),
    );
    let r = tessera_with(&[
        "export",
        &empty.to_string_lossy(),
        "--parquet",
        &dir.path().join("none.parquet").to_string_lossy(),
    ]);
    assert!(
        !r.ok() && r.stderr.contains("run the experiment first"),
        "{r:?}"
    );
}
