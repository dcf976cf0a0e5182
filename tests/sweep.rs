//! Sweeps reuse every cached embedding: `examples/quickstart/sweep.yaml` (the real slide, a
//! small random embedder, 2 downsampling factors x 2 tile counts) tiles and embeds every slide
//! in its first point only — every later point has zero tile/embed cache misses — whether the
//! points run one after the other or side by side (`--jobs 2`). Each point gets its own folder
//! with run.json and metrics.json; the results table has one row per point.

mod common;

use common::{tessera, tessera_with, write_yaml, Ran};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart/sweep.yaml")
}

/// `tessera run examples/quickstart/sweep.yaml` with its own cache and output folder.
fn run_sweep(dir: &Path, jobs: &str) -> (Ran, PathBuf) {
    let out = dir.join("out");
    let o = tessera()
        .env("TESSERA_CACHE_DIR", dir.join("cache"))
        .arg("run")
        .arg(example())
        .arg("--out")
        .arg(&out)
        .arg("--quiet")
        .arg("--jobs")
        .arg(jobs)
        .output()
        .unwrap();
    let ran = Ran {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    (ran, out)
}

fn misses(point: &serde_json::Value, stage: &str) -> u64 {
    point["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == stage))
        .and_then(|s| s["cache_misses"].as_u64())
        .unwrap_or_else(|| panic!("no `{stage}` in {point:#}"))
}

fn check_sweep(jobs: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let (ran, out) = run_sweep(dir.path(), jobs);
    assert!(ran.ok(), "{ran:?}");
    let sweep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    let points = sweep["points"].as_array().unwrap();
    let names: Vec<&str> = points.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "downsample=1__tiles_per_slide=4",
            "downsample=1__tiles_per_slide=8",
            "downsample=2__tiles_per_slide=4",
            "downsample=2__tiles_per_slide=8",
        ]
    );
    for (i, p) in points.iter().enumerate() {
        assert_eq!(p["status"], "ok", "{p:#}");
        for stage in ["tiles", "embed"] {
            let m = misses(p, stage);
            if i == 0 {
                assert_eq!(m, 8, "the first point tiles and embeds all 8 slides: {p:#}");
            } else {
                assert_eq!(m, 0, "point {i} recomputed `{stage}`: {sweep:#}");
            }
        }
        let run_dir = out.join(p["name"].as_str().unwrap());
        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap())
                .unwrap();
        assert_eq!(run["status"], "ok");
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run_dir.join("metrics.json")).unwrap())
                .unwrap();
        assert!(metrics["balanced_accuracy"].is_number(), "{metrics:#}");
        // the point's values really reached its stages
        let resolved = std::fs::read_to_string(run_dir.join("experiment.yaml")).unwrap();
        let d = p["params"]["sparse_map.downsample"].as_i64().unwrap();
        assert!(resolved.contains(&format!("downsample: {d}")), "{resolved}");
        assert!(!resolved.contains("sweep:"), "{resolved}");
    }
    // later points replay the cached embeddings
    let embed = sweep["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "embed")
        .unwrap();
    assert_eq!(embed["points_with_misses"], serde_json::json!([names[0]]));
    assert_eq!(embed["cache_hits"], 24, "{embed:#}");

    // the results table: one row per point, printed and written
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    let rows: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 2 |"))
        .collect();
    assert_eq!(rows.len(), 4, "{md}");
    assert!(
        ran.stdout
            .contains("| sparse_map.downsample | sample.tiles_per_slide | n |"),
        "{ran:?}"
    );
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(out.join("results.parquet")).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let n: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(n, 4);
    (dir, out)
}

#[test]
fn sweep_tiles_and_embeds_only_in_its_first_point() {
    let (_dir, out) = check_sweep("1");
    // and `tessera report` draws Figure 2a/2b, ROC and confusion matrix, skipping the bars
    let r = tessera_with(&["report", out.to_str().unwrap()]);
    assert!(r.ok(), "{r:?}");
    for stem in [
        "balanced_accuracy_vs_downsample",
        "auc_vs_tiles_per_slide",
        "roc",
        "confusion_matrix",
    ] {
        for ext in ["png", "svg"] {
            let f = out.join("figures").join(format!("{stem}.{ext}"));
            assert!(f.is_file(), "{} missing: {r:?}", f.display());
        }
    }
    assert!(
        r.stdout.contains(
            "skipped: per-model comparison bars: the sweep does not vary `train.pooling`"
        ),
        "{r:?}"
    );
}

#[test]
fn parallel_points_never_compute_an_entry_twice() {
    check_sweep("2");
}

#[test]
fn bad_sweep_values_are_reported_before_anything_runs() {
    let dir = TempDir::new().unwrap();
    let dataset = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart/dataset.csv");
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace(
            "dataset: dataset.csv",
            &format!("dataset: {}", dataset.display()),
        )
        .replace(
            "sample.tiles_per_slide: [4, 8]",
            "sample.tiles_per_slide: [4, many]\n  train.pooling: [sparseconvmil, maxx]",
        );
    let file = write_yaml(dir.path(), "bad.yaml", &text);
    let r = tessera_with(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(2), "{r:?}");
    let line_of = |key: &str| {
        text.lines()
            .position(|l| l.trim_start().starts_with(key))
            .unwrap()
            + 1
    };
    assert!(
        r.stderr.contains(&format!(
            "bad.yaml:{}: stage `sample`: sweep `sample.tiles_per_slide` = many",
            line_of("sample.tiles_per_slide")
        )),
        "{r:?}"
    );
    assert!(
        r.stderr.contains(&format!(
            "bad.yaml:{}: stage `train`: sweep `train.pooling` = maxx",
            line_of("train.pooling")
        )),
        "{r:?}"
    );
    assert!(!dir.path().join("out").exists(), "nothing ran");
}
