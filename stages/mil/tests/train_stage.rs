//! The `train` stage through the engine's test harness: predictions, slide ends, checkpoints,
//! train_log.json, resume.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use tessera_mil::columns::embeddings_array;
use tessera_mil::models::Pooling;
use tessera_mil::predictions::from_batch;
use tessera_mil::train::record::TrainLog;
use tessera_mil::train::synthetic::{spatial_slides, SpatialConfig, SyntheticSlide};
use tessera_mil::train::TrainParams;
use tessera_pipeline::schema::embedding_type;
use tessera_pipeline::testing::{test_slides, Harness};
use tessera_pipeline::SlideHandle;

const DIM: usize = 4;

/// What `augment` emits: `slide_id, embedding, split, label, map_i, map_j`.
fn bag_batch(s: &SyntheticSlide) -> RecordBatch {
    let n = s.cells.len();
    let cols: Vec<(&str, ArrayRef)> = vec![
        (
            "slide_id",
            Arc::new(StringArray::from(vec![s.row.slide_id.as_str(); n])),
        ),
        (
            "embedding",
            embeddings_array(&s.embeddings, &embedding_type(DIM, false)).unwrap(),
        ),
        (
            "split",
            Arc::new(StringArray::from(vec![s.row.split.as_str(); n])),
        ),
        (
            "label",
            Arc::new(StringArray::from(vec![s.row.label.as_str(); n])),
        ),
        (
            "map_i",
            Arc::new(Int64Array::from(
                s.cells.iter().map(|c| c[0]).collect::<Vec<_>>(),
            )),
        ),
        (
            "map_j",
            Arc::new(Int64Array::from(
                s.cells.iter().map(|c| c[1]).collect::<Vec<_>>(),
            )),
        ),
    ];
    let schema = Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), false))
            .collect::<Vec<_>>(),
    );
    RecordBatch::try_new(Arc::new(schema), cols.into_iter().map(|(_, a)| a).collect()).unwrap()
}

fn harness(dir: &std::path::Path) -> (Harness, Vec<SyntheticSlide>, Vec<SlideHandle>) {
    let synthetic = spatial_slides(&SpatialConfig::new(20, 16, DIM, 2)).unwrap();
    let specs: Vec<(&str, Option<&str>, Option<&str>)> = synthetic
        .iter()
        .map(|s| (s.row.slide_id.as_str(), None, Some(s.row.label.as_str())))
        .collect();
    let slides = test_slides(&specs);
    let batches: Vec<(usize, RecordBatch)> = synthetic
        .iter()
        .enumerate()
        .map(|(i, s)| (i, bag_batch(s)))
        .collect();
    let schema: SchemaRef = batches[0].1.schema();
    (
        Harness::new(slides.clone(), dir).input(schema, batches),
        synthetic,
        slides,
    )
}

fn read_log(path: &std::path::Path) -> TrainLog {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn stage_trains_writes_checkpoints_and_predicts_held_out_slides() {
    let dir = tempfile::tempdir().unwrap();
    let (h, synthetic, slides) = harness(dir.path());
    let out = h
        .run(TrainParams {
            epochs: 3,
            ..TrainParams::default()
        })
        .unwrap();
    assert_eq!(out.ended.len(), slides.len(), "every slide ends once");
    let held_out: Vec<&SyntheticSlide> = synthetic
        .iter()
        .filter(|s| s.row.split.as_str() != "train")
        .collect();
    assert_eq!(out.batches.len(), held_out.len());
    for (id, batch) in &out.batches {
        let p = from_batch(batch).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(&p[0].slide_id, id);
        assert!(p[0].split == "val" || p[0].split == "test");
        assert!((p[0].probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    let ck = h.out_dir.join("checkpoints");
    for f in [
        "last.safetensors",
        "last.json",
        "last.optimizer.safetensors",
        "best.safetensors",
        "best.json",
    ] {
        assert!(ck.join(f).is_file(), "{f} missing");
    }
    let log = read_log(&h.out_dir.join("train_log.json"));
    assert_eq!(log.epochs.len(), 3);
    assert_eq!(log.pooling, "sparseconvmil");
    assert_eq!(log.stopped.as_deref(), Some("epochs"));
    assert!(log
        .epochs
        .iter()
        .all(|e| e.val_loss.is_some() && e.seconds > 0.0));

    // Resume: continue the same run to 5 epochs from its last checkpoint.
    let resumed_dir = tempfile::tempdir().unwrap();
    let (h2, _, _) = harness(resumed_dir.path());
    let params = TrainParams {
        epochs: 5,
        resume: Some(ck.join("last.safetensors")),
        ..TrainParams::default()
    };
    let out2 = h2.run(params).unwrap();
    assert_eq!(out2.batches.len(), held_out.len());
    let log = read_log(&h2.out_dir.join("train_log.json"));
    assert_eq!(log.resumed_at, Some(3));
    assert_eq!(
        log.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        vec![3, 4]
    );
}

#[test]
fn baselines_run_without_map_positions() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _, _) = harness(dir.path());
    let out = h
        .run(TrainParams {
            epochs: 1,
            pooling: Pooling::GatedAttention,
            ..TrainParams::default()
        })
        .unwrap();
    assert!(!out.batches.is_empty());
}

#[test]
fn bags_spilled_past_the_memory_budget_train_and_predict_identically() {
    let run = |bag_memory_mb: usize| {
        let dir = tempfile::tempdir().unwrap();
        let (h, _, _) = harness(dir.path());
        let out = h
            .run(TrainParams {
                epochs: 3,
                bag_memory_mb,
                ..TrainParams::default()
            })
            .unwrap();
        let predictions: Vec<_> = out
            .batches
            .iter()
            .map(|(id, b)| (id.clone(), from_batch(b).unwrap()[0].probs.clone()))
            .collect();
        let log = read_log(&h.out_dir.join("train_log.json"));
        let losses: Vec<f64> = log.epochs.iter().map(|e| e.train_loss).collect();
        // The spill file is unlinked as soon as it is created: nothing is left behind.
        let spill = h.out_dir.join(".spill");
        let left = std::fs::read_dir(&spill).map(|d| d.count()).unwrap_or(0);
        (predictions, losses, left, spill.exists())
    };
    let in_memory = run(64);
    let spilled = run(0);
    assert!(!in_memory.3, "within the budget nothing goes to disk");
    assert!(spilled.3, "with a zero budget every bag is spilled");
    assert_eq!(spilled.2, 0);
    assert_eq!(in_memory.0, spilled.0, "predictions");
    assert_eq!(in_memory.1, spilled.1, "training losses");
}
