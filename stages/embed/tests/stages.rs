//! `embed` and `features` driven through the engine's test harness.

mod common;

use arrow::array::{
    Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, Float64Array, Int64Array,
    ListArray, StringArray,
};
use arrow::datatypes::{DataType, Field, Float64Type, Schema};
use arrow::record_batch::RecordBatch;
use candle_core::Device;
use common::{tile_schema, tile_table, tiles, write_resnet};
use parquet::arrow::ArrowWriter;
use std::path::Path;
use std::sync::Arc;
use tessera_embed::*;
use tessera_pipeline::schema::embedding_type;
use tessera_pipeline::testing::{test_slides, Harness};
use tessera_pipeline::StageKind;

fn embeddings_of(batch: &RecordBatch) -> Vec<Vec<f32>> {
    let col = batch
        .column_by_name("embedding")
        .unwrap()
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .unwrap();
    (0..col.len())
        .map(|i| {
            let v = col.value(i);
            if let Some(f) = v.as_any().downcast_ref::<Float32Array>() {
                f.values().to_vec()
            } else {
                v.as_any()
                    .downcast_ref::<Float16Array>()
                    .unwrap()
                    .values()
                    .iter()
                    .map(|h| h.to_f32())
                    .collect()
            }
        })
        .collect()
}

fn params(weights: &Path, input_size: usize) -> EmbedParams {
    EmbedParams {
        weights: weights.to_string_lossy().into_owned(),
        input_size,
        batch_size: 3,
        ..Default::default()
    }
}

#[test]
fn embed_stage_equals_a_direct_forward_across_batch_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let weights = write_resnet(dir.path(), ResNetDepth::R18, 11);
    let ts = tiles(5, 32);
    // Slide a arrives in two batches (2 + 3 rows) and is embedded in batches of 3: rows must
    // be regrouped without loss or reordering. Slide b has no rows at all.
    let slides = test_slides(&[("a", None, None), ("b", None, None)]);
    let out = Harness::new(slides, dir.path())
        .input(
            tile_schema(),
            vec![
                (0, tile_table("a", &ts[..2], 32, 0)),
                (0, tile_table("a", &ts[2..], 32, 1024)),
            ],
        )
        .run(params(&weights, 32))
        .unwrap();
    assert_eq!(out.ended, vec!["a", "b"]);
    assert_eq!(out.rows_of("a"), 5);
    let batches: Vec<&RecordBatch> = out.batches.iter().map(|(_, b)| b).collect();
    let got: Vec<Vec<f32>> = batches.iter().flat_map(|b| embeddings_of(b)).collect();
    let xs: Vec<i64> = batches
        .iter()
        .flat_map(|b| {
            b.column_by_name("x")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect();
    assert_eq!(xs, vec![0, 512, 1024, 1536, 2048]);
    let schema = batches[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        vec![
            "slide_id",
            "x",
            "y",
            "tile_size",
            "embedding",
            "tissue_fraction"
        ]
    );
    assert_eq!(
        schema.field_with_name("embedding").unwrap().data_type(),
        &embedding_type(512, false)
    );

    let model = load_embedder(
        &params(&weights, 32).spec(&test_build_context(dir.path())),
        &Device::Cpu,
    )
    .unwrap();
    let refs: Vec<&[u8]> = ts.iter().map(Vec::as_slice).collect();
    let direct = model.embed(&refs, 32).unwrap().to_vec2::<f32>().unwrap();
    for (row, (g, d)) in got.iter().zip(&direct).enumerate() {
        let err = g
            .iter()
            .zip(d)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "row {row}: {err}");
    }
}

fn test_build_context(dir: &Path) -> tessera_pipeline::BuildContext {
    tessera_pipeline::BuildContext {
        stage_name: "embed".into(),
        seed: 0,
        device: tessera_pipeline::DeviceSpec::Cpu,
        out_dir: dir.into(),
        cache_dir: dir.into(),
        base_dir: dir.into(),
        slides: Arc::from(Vec::new()),
        task: Default::default(),
        workers: 1,
        worker: 0,
    }
}

