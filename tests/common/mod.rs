//! Helpers shared by the end-to-end tests: run the `tessera` binary on YAML written into a
//! temporary folder, read back run.json.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub fn tessera() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.env_remove("TESSERA_CACHE_DIR").env("RUST_LOG", "warn");
    c
}

/// A slide of the shared test data (the repo sits beside `shared/`).
pub fn slide(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/slides")
        .join(name);
    p.canonicalize()
        .unwrap_or_else(|e| panic!("test slide {}: {e}", p.display()))
}

/// The real H&E slide.
pub fn cmu1() -> PathBuf {
    slide("CMU-1-Small-Region.svs")
}

/// Writes `dataset.csv` into `dir`: one row per (slide_id, path, label, split).
pub fn write_dataset(dir: &Path, rows: &[(&str, &Path, &str, &str)]) -> PathBuf {
    let mut text = String::from("slide_id,path,label,split\n");
    for (id, path, label, split) in rows {
        text.push_str(&format!("{id},{},{label},{split}\n", path.display()));
    }
    let p = dir.join("dataset.csv");
    std::fs::write(&p, text).unwrap();
    p
}

/// The `stages:` block of a small experiment on real pixels: a cached `tile` stage with the
/// given tiling (no thumbnails) and a cached `embed` stage (seeded random ResNet-18 at 32 px,
/// so a slide embeds in well under a second). Append more stages after it.
pub fn tile_embed_stages(tile_size: u32, mpp: f64, min_tissue: f64) -> String {
    format!(
        "\
stages:
  tile:
    kind: tile
    cache: true
    params: {{tile_size: {tile_size}, mpp: {mpp:?}, min_tissue: {min_tissue:?}, thumbnails: false}}
  embed:
    kind: embed
    inputs: [tile]
    cache: true
    params: {{arch: resnet18, weights: random, input_size: 32}}
"
    )
}

/// Every tile of each slide -> sparse map at d=1 -> two epochs of SparseConvMIL -> evaluation,
/// after [`tile_embed_stages`].
pub const TRAIN_STAGES: &str = "  sample:
    kind: sample
    inputs: [embed]
    params: {tiles_per_slide: 0}
  sparse_map:
    kind: sparse_map
    inputs: [sample]
    params: {downsample: 1}
  train:
    kind: train
    inputs: [sparse_map]
    params: {epochs: 2, batch_size: 2}
  evaluate:
    kind: evaluate
    inputs: [train]
";

/// Under one stage kind's folder of a cache: the complete entries (`*.parquet`), and every
/// other file (claims, temporaries: what a clean run leaves none of).
pub fn cache_files(cache: &Path, kind: &str) -> (usize, Vec<PathBuf>) {
    let (mut complete, mut other) = (0, Vec::new());
    for shard in std::fs::read_dir(cache.join(kind))
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.ends_with(".parquet") && !name.starts_with('.') {
                complete += 1;
            } else {
                other.push(f.path());
            }
        }
    }
    (complete, other)
}

/// Writes an experiment file into `dir`.
pub fn write_yaml(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Output of one `tessera` invocation, as text.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn ran(out: Output) -> Ran {
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `tessera ARGS...`.
pub fn tessera_with(args: &[&str]) -> Ran {
    ran(tessera().args(args).output().unwrap())
}

/// `tessera validate FILE`.
pub fn validate(file: &Path) -> Ran {
    ran(tessera().arg("validate").arg(file).output().unwrap())
}

/// `tessera run FILE --out OUT --quiet [--set ...]`; returns the output and run.json.
pub fn run(file: &Path, out: &Path, sets: &[&str]) -> (Ran, Option<serde_json::Value>) {
    let mut c = tessera();
    c.arg("run").arg(file).arg("--out").arg(out).arg("--quiet");
    for s in sets {
        c.arg("--set").arg(s);
    }
    let r = ran(c.output().unwrap());
    let report = std::fs::read_to_string(out.join("run.json"))
        .ok()
        .map(|t| serde_json::from_str(&t).unwrap());
    (r, report)
}

/// One stage's line of run.json.
pub fn stage<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no stage `{name}` in {report:#}"))
}

/// A counter of a stage's line.
pub fn count(report: &serde_json::Value, stage_name: &str, field: &str) -> u64 {
    stage(report, stage_name)[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{stage_name}.{field} in {report:#}"))
}
