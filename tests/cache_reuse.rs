//! The cache does what ablations need: a re-run reads every cached stage and opens no slide;
//! changing a parameter downstream of the cached stages (the sparse map's downsampling factor)
//! re-uses every upstream entry and recomputes nothing upstream.

mod common;

use common::{cmu1, count, run, tile_embed_stages, write_dataset, write_yaml};
use tempfile::TempDir;

/// Tiling and embedding of the real slide.
fn quickstart() -> String {
    format!(
        "name: quickstart\ndataset: dataset.csv\ncache_dir: cache\n{}",
        tile_embed_stages(224, 2.0, 0.1)
    )
}

/// Stages after the quickstart: sampling, sparse map, augmentation, training, evaluation.
const DOWNSTREAM: &str = "
  sample:
    kind: sample
    inputs: [embed]
    params: {tiles_per_slide: 0}
  sparse_map:
    kind: sparse_map
    inputs: [sample]
    params: {downsample: 1}
  augment:
    kind: augment
    inputs: [sparse_map]
  train:
    kind: train
    inputs: [augment]
    params: {epochs: 2, batch_size: 2}
  evaluate:
    kind: evaluate
    inputs: [train]
";

/// The quickstart followed by the whole SparseConvMIL chain.
fn full_pipeline() -> String {
    format!("{}{DOWNSTREAM}", quickstart())
}

/// The real slide listed four times, as four slides with their own ids, labels and splits.
fn four_slides(dir: &std::path::Path) {
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
}

#[test]
fn second_run_reads_everything_from_the_cache_and_opens_no_slide() {
    let dir = TempDir::new().unwrap();
    four_slides(dir.path());
    let exp = write_yaml(dir.path(), "quickstart.yaml", &quickstart());

    let (r, first) = run(&exp, &dir.path().join("run1"), &[]);
    let first = first.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok(), "{r:?}");
    assert_eq!(first["status"], "ok");
    for s in ["tile", "embed"] {
        assert_eq!(count(&first, s, "cache_misses"), 4, "{first:#}");
        assert_eq!(count(&first, s, "cache_hits"), 0, "{first:#}");
    }
    let tiles = count(&first, "tile", "rows_out");
    assert!(tiles >= 4, "{first:#}");
    assert_eq!(count(&first, "embed", "rows_out"), tiles);

    let (r, second) = run(&exp, &dir.path().join("run2"), &[]);
    let second = second.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok(), "{r:?}");
    assert_eq!(second["status"], "ok");
    assert_eq!(count(&second, "embed", "cache_hits"), 4, "{second:#}");
    assert_eq!(
        count(&second, "embed", "rows_out"),
        tiles,
        "the cached embeddings are complete"
    );
    for s in ["tile", "embed"] {
        assert_eq!(count(&second, s, "cache_misses"), 0, "{second:#}");
    }
    // embeddings are cached, so the tile stage is not even asked to replay: no slide is read
    assert_eq!(count(&second, "tile", "skipped"), 4, "{second:#}");
    assert_eq!(count(&second, "tile", "items_in"), 0, "{second:#}");
}

#[test]
fn changing_the_downsampling_factor_reuses_every_upstream_entry() {
    let dir = TempDir::new().unwrap();
    four_slides(dir.path());
    let exp = write_yaml(dir.path(), "full.yaml", &full_pipeline());

    let (r, first) = run(&exp, &dir.path().join("d1"), &[]);
    let first = first.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok() && first["status"] == "ok", "{r:?}");
    assert_eq!(count(&first, "embed", "cache_misses"), 4);
    assert!(dir.path().join("d1/metrics.json").exists());

    let (r, second) = run(&exp, &dir.path().join("d2"), &["sparse_map.downsample=2"]);
    let second = second.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok() && second["status"] == "ok", "{r:?}");
    assert_eq!(count(&second, "embed", "cache_hits"), 4, "{second:#}");
    assert_eq!(count(&second, "embed", "cache_misses"), 0, "{second:#}");
    assert_eq!(count(&second, "tile", "cache_misses"), 0, "{second:#}");
    assert_eq!(count(&second, "tile", "skipped"), 4, "{second:#}");
    // the change did take effect downstream: fewer, coarser cells
    assert!(
        count(&second, "sparse_map", "rows_out") < count(&first, "sparse_map", "rows_out"),
        "downsample 2 merges neighbouring tiles: {first:#} {second:#}"
    );
    assert!(dir.path().join("d2/metrics.json").exists());
    let resolved = std::fs::read_to_string(dir.path().join("d2/experiment.yaml")).unwrap();
    assert!(resolved.contains("downsample: 2"), "{resolved}");
}

#[test]
fn thread_counts_batch_sizes_and_the_reader_do_not_invalidate_the_cache() {
    let dir = TempDir::new().unwrap();
    four_slides(dir.path());
    let exp = write_yaml(dir.path(), "full.yaml", &full_pipeline());
    let (r, first) = run(&exp, &dir.path().join("a"), &[]);
    let first = first.unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(count(&first, "embed", "cache_misses"), 4, "{first:#}");

    let how = [
        "tile.read_threads=2",
        "tile.reader=openslide",
        "tile.batch_size=3",
        "embed.batch_size=5",
    ];
    let (r, second) = run(&exp, &dir.path().join("b"), &how);
    let second = second.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok() && second["status"] == "ok", "{r:?}");
    assert_eq!(count(&second, "embed", "cache_misses"), 0, "{second:#}");
    assert_eq!(count(&second, "tile", "cache_misses"), 0, "{second:#}");

    // Which tiles are kept does count: another tissue threshold is computed afresh.
    let (r, third) = run(&exp, &dir.path().join("c"), &["tile.min_tissue=0.2"]);
    let third = third.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok(), "{r:?}");
    assert_eq!(count(&third, "tile", "cache_misses"), 4, "{third:#}");
}
