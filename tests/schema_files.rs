//! The files under `schemas/` stay true to the code: the experiment JSON Schema is exactly what
//! `tessera schema` prints, and the README documents every column the cache really holds.

mod common;

use common::{cmu1, run, tessera_with, tile_embed_stages, write_dataset, write_yaml};
use std::path::Path;
use tempfile::TempDir;

fn schemas_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas"))
}

#[test]
fn checked_in_experiment_schema_is_up_to_date() {
    let printed = tessera_with(&["schema"]);
    assert!(printed.ok(), "{printed:?}");
    let path = schemas_dir().join("experiment.schema.json");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    let fresh: serde_json::Value = serde_json::from_str(&printed.stdout).unwrap();
    let stale: serde_json::Value = serde_json::from_str(&checked_in).unwrap_or_default();
    assert!(
        fresh == stale,
        "{} is stale: regenerate it with\n    cargo build && ./target/debug/tessera schema > schemas/experiment.schema.json",
        path.display()
    );
    // it knows every registered kind
    let kinds = tessera_with(&["stages"]);
    let listed = fresh["$defs"]["StageConfig"]["properties"]["kind"]["enum"].to_string();
    for line in kinds.stdout.lines().take_while(|l| !l.is_empty()) {
        let kind = line.split_whitespace().next().unwrap();
        assert!(
            listed.contains(&format!("\"{kind}\"")),
            "kind `{kind}` missing from the schema"
        );
        assert!(
            fresh["$defs"].get(format!("params_{kind}")).is_some(),
            "no parameters for `{kind}`"
        );
    }
}

/// Column names of the Parquet files of one cached stage kind.
fn cached_columns(cache: &Path, kind: &str) -> Vec<String> {
    let shard = std::fs::read_dir(cache.join(kind))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let file = std::fs::read_dir(shard)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(file).unwrap(),
    )
    .unwrap();
    reader
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

#[test]
fn readme_documents_every_cached_column() {
    let dir = TempDir::new().unwrap();
    write_dataset(dir.path(), &[("cmu", &cmu1(), "tumor", "train")]);
    let exp = write_yaml(
        dir.path(),
        "exp.yaml",
        &format!(
            "name: columns\ndataset: dataset.csv\ncache_dir: cache\n{}",
            tile_embed_stages(224, 4.0, 0.0)
        ),
    );
    let (r, _) = run(&exp, &dir.path().join("out"), &[]);
    assert!(r.ok(), "{r:?}");
    let readme = std::fs::read_to_string(schemas_dir().join("README.md")).unwrap();
    for kind in ["tile", "embed"] {
        let columns = cached_columns(&dir.path().join("cache"), kind);
        assert!(columns.iter().any(|c| c == "x"), "{columns:?}");
        for c in columns {
            assert!(
                readme.contains(&format!("`{c}`")),
                "schemas/README.md does not document `{c}` of `{kind}`"
            );
        }
    }
}
