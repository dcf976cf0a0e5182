//! `embed` driven through the engine's test harness.

mod common;

use arrow::array::{Array, FixedSizeListArray, Float16Array, Float32Array, Int64Array};
use arrow::record_batch::RecordBatch;
use candle_core::Device;
use common::{tile_schema, tile_table, tiles, write_resnet};
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
