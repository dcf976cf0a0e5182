//! What the fair-comparison settings of `train` tell a user through the binary: a run that
//! cannot learn (every embedding the same) ends with the collapse in its closing line and as
//! an alert in run.json, the constant dimensions are named by `standardize`, run.json carries
//! the model's parameter counts, and an encoder layer of width 0 is refused before any work.

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use common::{run, stage, validate, write_yaml};
use tempfile::TempDir;

const DIM: usize = 4;
const SLIDES: usize = 24;

/// `dataset.csv` and `features.parquet` of `SLIDES` slides of 9 tiles whose embeddings are
/// all equal: nothing to learn from.
fn constant_features(dir: &Path) {
    let mut csv = String::from("slide_id,label\n");
    let (mut ids, mut xs, mut ys) = (Vec::new(), Vec::new(), Vec::new());
    for s in 0..SLIDES {
        let id = format!("blank_{s:02}");
        csv.push_str(&format!("{id},{}\n", if s % 2 == 0 { "a" } else { "b" }));
        for k in 0..9i64 {
            ids.push(id.clone());
            xs.push((k % 3) * 256);
            ys.push((k / 3) * 256);
        }
    }
    std::fs::write(dir.join("dataset.csv"), csv).unwrap();
    let n = ids.len();
    let values = Float32Array::from(vec![0.5f32; n * DIM]);
    let item = Arc::new(arrow::datatypes::Field::new(
        "item",
        arrow::datatypes::DataType::Float32,
        true,
    ));
    let embedding = FixedSizeListArray::new(item, DIM as i32, Arc::new(values), None);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids)),
        Arc::new(Int64Array::from(xs)),
        Arc::new(Int64Array::from(ys)),
        Arc::new(Int64Array::from(vec![256i64; n])),
        Arc::new(embedding),
    ];
    let schema = tessera_pipeline::schema::embeddings_schema(DIM, false);
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let file = std::fs::File::create(dir.join("features.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn experiment(train_params: &str) -> String {
    format!(
        r#"name: blank
seed: 3
cache_dir: cache
dataset: dataset.csv
stages:
  features: {{kind: features, params: {{path: features.parquet}}}}
  sample: {{kind: sample, inputs: [features], params: {{tiles_per_slide: 0}}}}
  map: {{kind: sparse_map, inputs: [sample], params: {{downsample: 1}}}}
  train: {{kind: train, inputs: [map], params: {train_params}}}
  evaluate: {{kind: evaluate, inputs: [train]}}
"#
    )
}

#[test]
fn a_run_that_cannot_learn_says_so_in_its_closing_line_and_run_json() {
    let dir = TempDir::new().unwrap();
    constant_features(dir.path());
    let exp = write_yaml(dir.path(), "blank.yaml", &experiment("{epochs: 6}"));
    let out = dir.path().join("out");
    let (ran, report) = run(&exp, &out, &[]);
    assert!(ran.ok(), "a collapsed run still finishes: {ran:?}");
    let closing = ran.stdout.lines().last().unwrap_or_default();
    assert!(
        closing.starts_with("Ok, but stage `train`: training collapsed"),
        "{closing}"
    );
    assert!(ran
        .stderr
        .contains("warning: stage `train`: training collapsed"));
    let report = report.unwrap();
    let train = stage(&report, "train");
    let warnings = train["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w["alert"] == true && w["message"].as_str().unwrap().contains("collapsed")),
        "{train:#}"
    );
    assert!(
        warnings.iter().any(|w| {
            let m = w["message"].as_str().unwrap();
            m.starts_with("standardize: 4 of 4 embedding dimensions are constant")
        }),
        "{train:#}"
    );
    // Parameter counts of the default model (encoder 4->128, two 3x3 convs 128->32->32,
    // head 32->32->2) by hand.
    let p = &train["details"]["parameters"];
    let lin = |i: u64, o: u64| i * o + o;
    let encoder = lin(4, 128);
    let pooling = 9 * 128 * 32 + 32 + 9 * 32 * 32 + 32;
    let head = lin(32, 32) + lin(32, 2);
    assert_eq!(p["encoder"], encoder, "{p}");
    assert_eq!(p["pooling"], pooling, "{p}");
    assert_eq!(p["head"], head, "{p}");
    assert_eq!(p["total"], encoder + pooling + head, "{p}");
    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_log.json")).unwrap())
            .unwrap();
    assert_eq!(log["parameters"], *p);
    assert!(log["collapse"]["constant_loss"].as_f64().unwrap() > 0.6);
    // The results are still written: nothing computed is lost.
    assert!(out.join("metrics.json").is_file());
}

#[test]
fn an_encoder_layer_of_width_zero_is_refused_by_name() {
    let dir = TempDir::new().unwrap();
    constant_features(dir.path());
    let exp = write_yaml(
        dir.path(),
        "zero.yaml",
        &experiment("{instance_encoder: [64, 0]}"),
    );
    let v = validate(&exp);
    assert!(!v.ok(), "{v:?}");
    let text = format!("{}{}", v.stdout, v.stderr);
    assert!(
        text.contains("instance_encoder") && text.contains("layer 1 has width 0"),
        "{text}"
    );
    assert!(text.contains("train"), "{text}");
}
