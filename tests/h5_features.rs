//! `kind: h5_features` imports embeddings in the per-slide HDF5 files CLAM and TRIDENT write, and
//! they train exactly like the same embeddings imported from Parquet: the spatial benchmark's
//! table, rewritten as one TRIDENT-style `SLIDE.h5` per slide, gives identical metrics and
//! predictions. A slide without a file is reported by name and skipped.

mod common;

use arrow::array::{Array, FixedSizeListArray, Float32Array, Int64Array, StringArray};
use common::{count, run, write_yaml};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn spatial_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/spatial")
}

/// Per slide, in file order: `(x, y)`, the tile size and the embedding of every row.
type Rows = BTreeMap<String, (Vec<[i64; 2]>, i64, Vec<f32>, usize)>;

fn read_spatial_features() -> Rows {
    let file = std::fs::File::open(spatial_dir().join("features.parquet")).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Rows::new();
    for batch in reader {
        let b = batch.unwrap();
        let col = |name: &str| b.column_by_name(name).unwrap().clone();
        let ids = col("slide_id");
        let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
        let int = |name: &str| {
            col(name)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone()
        };
        let (x, y, ts) = (int("x"), int("y"), int("tile_size"));
        let emb = col("embedding");
        let emb = emb.as_any().downcast_ref::<FixedSizeListArray>().unwrap();
        let dim = emb.value_length() as usize;
        for i in 0..b.num_rows() {
            let e = rows
                .entry(ids.value(i).to_string())
                .or_insert_with(|| (Vec::new(), ts.value(i), Vec::new(), dim));
            e.0.push([x.value(i), y.value(i)]);
            let v = emb.value(i);
            e.2.extend(v.as_any().downcast_ref::<Float32Array>().unwrap().values());
        }
    }
    rows
}

/// TRIDENT's layout: `features [N, D]` f32, `coords [N, 2]` int64 with `patch_size_level0`.
fn write_trident(dir: &Path, rows: &Rows) {
    std::fs::create_dir_all(dir).unwrap();
    for (id, (coords, tile_size, emb, dim)) in rows {
        let f = hdf5::File::create(dir.join(format!("{id}.h5"))).unwrap();
        f.new_dataset::<f32>()
            .shape([coords.len(), *dim])
            .create("features")
            .unwrap()
            .write_raw(emb)
            .unwrap();
        let flat: Vec<i64> = coords.iter().flatten().copied().collect();
        let c = f
            .new_dataset::<i64>()
            .shape([coords.len(), 2])
            .create("coords")
            .unwrap();
        c.write_raw(&flat).unwrap();
        c.new_attr::<i64>()
            .create("patch_size_level0")
            .unwrap()
            .write_scalar(tile_size)
            .unwrap();
    }
}

/// The spatial example with SparseConvMIL only, its source stage replaced by `source`.
fn experiment(dir: &Path, name: &str, source: &str) -> PathBuf {
    let text = std::fs::read_to_string(spatial_dir().join("spatial.yaml")).unwrap();
    let body = text.split("\nsweep:").next().unwrap();
    let old_source = "  features:\n    kind: features\n    params:\n      path: features.parquet\n";
    assert!(body.contains(old_source), "spatial.yaml changed: {body}");
    let body = body
        .replace(old_source, source)
        .replace(
            "dataset: dataset.csv",
            &format!("dataset: {}", spatial_dir().join("dataset.csv").display()),
        )
        .replace("out_dir: runs/spatial", "out_dir: out");
    write_yaml(dir, name, &body)
}

#[test]
fn trident_h5_files_train_exactly_like_the_same_parquet_features() {
    let dir = TempDir::new().unwrap();
    let rows = read_spatial_features();
    assert!(rows.len() > 100, "{} slides", rows.len());
    write_trident(&dir.path().join("features_resnet"), &rows);

    let parquet = experiment(
        dir.path(),
        "parquet.yaml",
        &format!(
            "  features:\n    kind: features\n    params:\n      path: {}\n",
            spatial_dir().join("features.parquet").display()
        ),
    );
    let h5 = experiment(
        dir.path(),
        "h5.yaml",
        "  features:\n    kind: h5_features\n    params:\n      path: features_resnet\n",
    );
    let sets = ["train.pooling=sparseconvmil"];
    let (r, report) = run(&parquet, &dir.path().join("out-parquet"), &sets);
    assert!(r.ok(), "{r:?}");
    let (r, h5_report) = run(&h5, &dir.path().join("out-h5"), &sets);
    assert!(r.ok(), "{r:?}");
    let (report, h5_report) = (report.unwrap(), h5_report.unwrap());
    assert_eq!(
        count(&h5_report, "features", "items_out"),
        rows.len() as u64,
        "{h5_report:#}"
    );
    assert_eq!(
        count(&h5_report, "features", "rows_out"),
        count(&report, "features", "rows_out")
    );

    let read = |out: &str, file: &str| std::fs::read(dir.path().join(out).join(file)).unwrap();
    let metrics = |out: &str| -> serde_json::Value {
        serde_json::from_slice(&read(out, "metrics.json")).unwrap()
    };
    let (m, m_h5) = (metrics("out-parquet"), metrics("out-h5"));
    assert_eq!(m, m_h5, "same embeddings, same seed: same metrics");
    assert!(
        m_h5["balanced_accuracy"].as_f64().unwrap() >= 0.9,
        "SparseConvMIL on the spatial benchmark: {m_h5:#}"
    );
    // Per-slide probabilities identical too (Parquet bytes differ only in metadata).
    let probs = |out: &str| -> Vec<String> {
        let file = std::fs::File::open(dir.path().join(out).join("predictions.parquet")).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        reader
            .map(|b| {
                arrow::util::pretty::pretty_format_batches(&[b.unwrap()])
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(probs("out-parquet"), probs("out-h5"));

    // A slide whose file is missing is named and skipped; the others still train.
    let missing = rows.keys().next().unwrap();
    std::fs::remove_file(dir.path().join(format!("features_resnet/{missing}.h5"))).unwrap();
    let (r, report) = run(&h5, &dir.path().join("out-missing"), &sets);
    assert!(r.ok(), "{r:?}");
    let report = report.unwrap();
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{report:#}");
    assert_eq!(errors[0]["slide"], missing.as_str());
    let message = errors[0]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{missing}.h5")) && message.contains("no features file"),
        "{message}"
    );
}