#[test]
fn half_storage_and_resizing_and_random_weights_are_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let ts = tiles(2, 48);
    let slides = test_slides(&[("a", None, None)]);
    let p = EmbedParams {
        weights: "random".into(),
        input_size: 32,
        half: true,
        seed: 3,
        ..Default::default()
    };
    let out = Harness::new(slides, dir.path())
        .input(tile_schema(), vec![(0, tile_table("a", &ts, 48, 0))])
        .run(p.clone())
        .unwrap();
    let batch = &out.batches[0].1;
    assert_eq!(
        batch
            .schema()
            .field_with_name("embedding")
            .unwrap()
            .data_type(),
        &embedding_type(512, true)
    );
    assert!(batch.schema().metadata()["tessera.embed.weights"].contains("NOT a trained model"));
    let report = out.report.unwrap();
    let warnings = &report.stage("embed").unwrap().warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.message.contains("random weights")),
        "{warnings:?}"
    );
    // Float16 values are the Float32 ones rounded; 48 px tiles are resized to 32 px.
    let full = load_embedder(&p.spec(&test_build_context(dir.path())), &Device::Cpu).unwrap();
    let refs: Vec<&[u8]> = ts.iter().map(Vec::as_slice).collect();
    let direct = full.embed(&refs, 48).unwrap().to_vec2::<f32>().unwrap();
    for (g, d) in embeddings_of(batch).iter().zip(&direct) {
        for (a, b) in g.iter().zip(d) {
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}

#[test]
fn bad_pixels_fail_the_slide_naming_the_tile() {
    let dir = tempfile::tempdir().unwrap();
    let mut ts = tiles(2, 32);
    ts[1].truncate(100);
    let slides = test_slides(&[("a", None, None)]);
    let p = EmbedParams {
        weights: "random".into(),
        input_size: 32,
        ..Default::default()
    };
    let out = Harness::new(slides, dir.path())
        .input(tile_schema(), vec![(0, tile_table("a", &ts, 32, 0))])
        .run(p)
        .unwrap();
    let report = out.report.unwrap();
    let msg =
        format!("{:?}", report.errors) + &format!("{:?}", report.stage("embed").unwrap().errors);
    assert!(msg.contains("x=512") && msg.contains("100 bytes"), "{msg}");
}

#[test]
fn parameters_are_checked() {
    let p = EmbedParams::default();
    assert_eq!(p.validate().unwrap_err().field, "weights");
    let p = EmbedParams {
        weights: "random".into(),
        arch: Architecture::VitS14,
        input_size: 200,
        ..Default::default()
    };
    assert_eq!(p.validate().unwrap_err().field, "input_size");
    let p = EmbedParams {
        weights: "random".into(),
        std: [0.2, 0.0, 0.2],
        ..Default::default()
    };
    assert_eq!(p.validate().unwrap_err().field, "std[1]");
    let p = EmbedParams {
        weights: "random".into(),
        batch_size: 0,
        ..Default::default()
    };
    assert_eq!(p.validate().unwrap_err().field, "batch_size");
}

#[test]
fn cache_salt_follows_the_weights_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_resnet(dir.path(), ResNetDepth::R18, 1);
    let b = write_resnet(dir.path(), ResNetDepth::R18, 2);
    let ctx = test_build_context(dir.path());
    let salt = |p: &Path| params(p, 32).cache_salt(&ctx).unwrap();
    assert_eq!(salt(&a), salt(&a));
    assert_ne!(salt(&a), salt(&b));
    // Relative paths resolve against the experiment folder.
    let rel = EmbedParams {
        weights: "resnet-1.safetensors".into(),
        ..Default::default()
    };
    assert_eq!(rel.cache_salt(&ctx).unwrap(), salt(&a));
}

// ---- features ----

