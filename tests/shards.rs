//! `run --shard`: processes sharing one cache split the per-slide work without computing any
//! entry twice, whether their shards overlap or not, and alongside a full run; a later full
//! run then finds every entry cached.

mod common;

use common::{
    cache_files, cmu1, count, tessera, tile_embed_stages, write_dataset, write_yaml, TRAIN_STAGES,
};
use std::path::{Path, PathBuf};
use std::process::Child;
use tempfile::TempDir;

const SLIDES: u64 = 6;

/// Tile, embed, then train and evaluate on the embeddings.
fn experiment() -> String {
    format!(
        "name: shards\ndataset: dataset.csv\ncache_dir: cache\n{}{TRAIN_STAGES}",
        tile_embed_stages(224, 2.0, 0.1)
    )
}

/// The real slide under six ids (the cache key includes the id: six distinct entries each).
fn setup(dir: &Path) -> PathBuf {
    let s = cmu1();
    let ids: Vec<String> = (0..SLIDES).map(|i| format!("s{i}")).collect();
    let splits = ["train", "train", "train", "train", "val", "test"];
    let rows: Vec<(&str, &Path, &str, &str)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                id.as_str(),
                s.as_path(),
                if i % 2 == 0 { "tumor" } else { "normal" },
                splits[i],
            )
        })
        .collect();
    write_dataset(dir, &rows);
    write_yaml(dir, "exp.yaml", &experiment())
}

