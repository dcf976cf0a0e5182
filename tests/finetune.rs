//! End-to-end training (`train.finetune_embedder: true`): the example experiment runs from
//! tile pixels to metrics with a ResNet-18 trained jointly with the sparse CNN, its checkpoint
//! holds the embedder; impossible configurations are refused by `tessera validate`.

mod common;

use common::{cmu1, count, run, validate, write_dataset, write_yaml};
use std::path::Path;
use tempfile::TempDir;

/// `examples/quickstart/finetune.yaml` pointed at a dataset and cache inside `dir`.
fn example_in(dir: &Path) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart/finetune.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let line = if line.starts_with("cache_dir:") {
            "cache_dir: cache".to_string()
        } else if line.starts_with("out_dir:") {
            continue;
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    let s = cmu1();
    write_dataset(
        dir,
        &[
            ("s1", &s, "tumor", "train"),
            ("s2", &s, "normal", "train"),
            ("s3", &s, "tumor", "val"),
            ("s4", &s, "normal", "test"),
        ],
    );
    out
}

#[test]
fn the_finetune_example_trains_the_embedder_end_to_end() {
    let dir = TempDir::new().unwrap();
    let exp = write_yaml(dir.path(), "finetune.yaml", &example_in(dir.path()));
    let out = dir.path().join("out");
    let (r, report) = run(&exp, &out, &[]);
    let report = report.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok(), "{r:?}");
    assert_eq!(report["status"], "ok", "{report:#}");
    assert!(count(&report, "tiles", "rows_out") >= 8, "{report:#}");
    assert_eq!(count(&report, "evaluate", "rows_in"), 2, "{report:#}");
    assert_eq!(
        count(&report, "train", "rows_in"),
        2 * 4 * 4,
        "2 epochs x 4 slides x K=4"
    );

    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_log.json")).unwrap())
            .unwrap();
    let epochs = log["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2, "{log:#}");
    for e in epochs {
        assert!(
            e["train_loss"].as_f64().is_some_and(f64::is_finite),
            "{log:#}"
        );
    }

    let weights = std::fs::read(out.join("checkpoints/last.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
    for name in [
        "embedder.conv1.weight",
        "embedder.bn1.running_mean",
        "embedder.layer4.1.conv2.weight",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/last.json")).unwrap())
            .unwrap();
    assert_eq!(meta["embedder"]["arch"], "resnet18", "{meta:#}");

    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["split"], "test", "{metrics:#}");
    assert!(metrics["cross_entropy"]
        .as_f64()
        .is_some_and(f64::is_finite));

    // Pixels are never cached: a second run replays the cached tiles and re-reads their
    // pixels for training, with the same result (everything is seeded).
    let (r, again) = run(&exp, &dir.path().join("again"), &[]);
    let again = again.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok(), "{r:?}");
    assert_eq!(count(&again, "tiles", "cache_hits"), 4, "{again:#}");
    assert_eq!(count(&again, "train", "rows_in"), 2 * 4 * 4, "{again:#}");
    let metrics_again: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("again/metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(metrics_again["cross_entropy"], metrics["cross_entropy"]);
}

/// Validates `stages` (YAML under `stages:`) over a one-slide dataset.
fn check(stages: &str) -> common::Ran {
    let dir = TempDir::new().unwrap();
    write_dataset(dir.path(), &[("cmu", &cmu1(), "tumor", "train")]);
    let yaml = format!("name: e2e\ndataset: dataset.csv\nstages:\n{stages}");
    validate(&write_yaml(dir.path(), "exp.yaml", &yaml))
}

const TILES: &str = "
  tile: {kind: tile, params: {tile_size: 32, mpp: 4.0}}
";

const EMBEDDED: &str = "
  tile: {kind: tile, params: {tile_size: 32, mpp: 4.0}}
  embed: {kind: embed, inputs: [tile], params: {weights: random, input_size: 32}}
";

fn chain(source: &str, map: &str, train: &str) -> String {
    format!(
        "{source}  sample: {{kind: sample, inputs: [{source_name}]}}
  map: {{kind: sparse_map, inputs: [sample], params: {map}}}
  augment: {{kind: augment, inputs: [map]}}
  train: {{kind: train, inputs: [augment], params: {train}}}
",
        source_name = if source.contains("embed:") {
            "embed"
        } else {
            "tile"
        }
    )
}

const FINETUNE: &str = "{finetune_embedder: true, embedder_weights: random}";

#[test]
fn the_pixel_chain_validates() {
    let r = check(&chain(TILES, "{collision: first}", FINETUNE));
    assert!(r.ok(), "{r:?}");
}

#[test]
fn finetuning_on_embeddings_is_refused() {
    let r = check(&chain(EMBEDDED, "{}", FINETUNE));
    assert!(!r.ok(), "{r:?}");
    assert!(r.stderr.contains("needs tile pixels"), "{r:?}");
}

#[test]
fn pixels_without_finetuning_are_refused() {
    let r = check(&chain(TILES, "{collision: first}", "{}"));
    assert!(!r.ok(), "{r:?}");
    assert!(
        r.stderr.contains("tile pixels, not embeddings")
            && r.stderr.contains("finetune_embedder: true"),
        "{r:?}"
    );
}

#[test]
fn pixels_cannot_be_averaged_on_collisions() {
    let r = check(&chain(TILES, "{}", FINETUNE));
    assert!(!r.ok(), "{r:?}");
    assert!(
        r.stderr.contains("collision `mean`") && r.stderr.contains("collision: first"),
        "{r:?}"
    );
}

#[test]
fn finetuning_needs_embedder_weights_and_a_resnet() {
    let r = check(&chain(
        TILES,
        "{collision: first}",
        "{finetune_embedder: true}",
    ));
    assert!(!r.ok() && r.stderr.contains("embedder_weights"), "{r:?}");
    let r = check(&chain(
        TILES,
        "{collision: first}",
        "{finetune_embedder: true, embedder_weights: random, embedder: vit_s14}",
    ));
    assert!(!r.ok() && r.stderr.contains("resnet18"), "{r:?}");
}