fn write_features(path: &Path, rows: &[(&str, i64)], dim: usize) {
    let n = rows.len();
    let schema = Arc::new(Schema::new(vec![
        Field::new("slide_id", DataType::Utf8, false),
        Field::new("x", DataType::Int64, false),
        Field::new("y", DataType::Int64, false),
        Field::new("tile_size", DataType::Int64, false),
        Field::new("embedding", embedding_type(dim, false), false),
        Field::new("extra", DataType::Utf8, false),
    ]));
    let values: Vec<f32> = rows
        .iter()
        .flat_map(|(_, x)| (0..dim).map(move |d| *x as f32 + d as f32 / 10.0))
        .collect();
    let DataType::FixedSizeList(item, _) = embedding_type(dim, false) else {
        unreachable!()
    };
    let emb =
        FixedSizeListArray::try_new(item, dim as i32, Arc::new(Float32Array::from(values)), None)
            .unwrap();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(vec![7; n])),
        Arc::new(Int64Array::from(vec![256; n])),
        Arc::new(emb),
        Arc::new(StringArray::from(vec!["z"; n])),
    ];
    write_batch(path, RecordBatch::try_new(schema, cols).unwrap());
}

fn write_batch(path: &Path, batch: RecordBatch) {
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(2))
        .build();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn features(path: &Path) -> FeaturesParams {
    FeaturesParams {
        path: path.to_string_lossy().into_owned(),
    }
}

#[test]
fn features_reads_each_slides_rows_and_fails_missing_slides() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("feats.parquet");
    // Row groups of 2 rows: slide b spans two of them, between rows of a and c.
    write_features(
        &file,
        &[("a", 1), ("b", 2), ("b", 3), ("b", 4), ("c", 5)],
        4,
    );
    let slides = test_slides(&[
        ("b", None, None),
        ("a", None, None),
        ("missing", None, None),
    ]);
    let out = Harness::new(slides, dir.path().join("run"))
        .run(features(&file))
        .unwrap();
    assert_eq!(out.rows_of("b"), 3);
    assert_eq!(out.rows_of("a"), 1);
    let b: Vec<&RecordBatch> = out
        .batches
        .iter()
        .filter(|(s, _)| s == "b")
        .map(|(_, b)| b)
        .collect();
    let xs: Vec<i64> = b
        .iter()
        .flat_map(|b| {
            b.column(1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect();
    assert_eq!(xs, vec![2, 3, 4]);
    assert_eq!(embeddings_of(b[0])[0], vec![2.0, 2.1, 2.2, 2.3]);
    assert_eq!(b[0].num_columns(), 5, "extra columns are dropped");
    let report = out.report.unwrap();
    let errors = format!(
        "{:?}{:?}",
        report.errors,
        report.stage("features").unwrap().errors
    );
    assert!(
        errors.contains("missing") && errors.contains("feats.parquet"),
        "{errors}"
    );
    assert!(!out.ended.contains(&"missing".to_string()));
}

#[test]
fn features_reads_a_folder_and_a_slide_id_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("f");
    std::fs::create_dir(&folder).unwrap();
    write_features(&folder.join("s1.parquet"), &[("s1", 1), ("s1", 2)], 3);
    write_features(&folder.join("s2.parquet"), &[("s2", 9)], 3);
    std::fs::write(folder.join("notes.txt"), "not parquet").unwrap();
    let slides = test_slides(&[("s1", None, None), ("s2", None, None)]);
    let out = Harness::new(slides.clone(), dir.path().join("r1"))
        .run(features(&folder))
        .unwrap();
    assert_eq!((out.rows_of("s1"), out.rows_of("s2")), (2, 1));
    let pattern = FeaturesParams {
        path: format!("{}/{{slide_id}}.parquet", folder.display()),
    };
    let out = Harness::new(slides, dir.path().join("r2"))
        .run(pattern.clone())
        .unwrap();
    assert_eq!((out.rows_of("s1"), out.rows_of("s2")), (2, 1));
    // A broken per-slide file (sorting first) fails its slide only.
    std::fs::write(folder.join("s0.parquet"), "truncated").unwrap();
    let three = test_slides(&[("s0", None, None), ("s1", None, None), ("s2", None, None)]);
    let out = Harness::new(three, dir.path().join("r3"))
        .run(pattern.clone())
        .unwrap();
    assert_eq!((out.rows_of("s1"), out.rows_of("s2")), (2, 1));
    let errors = format!(
        "{:?}",
        out.report.unwrap().stage("features").unwrap().errors
    );
    assert!(errors.contains("s0.parquet"), "{errors}");
    std::fs::remove_file(folder.join("s0.parquet")).unwrap();
    // The salt changes when a slide's file changes.
    let ctx = test_build_context(dir.path());
    let ctx = tessera_pipeline::BuildContext {
        slides: Arc::from(test_slides(&[("s1", None, None)])),
        ..ctx
    };
    let before = pattern.cache_salt(&ctx).unwrap();
    write_features(&folder.join("s1.parquet"), &[("s1", 1)], 3);
    assert_ne!(before, pattern.cache_salt(&ctx).unwrap());
}

#[test]
fn features_reports_missing_columns_and_wrong_types_by_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let no_emb = dir.path().join("no_emb.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("slide_id", DataType::Utf8, false),
        Field::new("x", DataType::Int64, false),
        Field::new("y", DataType::Int64, false),
        Field::new("tile_size", DataType::Int64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec!["a"])),
        Arc::new(Int64Array::from(vec![1])),
        Arc::new(Int64Array::from(vec![1])),
        Arc::new(Int64Array::from(vec![1])),
    ];
    write_batch(&no_emb, RecordBatch::try_new(schema, cols).unwrap());
    let err = features(&no_emb)
        .output_schema(&[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no_emb.parquet") && err.contains("missing column `embedding`"),
        "{err}"
    );

    let float_x = dir.path().join("float_x.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("slide_id", DataType::Utf8, false),
        Field::new("x", DataType::Float64, false),
        Field::new("y", DataType::Int64, false),
        Field::new("tile_size", DataType::Int64, false),
        Field::new("embedding", embedding_type(2, false), false),
    ]));
    let DataType::FixedSizeList(item, _) = embedding_type(2, false) else {
        unreachable!()
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec!["a"])),
        Arc::new(Float64Array::from(vec![1.5])),
        Arc::new(Int64Array::from(vec![1])),
        Arc::new(Int64Array::from(vec![1])),
        Arc::new(
            FixedSizeListArray::try_new(
                item,
                2,
                Arc::new(Float32Array::from(vec![1.0, 2.0])),
                None,
            )
            .unwrap(),
        ),
    ];
    write_batch(&float_x, RecordBatch::try_new(schema, cols).unwrap());
    let err = features(&float_x)
        .output_schema(&[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("float_x.parquet") && err.contains("column `x` is Float64"),
        "{err}"
    );
}

