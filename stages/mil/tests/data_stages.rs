//! The data stages (`sample`, `sparse_map`, `augment`, `evaluate`) run through the engine's
//! one-stage harness, and chained one after the other as in an experiment.

use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{Int64Type, SchemaRef};
use std::collections::BTreeSet;
use std::sync::Arc;
use tessera_mil::columns::{embeddings_array, read_embeddings};
use tessera_mil::predictions::{predictions_schema, to_batch, Prediction};
use tessera_mil::{AugmentParams, EvaluateParams, SampleParams, SparseMapParams};
use tessera_pipeline::schema::embeddings_schema;
use tessera_pipeline::testing::{Harness, HarnessOutput};
use tessera_pipeline::{RunStatus, Slide, SlideHandle};

const TILE: i64 = 512;
const STEP: i64 = 384; // 512 px tiles with 128 px overlap

fn slides() -> Vec<SlideHandle> {
    [
        ("a", "tumor", "train"),
        ("b", "normal", "train"),
        ("c", "tumor", "val"),
        ("d", "normal", "test"),
    ]
    .iter()
    .enumerate()
    .map(|(index, (id, label, split))| {
        Arc::new(Slide {
            index,
            id: id.to_string(),
            path: None,
            label: Some(label.to_string()),
            split: Some(split.to_string()),
            case_id: None,
            mpp: None,
            extra: Default::default(),
        })
    })
    .collect()
}

/// A `side x side` grid of tiles (step 384 px) with 4-d embeddings `[slide, k, x, y]`.
fn embeddings(slide: usize, id: &str, side: i64) -> RecordBatch {
    let coords: Vec<(i64, i64)> = (0..side * side)
        .map(|k| ((k % side) * STEP, (k / side) * STEP))
        .collect();
    let n = coords.len();
    let schema = embeddings_schema(4, false);
    let values: Vec<f32> = coords
        .iter()
        .enumerate()
        .flat_map(|(k, (x, y))| [slide as f32, k as f32, *x as f32, *y as f32])
        .collect();
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec![id; n])),
            Arc::new(Int64Array::from_iter_values(coords.iter().map(|c| c.0))),
            Arc::new(Int64Array::from_iter_values(coords.iter().map(|c| c.1))),
            Arc::new(Int64Array::from(vec![TILE; n])),
            embeddings_array(&values, schema.field(4).data_type()).unwrap(),
        ],
    )
    .unwrap()
}

fn dataset_input() -> (SchemaRef, Vec<(usize, RecordBatch)>) {
    let batches = slides()
        .iter()
        .map(|s| (s.index, embeddings(s.index, &s.id, 8)))
        .collect();
    (embeddings_schema(4, false), batches)
}

fn ints(batch: &RecordBatch, name: &str) -> Vec<i64> {
    batch
        .column_by_name(name)
        .unwrap()
        .as_primitive::<Int64Type>()
        .values()
        .to_vec()
}

fn strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    let col = batch.column_by_name(name).unwrap().as_string::<i32>();
    (0..col.len()).map(|i| col.value(i).to_string()).collect()
}

fn assert_ok(out: &HarnessOutput) {
    let report = out.report.as_ref().unwrap();
    assert_eq!(report.status, RunStatus::Ok, "errors: {:?}", report.errors);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

/// Runs `sample` for `epochs` epochs (the collector closes its inputs, as training does).
fn run_sample(dir: &std::path::Path, params: SampleParams, epochs: u64) -> HarnessOutput {
    let (schema, batches) = dataset_input();
    let mut harness = Harness::new(slides(), dir).input(schema, batches);
    harness.seed = 9;
    harness.epochs = Some(epochs);
    let out = harness.run(params).unwrap();
    assert_ok(&out);
    out
}

#[test]
fn sample_emits_every_slide_once_per_epoch_until_training_stops() {
    let dir = tempfile::tempdir().unwrap();
    let params = SampleParams {
        tiles_per_slide: 10,
        eval_tiles_per_slide: Some(0),
        ..Default::default()
    };
    let out = run_sample(dir.path(), params, 3);
    assert_eq!(out.epochs, [0, 1, 2]);
    assert_eq!(out.ended.len(), 12, "{:?}", out.ended);
    for epoch in out.ended.chunks(4) {
        // Training slides (shuffled) first, then validation, then test.
        assert_eq!(epoch.iter().cloned().collect::<BTreeSet<_>>().len(), 4);
        assert_eq!(&epoch[2..], ["c", "d"]);
    }
    let bags = |id: &str| -> Vec<&RecordBatch> {
        out.batches
            .iter()
            .filter(|(s, _)| s == id)
            .map(|(_, b)| b)
            .collect()
    };
    let a = bags("a");
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|b| b.num_rows() == 10));
    assert_ne!(
        ints(a[0], "x"),
        ints(a[1], "x"),
        "training bags are re-drawn each epoch"
    );
    let c = bags("c");
    assert!(
        c.iter().all(|b| b.num_rows() == 64),
        "validation bags hold every tile"
    );
    assert_eq!(strings(a[0], "split")[0], "train");
    assert_eq!(strings(c[0], "split")[0], "val");
    assert_eq!(strings(bags("d")[0], "label")[0], "normal");
    assert!(ints(a[0], "grid_step").iter().all(|&s| s == STEP));
}

