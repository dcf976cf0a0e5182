//! Broken slides among good ones: under the default `skip` policy the run succeeds, run.json
//! names every broken slide and file, and the good slide is processed; under `fail` the run
//! stops with a non-zero exit.

mod common;

use common::{cmu1, count, run, slide, write_dataset, write_yaml};
use tempfile::TempDir;

fn experiment(dir: &std::path::Path, policy: &str) -> std::path::PathBuf {
    write_dataset(
        dir,
        &[
            ("cmu", &cmu1(), "tumor", "train"),
            ("unopenable", &slide("unopenable.tiff"), "tumor", "train"),
            ("unreadable", &slide("unreadable.svs"), "normal", "train"),
        ],
    );
    let yaml = format!(
        "\
name: broken
dataset: dataset.csv
cache_dir: cache
stages:
  tile:
    kind: tile
    cache: true
    on_error: {policy}
    params: {{tile_size: 224, mpp: 2.0, min_tissue: 0.1, thumbnails: false}}
  embed:
    kind: embed
    inputs: [tile]
    params: {{arch: resnet18, weights: random, input_size: 32}}
"
    );
    write_yaml(dir, "broken.yaml", &yaml)
}

#[test]
fn broken_slides_are_reported_and_skipped() {
    let dir = TempDir::new().unwrap();
    let (r, report) = run(
        &experiment(dir.path(), "skip"),
        &dir.path().join("out"),
        &[],
    );
    let report = report.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok(), "{r:?}");
    assert_eq!(report["status"], "ok");
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{report:#}");
    for (id, file) in [
        ("unopenable", "unopenable.tiff"),
        ("unreadable", "unreadable.svs"),
    ] {
        let e = errors
            .iter()
            .find(|e| e["slide"] == id)
            .unwrap_or_else(|| panic!("no error for {id}: {report:#}"));
        assert_eq!(e["stage"], "tile");
        assert!(e["message"].as_str().unwrap().contains(file), "{e}");
    }
    // and on stderr, for the user watching
    assert!(
        r.stderr.contains("unopenable.tiff") && r.stderr.contains("unreadable.svs"),
        "{r:?}"
    );
    // and the closing line does not read as a clean run
    assert!(r.stdout.contains("Ok with 2 error(s)"), "{r:?}");
    // the good slide went all the way through
    assert_eq!(count(&report, "tile", "items_out"), 1, "{report:#}");
    assert_eq!(count(&report, "embed", "items_out"), 1, "{report:#}");
    assert!(count(&report, "embed", "rows_out") > 0, "{report:#}");
}

#[test]
fn broken_slides_stop_the_run_under_the_fail_policy() {
    let dir = TempDir::new().unwrap();
    let (r, report) = run(
        &experiment(dir.path(), "fail"),
        &dir.path().join("out"),
        &[],
    );
    assert!(!r.ok() && r.code.is_some(), "{r:?}");
    let report = report.unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(report["status"], "failed");
    let errors = report["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e["slide"] == "unopenable" || e["slide"] == "unreadable"),
        "{report:#}"
    );
}