#[test]
fn features_accepts_variable_lists_of_doubles_as_written_by_pandas() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pandas.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("slide_id", DataType::Utf8, true),
        Field::new("x", DataType::Int32, true),
        Field::new("y", DataType::Int32, true),
        Field::new("tile_size", DataType::Int32, true),
        Field::new(
            "embedding",
            DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            true,
        ),
    ]));
    let lists = ListArray::from_iter_primitive::<Float64Type, _, _>(vec![
        Some(vec![Some(1.0), Some(2.0), Some(3.0)]),
        Some(vec![Some(4.0), Some(5.0), Some(6.0)]),
    ]);
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec!["a", "a"])),
        Arc::new(arrow::array::Int32Array::from(vec![0, 256])),
        Arc::new(arrow::array::Int32Array::from(vec![0, 0])),
        Arc::new(arrow::array::Int32Array::from(vec![256, 256])),
        Arc::new(lists),
    ];
    write_batch(&path, RecordBatch::try_new(schema, cols).unwrap());
    let out_schema = features(&path).output_schema(&[]).unwrap();
    assert_eq!(
        out_schema.field_with_name("embedding").unwrap().data_type(),
        &embedding_type(3, false)
    );
    let out = Harness::new(test_slides(&[("a", None, None)]), dir.path().join("r"))
        .run(features(&path))
        .unwrap();
    let all: Vec<Vec<f32>> = out
        .batches
        .iter()
        .flat_map(|(_, b)| embeddings_of(b))
        .collect();
    assert_eq!(all, vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]);
}