#[test]
fn sample_stops_on_its_own_after_epochs_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let (schema, batches) = dataset_input();
    let mut harness = Harness::new(slides(), dir.path()).input(schema, batches);
    harness.seed = 9;
    let params = SampleParams {
        tiles_per_slide: 5,
        epochs: 2,
        ..Default::default()
    };
    let first = harness.run(params.clone()).unwrap();
    assert_ok(&first);
    assert_eq!(first.epochs, [0, 1]);
    let second = harness.run(params).unwrap();
    let xs = |o: &HarnessOutput| -> Vec<(String, Vec<i64>)> {
        o.batches
            .iter()
            .map(|(s, b)| (s.clone(), ints(b, "x")))
            .collect()
    };
    assert_eq!(xs(&first), xs(&second));
}

#[test]
fn sample_spilled_to_disk_draws_the_same_bags_and_leaves_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let (schema, batches) = dataset_input();
    let mut harness = Harness::new(slides(), dir.path()).input(schema, batches);
    harness.seed = 3;
    let params = SampleParams {
        tiles_per_slide: 7,
        epochs: 2,
        ..Default::default()
    };
    let in_ram = harness.run(params.clone()).unwrap();
    let spill_dir = dir.path().join("spill");
    let on_disk = harness
        .run(SampleParams {
            spill_to_disk: true,
            spill_dir: Some(spill_dir.clone()),
            ..params
        })
        .unwrap();
    assert_ok(&on_disk);
    assert_eq!(in_ram.batches, on_disk.batches);
    let left: Vec<_> = std::fs::read_dir(&spill_dir).unwrap().collect();
    assert!(
        left.is_empty(),
        "spill files are unlinked once mapped: {left:?}"
    );
}

