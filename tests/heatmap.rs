//! Heatmaps end to end on the real slide: a SparseConvMIL trained inside the experiment, the
//! `heatmap` stage waiting for it (second input) and writing, per slide, a Parquet table with
//! one row per tile, PNGs and QuPath GeoJSON; then a second experiment pointing `checkpoint:`
//! at the first run reuses the cached embeddings and reproduces the same scores.

mod common;

use std::path::Path;

use arrow::array::AsArray;
use arrow::datatypes::Float32Type;
use common::{cmu1, count, run, tile_embed_stages, validate, write_dataset, write_yaml};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tempfile::TempDir;

/// Dataset, cache and the tile and embed stages.
fn upstream() -> String {
    format!(
        "dataset: dataset.csv\ncache_dir: cache\n{}",
        tile_embed_stages(112, 2.0, 0.1)
    )
}

const TRAINING: &str = "
  sample:
    kind: sample
    inputs: [embed]
    params: {tiles_per_slide: 6}
  sparse_map:
    kind: sparse_map
    inputs: [sample]
    params: {downsample: 2}
  train:
    kind: train
    inputs: [sparse_map]
    params: {epochs: 2, batch_size: 2, sparse_channels: [8]}
  heatmap:
    kind: heatmap
    inputs: [embed, train]
    params: {draw: all, top_k: 3, top_k_px: 32, thumbnail_size: 256}
";

/// A tile's position and its per-class scores.
type Row = ((i64, i64), Vec<f32>);

/// Per-class scores of a heatmap table, by tile position.
fn read_table(path: &Path) -> (usize, Vec<String>, Vec<Row>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    let mut columns = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        columns = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let xs = batch
            .column_by_name("x")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>()
            .clone();
        let ys = batch
            .column_by_name("y")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>()
            .clone();
        let scores: Vec<_> = columns
            .iter()
            .filter(|c| c.starts_with("score_"))
            .map(|c| {
                batch
                    .column_by_name(c)
                    .unwrap()
                    .as_primitive::<Float32Type>()
                    .clone()
            })
            .collect();
        for i in 0..xs.len() {
            rows.push((
                (xs.value(i), ys.value(i)),
                scores.iter().map(|s| s.value(i)).collect(),
            ));
        }
    }
    rows.sort_by_key(|r| r.0);
    (rows.len(), columns, rows)
}

#[test]
fn heatmaps_of_a_trained_sparseconvmil_on_the_real_slide() {
    let dir = TempDir::new().unwrap();
    let s = cmu1();
    write_dataset(
        dir.path(),
        &[
            ("s1", &s, "tumor", "train"),
            ("s2", &s, "normal", "train"),
            ("s3", &s, "tumor", "val"),
            ("s4", &s, "normal", "test"),
        ],
    );
    let exp = write_yaml(
        dir.path(),
        "train.yaml",
        &format!("name: heat\n{}{TRAINING}", upstream()),
    );
    let out = dir.path().join("out");
    let (ran, report) = run(&exp, &out, &[]);
    assert!(ran.ok(), "{ran:?}");
    let report = report.unwrap();
    let tiles = count(&report, "embed", "rows_out") as usize;
    assert!(tiles >= 8, "too few tiles for the test: {tiles}");
    assert_eq!(count(&report, "heatmap", "rows_out") as usize, tiles);

    let maps = out.join("heatmaps");
    let mut total = 0;
    for id in ["s1", "s2", "s3", "s4"] {
        let (n, columns, _) = read_table(&maps.join(format!("{id}.parquet")));
        total += n;
        assert_eq!(
            columns,
            [
                "slide_id",
                "x",
                "y",
                "tile_size",
                "score_normal",
                "score_tumor",
                "cell_tiles"
            ]
        );
        let geo: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(maps.join(format!("{id}.geojson"))).unwrap(),
        )
        .unwrap();
        assert_eq!(geo["type"], "FeatureCollection");
        assert_eq!(geo["features"].as_array().unwrap().len(), n);
        for class in ["normal", "tumor"] {
            for file in [
                format!("{id}.{class}.png"),
                format!("{id}.{class}.top3.png"),
            ] {
                let img = image_size(&maps.join(&file));
                assert!(img.0 > 0 && img.1 > 0, "{file}");
            }
        }
    }
    assert_eq!(total, tiles, "one row per tile of every slide");

    // The same model through an explicit checkpoint: cached embeddings, same scores.
    let exp2 = write_yaml(
        dir.path(),
        "again.yaml",
        &format!(
            "name: again\n{}  heatmap:\n    kind: heatmap\n    inputs: [embed]\n    params: {{checkpoint: {}, png: false}}\n",
            upstream(),
            out.display()
        ),
    );
    let out2 = dir.path().join("out2");
    let (ran, report) = run(&exp2, &out2, &[]);
    assert!(ran.ok(), "{ran:?}");
    let report = report.unwrap();
    assert_eq!(count(&report, "embed", "cache_hits"), 4);
    assert_eq!(count(&report, "tile", "items_out"), 0, "nothing re-tiled");
    for id in ["s1", "s4"] {
        let (_, _, first) = read_table(&maps.join(format!("{id}.parquet")));
        let (_, _, second) = read_table(&out2.join("heatmaps").join(format!("{id}.parquet")));
        assert_eq!(first.len(), second.len());
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(a.0, b.0);
            for (u, v) in a.1.iter().zip(&b.1) {
                assert!(
                    (u - v).abs() <= 1e-5 * (1.0 + u.abs()),
                    "{id} {:?}: {u} vs {v}",
                    a.0
                );
            }
        }
    }
    assert!(!out2.join("heatmaps/s1.tumor.png").exists(), "png: false");
}

#[test]
fn a_heatmap_without_checkpoint_needs_the_training_stage_as_second_input() {
    let dir = TempDir::new().unwrap();
    write_dataset(dir.path(), &[("s1", &cmu1(), "tumor", "train")]);
    let exp = write_yaml(
        dir.path(),
        "bad.yaml",
        &format!(
            "name: bad\n{}  heatmap:\n    kind: heatmap\n    inputs: [embed]\n",
            upstream()
        ),
    );
    let ran = validate(&exp);
    assert!(!ran.ok(), "{ran:?}");
    let text = format!("{}{}", ran.stdout, ran.stderr);
    assert!(
        text.contains("heatmap") && text.contains("2 input(s), 1 given"),
        "{text}"
    );
}

fn image_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // PNG: signature, then the IHDR chunk with width and height (big-endian u32).
    assert_eq!(&bytes[1..4], b"PNG", "{}", path.display());
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}