fn spawn(exp: &Path, out: &Path, shard: Option<&str>) -> Child {
    let mut c = tessera();
    c.arg("run").arg(exp).arg("--out").arg(out).arg("--quiet");
    if let Some(s) = shard {
        c.arg("--shard").arg(s);
    }
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child, out: &Path) -> serde_json::Value {
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(out.join("run.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_one_entry_per_slide(cache: &Path) {
    for kind in ["tile", "embed"] {
        let (complete, other) = cache_files(cache, kind);
        assert_eq!(complete as u64, SLIDES, "{kind} entries");
        assert!(
            other.is_empty(),
            "leftover claim or temporary files: {other:?}"
        );
    }
}

#[test]
fn overlapping_shards_never_compute_an_entry_twice() {
    let dir = TempDir::new().unwrap();
    let exp = setup(dir.path());
    // Two processes that both think they own every slide (0/1), started together.
    let (o1, o2) = (dir.path().join("a"), dir.path().join("b"));
    let (c1, c2) = (spawn(&exp, &o1, Some("0/1")), spawn(&exp, &o2, Some("0/1")));
    let (r1, r2) = (finish(c1, &o1), finish(c2, &o2));
    for r in [&r1, &r2] {
        assert_eq!(r["status"], "ok", "{r:#}");
        assert_eq!(r["shard"]["shard"], "0/1", "{r:#}");
        let not_run: Vec<&str> = r["shard"]["stages_not_run"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(not_run, ["sample", "sparse_map", "train", "evaluate"]);
        assert!(
            r.get("stages").unwrap().as_array().unwrap().len() == 2,
            "{r:#}"
        );
    }
    // Every embedding computed exactly once between the two.
    for stage in ["tile", "embed"] {
        assert_eq!(
            count(&r1, stage, "cache_misses") + count(&r2, stage, "cache_misses"),
            SLIDES,
            "{stage}: {r1:#}\n{r2:#}"
        );
    }
    assert!(
        !o1.join("metrics.json").exists(),
        "a shard run does not train"
    );
    assert_one_entry_per_slide(&dir.path().join("cache"));

    // A later full run reads everything from the cache.
    let out = dir.path().join("full");
    let r = finish(spawn(&exp, &out, None), &out);
    assert_eq!(count(&r, "embed", "cache_misses"), 0, "{r:#}");
    assert_eq!(count(&r, "embed", "cache_hits"), SLIDES, "{r:#}");
    assert!(r.get("shard").is_none(), "{r:#}");
    assert!(out.join("metrics.json").exists());
}

#[test]
fn two_shards_and_a_full_run_together_leave_one_entry_per_slide() {
    let dir = TempDir::new().unwrap();
    let exp = setup(dir.path());
    let outs: Vec<PathBuf> = ["s0", "s1", "full"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    let children = vec![
        spawn(&exp, &outs[0], Some("0/2")),
        spawn(&exp, &outs[1], Some("1/2")),
        spawn(&exp, &outs[2], None),
    ];
    let reports: Vec<serde_json::Value> = children
        .into_iter()
        .zip(&outs)
        .map(|(c, o)| finish(c, o))
        .collect();
    // The shards split the slides between them, by size then id.
    let slides_of = |r: &serde_json::Value| -> Vec<String> {
        r["shard"]["slides"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let (a, b) = (slides_of(&reports[0]), slides_of(&reports[1]));
    assert_eq!(a, ["s0", "s2", "s4"]);
    assert_eq!(b, ["s1", "s3", "s5"]);
    // The full run trained on every slide.
    assert_eq!(reports[2]["status"], "ok", "{:#}", reports[2]);
    // Between the three, every entry was computed exactly once (a full run that waited for
    // the shards counts what it computed before waiting).
    for stage in ["tile", "embed"] {
        let total: u64 = reports
            .iter()
            .map(|r| count(r, stage, "cache_misses"))
            .sum();
        assert_eq!(total, SLIDES, "{stage}: {reports:#?}");
    }
    assert!(outs[2].join("metrics.json").exists());
    assert_one_entry_per_slide(&dir.path().join("cache"));

    let out = dir.path().join("later");
    let r = finish(spawn(&exp, &out, None), &out);
    for stage in ["tile", "embed"] {
        assert_eq!(count(&r, stage, "cache_misses"), 0, "{r:#}");
    }
}

#[test]
fn a_bad_shard_is_refused_with_a_clear_message() {
    let dir = TempDir::new().unwrap();
    let exp = setup(dir.path());
    for (shard, needle) in [
        ("2/2", "out of range for 2 shards"),
        ("1/0", "at least 1"),
        ("1", "expected I/N"),
    ] {
        let o = tessera()
            .arg("run")
            .arg(&exp)
            .arg("--shard")
            .arg(shard)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{shard}: {err}"
        );
    }
}

#[test]
fn slurm_without_submit_writes_both_scripts_and_prints_the_commands() {
    let dir = TempDir::new().unwrap();
    let exp = setup(dir.path());
    let out = dir.path().join("out");
    let r = common::tessera_with(&[
        "slurm",
        exp.to_str().unwrap(),
        "--array",
        "4",
        "--out",
        out.to_str().unwrap(),
        "--gres",
        "gpu:1",
        "--time",
        "01:00:00",
    ]);
    assert!(r.ok(), "{r:?}");
    let array = std::fs::read_to_string(out.join("slurm/shards.sbatch")).unwrap();
    let full = std::fs::read_to_string(out.join("slurm/full.sbatch")).unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_tessera"))
        .canonicalize()
        .unwrap();
    let cache = dir.path().canonicalize().unwrap().join("cache");
    for script in [&array, &full] {
        assert!(
            script.contains(&format!("exec {} run ", binary.display())),
            "{script}"
        );
        assert!(
            script.contains(&format!("export TESSERA_CACHE_DIR={}\n", cache.display())),
            "{script}"
        );
        assert!(script.contains("#SBATCH --gres=gpu:1\n"), "{script}");
    }
    assert!(array.contains("#SBATCH --array=0-3\n"), "{array}");
    assert!(
        array.contains("--shard \"${SLURM_ARRAY_TASK_ID}/4\""),
        "{array}"
    );
    assert!(!full.contains("--shard"), "{full}");
    assert!(out.join("slurm/logs").is_dir());
    assert!(r.stdout.contains("sbatch --parsable"), "{r:?}");
    assert!(r.stdout.contains("--dependency=afterok:"), "{r:?}");

    let bad = common::tessera_with(&["slurm", exp.to_str().unwrap(), "--array", "0"]);
    assert!(
        !bad.ok() && bad.stderr.contains("--array must be at least 1"),
        "{bad:?}"
    );
}