#[test]
fn sparse_map_then_augment_build_training_bags() {
    let dir = tempfile::tempdir().unwrap();
    // One epoch of bags of every tile: 8 x 8 grid per slide.
    let params = SampleParams {
        tiles_per_slide: 0,
        epochs: 1,
        ..Default::default()
    };
    let (schema, batches) = dataset_input();
    let sampled = Harness::new(slides(), dir.path().join("s"))
        .input(schema, batches)
        .run(params)
        .unwrap();
    assert_ok(&sampled);
    let sampled_schema = sampled.batches[0].1.schema();
    let feed = |out: &HarnessOutput| -> Vec<(usize, RecordBatch)> {
        out.batches
            .iter()
            .map(|(id, b)| {
                (
                    slides().iter().position(|s| &s.id == id).unwrap(),
                    b.clone(),
                )
            })
            .collect()
    };

    // d = 2 grid units: 8 x 8 tiles -> 4 x 4 cells of 4 tiles each, averaged.
    let map_params = SparseMapParams {
        downsample: Some(2.0),
        ..Default::default()
    };
    let mapped = Harness::new(slides(), dir.path().join("m"))
        .input(sampled_schema, feed(&sampled))
        .run(map_params)
        .unwrap();
    assert_ok(&mapped);
    let (_, a) = mapped.batches.iter().find(|(s, _)| s == "a").unwrap();
    assert_eq!(a.num_rows(), 16);
    assert!(ints(a, "collisions").iter().all(|&c| c == 4));
    assert_eq!(*ints(a, "map_i").iter().max().unwrap(), 3);
    // Cell (0, 0) averages tiles k = 0, 1, 8, 9.
    let emb = read_embeddings(a, "embedding").unwrap();
    assert_eq!(emb.values[1], 4.5);
    let warnings = &mapped
        .report
        .as_ref()
        .unwrap()
        .stages
        .iter()
        .find(|s| s.kind == "sparse_map")
        .unwrap()
        .warnings;
    assert_eq!(
        warnings.len(),
        4,
        "one collision warning per slide: {warnings:?}"
    );
    assert!(
        warnings[0]
            .message
            .contains("64 of 64 tiles collided into 16 cells"),
        "{}",
        warnings[0].message
    );

    let aug_params = AugmentParams {
        scale_probability: 0.0,
        ..Default::default()
    };
    let augmented = Harness::new(slides(), dir.path().join("a"))
        .input(mapped.batches[0].1.schema(), feed(&mapped))
        .run(aug_params)
        .unwrap();
    assert_ok(&augmented);
    for (id, before) in &mapped.batches {
        let (_, after) = augmented.batches.iter().find(|(s, _)| s == id).unwrap();
        assert_eq!(after.schema().fields(), before.schema().fields());
        let total: i64 = ints(after, "collisions").iter().sum();
        assert_eq!(total, 64, "slide {id}: every tile still counted");
        let cells = |b: &RecordBatch| -> Vec<(i64, i64)> {
            ints(b, "map_i").into_iter().zip(ints(b, "map_j")).collect()
        };
        if strings(before, "split")[0] == "train" {
            assert_ne!(
                cells(after),
                cells(before),
                "slide {id}: training bags move"
            );
        } else {
            assert_eq!(
                after.columns(),
                before.columns(),
                "slide {id}: evaluation bags pass unchanged"
            );
        }
    }
}

#[test]
fn evaluate_writes_metrics_and_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let classes = vec!["normal".to_string(), "tumor".to_string()];
    let rows = [
        ("a", "train", "tumor", 0.8),
        ("b", "train", "normal", 0.3),
        ("c", "val", "tumor", 0.6),
        ("d", "test", "normal", 0.4),
    ];
    let batches: Vec<(usize, RecordBatch)> = rows
        .iter()
        .enumerate()
        .map(|(i, (id, split, label, p))| {
            let pred =
                Prediction::from_probs(id, split, label, &classes, vec![1.0 - p, *p]).unwrap();
            (i, to_batch(&[pred]).unwrap())
        })
        .collect();
    let harness = Harness::new(slides(), dir.path()).input(predictions_schema(), batches);
    let out = harness.run(EvaluateParams::default()).unwrap();
    assert_ok(&out);
    assert_eq!(out.batches.len(), 4, "predictions pass through");
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(harness.out_dir.join("metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(metrics["split"], "test");
    assert_eq!(metrics["n"], 1);
    assert_eq!(metrics["classes"], serde_json::json!(["normal", "tumor"]));
    // One test slide of one class: no AUC, skipped class reported.
    assert!(metrics["auc"].is_null());
    assert_eq!(
        metrics["auc_skipped_classes"],
        serde_json::json!(["normal", "tumor"])
    );
    assert_eq!(metrics["train"]["balanced_accuracy"], 1.0);
    assert_eq!(metrics["val"]["n"], 1);
    let parquet = std::fs::File::open(harness.out_dir.join("predictions.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(parquet)
        .unwrap()
        .build()
        .unwrap();
    let n: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(n, 4);
}

#[test]
fn sample_reports_a_slide_without_label() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = slides();
    let mut unlabeled = (*s[1]).clone();
    unlabeled.label = None;
    s[1] = Arc::new(unlabeled);
    let (schema, batches) = dataset_input();
    let out = Harness::new(s, dir.path())
        .input(schema, batches)
        .run(SampleParams {
            epochs: 1,
            ..Default::default()
        })
        .unwrap();
    let report = out.report.unwrap();
    let errors: Vec<String> = report.errors.iter().map(|e| e.message.clone()).collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("`b`") && e.contains("label")),
        "{errors:?}"
    );
    // The other slides still train.
    assert!(out.ended.contains(&"a".to_string()) && !out.ended.contains(&"b".to_string()));
}
