//! A run killed with SIGKILL in the middle of a cached run loses nothing it finished and leaves
//! nothing half-written under a real cache name: the re-run completes, recomputing exactly the
//! slides that were not finished.

mod common;

use common::{cmu1, count, run, tessera, tessera_with, write_dataset, write_yaml};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tempfile::TempDir;

const SLIDES: u64 = 8;

/// Complete entries (`KEY.parquet`) and temporary files of one stage kind in the cache.
fn entries(cache: &Path, kind: &str) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut complete, mut temporary) = (Vec::new(), Vec::new());
    let Ok(shards) = std::fs::read_dir(cache.join(kind)) else {
        return (complete, temporary);
    };
    for shard in shards.flatten() {
        for f in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.ends_with(".claim") {
                continue; // a run at work (checked gone at the end)
            }
            if name.ends_with(".tmp") {
                temporary.push(f.path());
            } else {
                assert!(
                    name.ends_with(".parquet") && !name.starts_with('.'),
                    "unexpected file in the cache: {}",
                    f.path().display()
                );
                complete.push(f.path());
            }
        }
    }
    (complete, temporary)
}

/// Every complete entry reads whole and carries its own key in its metadata.
fn assert_readable(paths: &[PathBuf]) {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    for p in paths {
        let builder = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let key = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| {
                kv.iter()
                    .find(|e| e.key == "tessera.key")
                    .and_then(|e| e.value.clone())
            });
        let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
        assert_eq!(key.as_deref(), Some(stem.as_str()), "{}", p.display());
        for batch in builder.build().unwrap() {
            batch.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
}

#[test]
fn sigkill_mid_run_then_rerun_completes_and_recomputes_only_unfinished_slides() {
    let dir = TempDir::new().unwrap();
    let s = cmu1();
    let ids: Vec<String> = (0..SLIDES).map(|i| format!("slide{i}")).collect();
    let rows: Vec<(&str, &Path, &str, &str)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                id.as_str(),
                s.as_path(),
                if i % 2 == 0 { "a" } else { "b" },
                "train",
            )
        })
        .collect();
    write_dataset(dir.path(), &rows);
    let exp = write_yaml(
        dir.path(),
        "exp.yaml",
        "\
name: killed
dataset: dataset.csv
cache_dir: cache
stages:
  tile:
    kind: tile
    cache: true
    params: {tile_size: 224, mpp: 1.0, min_tissue: 0.1, thumbnails: false}
  embed:
    kind: embed
    inputs: [tile]
    cache: true
    params: {arch: resnet18, weights: random, input_size: 64}
",
    );
    let cache = dir.path().join("cache");

    // Start a run; SIGKILL it as soon as the first slide's embeddings are complete.
    let mut child = tessera()
        .arg("run")
        .arg(&exp)
        .arg("--out")
        .arg(dir.path().join("killed"))
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while entries(&cache, "embed").0.is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before any entry was written"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no cache entry after 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        still_running,
        "the run finished before it could be killed: make it longer"
    );

    let (tiles_before, _) = entries(&cache, "tile");
    let (embeds_before, _) = entries(&cache, "embed");
    assert_readable(&tiles_before);
    assert_readable(&embeds_before);
    let (tiles_done, embeds_done) = (tiles_before.len() as u64, embeds_before.len() as u64);
    assert!(
        (1..SLIDES).contains(&embeds_done),
        "killed mid-run: {embeds_done} of {SLIDES} slides embedded"
    );
    assert!(tiles_done >= embeds_done);

    // Re-run: completes; recomputes only the slides not finished before the kill.
    let (r, report) = run(&exp, &dir.path().join("rerun"), &[]);
    let report = report.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok(), "{r:?}");
    assert_eq!(report["status"], "ok");
    assert!(
        report["errors"].as_array().unwrap().is_empty(),
        "{report:#}"
    );
    assert_eq!(
        count(&report, "embed", "cache_hits"),
        embeds_done,
        "{report:#}"
    );
    assert_eq!(
        count(&report, "embed", "cache_misses"),
        SLIDES - embeds_done,
        "{report:#}"
    );
    assert_eq!(
        count(&report, "tile", "cache_misses"),
        SLIDES - tiles_done,
        "{report:#}"
    );
    assert_eq!(
        count(&report, "tile", "cache_hits"),
        tiles_done - embeds_done,
        "{report:#}"
    );
    assert_eq!(count(&report, "tile", "skipped"), embeds_done, "{report:#}");

    // Every entry now exists and reads; `tessera cache ls` agrees.
    let (tiles, _) = entries(&cache, "tile");
    let (embeds, _) = entries(&cache, "embed");
    assert_eq!((tiles.len() as u64, embeds.len() as u64), (SLIDES, SLIDES));
    assert_readable(&tiles);
    assert_readable(&embeds);
    let ls = tessera_with(&["cache", "ls", cache.to_str().unwrap()]);
    assert!(ls.ok(), "{ls:?}");
    for kind in ["tile", "embed"] {
        let line = ls
            .stdout
            .lines()
            .find(|l| l.starts_with(kind))
            .unwrap_or_else(|| panic!("{ls:?}"));
        let n: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(n, SLIDES, "{ls:?}");
    }

    // The killed run's claims were taken over and released by the re-run.
    let claims: Vec<_> = ["tile", "embed"]
        .iter()
        .flat_map(|k| std::fs::read_dir(cache.join(k)).unwrap().flatten())
        .flat_map(|shard| std::fs::read_dir(shard.path()).unwrap().flatten())
        .filter(|f| f.file_name().to_string_lossy().ends_with(".claim"))
        .map(|f| f.path())
        .collect();
    assert!(claims.is_empty(), "{claims:?}");

    // Whatever the kill left as temporary files, `cache gc` removes, and nothing else.
    let gc = tessera_with(&["cache", "gc", cache.to_str().unwrap()]);
    assert!(gc.ok(), "{gc:?}");
    for kind in ["tile", "embed"] {
        let (complete, temporary) = entries(&cache, kind);
        assert!(temporary.is_empty(), "{temporary:?}");
        assert_eq!(complete.len() as u64, SLIDES);
    }
}
