//! A run killed with SIGKILL in the middle of a cached run loses nothing it finished and leaves
//! nothing half-written under a real cache name: the re-run completes, recomputing exactly the
//! slides that were not finished. Ctrl-C (SIGINT) stops a run cleanly: exit 130, run.json says
//! `cancelled`, no claim or temporary file is left, and a re-run reuses what it finished.

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

/// The claim files under the tile and embed entries (both folders must exist).
fn claims(cache: &Path) -> Vec<PathBuf> {
    ["tile", "embed"]
        .iter()
        .flat_map(|k| std::fs::read_dir(cache.join(k)).unwrap().flatten())
        .flat_map(|shard| std::fs::read_dir(shard.path()).unwrap().flatten())
        .filter(|f| f.file_name().to_string_lossy().ends_with(".claim"))
        .map(|f| f.path())
        .collect()
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

/// An 8-slide tile -> embed experiment with both stages cached, in `dir`.
fn experiment(dir: &Path) -> PathBuf {
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
    write_dataset(dir, &rows);
    write_yaml(
        dir,
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
    )
}

#[test]
fn sigkill_mid_run_then_rerun_completes_and_recomputes_only_unfinished_slides() {
    let dir = TempDir::new().unwrap();
    let exp = experiment(dir.path());
    let cache = dir.path().join("cache");

    // Start a run; SIGKILL it as soon as the first slide's embeddings are complete.
    let mut child = start_and_wait_for_first_entry(&exp, &dir.path().join("killed"), &cache);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

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
    let claims = claims(&cache);
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

/// Starts `tessera run exp --out out --quiet` and waits until the first embedding entry is
/// complete; the run is still going then (asserted), so it is stopped mid-way.
fn start_and_wait_for_first_entry(exp: &Path, out: &Path, cache: &Path) -> std::process::Child {
    let mut child = tessera()
        .arg("run")
        .arg(exp)
        .arg("--out")
        .arg(out)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while entries(cache, "embed").0.is_empty() {
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
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run finished before it could be stopped: make it longer"
    );
    child
}

#[test]
fn ctrl_c_stops_cleanly_and_a_rerun_reuses_what_it_finished() {
    let dir = TempDir::new().unwrap();
    let exp = experiment(dir.path());
    let cache = dir.path().join("cache");
    let out = dir.path().join("interrupted");
    let mut child = start_and_wait_for_first_entry(&exp, &out, &cache);
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let stopping = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if stopping.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("still running 60 s after Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(130), "{status:?}");

    let text = std::fs::read_to_string(out.join("run.json")).expect("run.json after Ctrl-C");
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["status"], "cancelled", "{report:#}");
    // A clean stop: entries written whole, no temporary file, every claim released.
    let mut done = [0u64; 2];
    for (i, kind) in ["tile", "embed"].into_iter().enumerate() {
        let (complete, temporary) = entries(&cache, kind);
        assert!(temporary.is_empty(), "{kind}: {temporary:?}");
        assert_readable(&complete);
        done[i] = complete.len() as u64;
    }
    let claims = claims(&cache);
    assert!(claims.is_empty(), "claims left after Ctrl-C: {claims:?}");
    assert!(
        (1..SLIDES).contains(&done[1]),
        "stopped mid-run: {} of {SLIDES} slides embedded",
        done[1]
    );

    let (r, report) = run(&exp, &dir.path().join("rerun"), &[]);
    let report = report.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok(), "{r:?}");
    assert_eq!(count(&report, "embed", "cache_hits"), done[1], "{report:#}");
    assert_eq!(
        count(&report, "embed", "cache_misses"),
        SLIDES - done[1],
        "{report:#}"
    );
    assert_eq!(entries(&cache, "embed").0.len() as u64, SLIDES);
}
