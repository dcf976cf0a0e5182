//! Writes the data sets of the defaults study (`tessera_mil::train::tasks`) as experiments a
//! user runs with the `tessera` binary and **train's defaults only**: for each task a folder
//! `DIR/<task>/` with `dataset.csv`, `features.parquet` and `experiment.yaml` (a sweep of the
//! nine pooling models x 3 seeds). `scripts/defaults-study.sh` runs them all.
//! Run: `cargo run --release -p tessera-mil --example make_study -- DIR [TASK ...]`

use std::path::PathBuf;

use tessera_mil::train::tasks::{generate, Task, N_BAGS};

/// The experiment of one task: nothing about training is set, so every model runs on the
/// defaults. Augmentation keeps neighbourhoods (flips, transposes, 90° turns, shifts), as in
/// examples/spatial: the default's arbitrary rotations and scaling would break the grid
/// arrangement the spatial tasks are about.
fn experiment(task: Task) -> String {
    format!(
        r#"# Defaults study, task `{name}` (written by `make_study`; see docs/defaults-study.md).
# Every model on train's defaults: no lr, epochs or schedule set here.
name: study-{name}
seed: 0
cache_dir: cache
out_dir: runs
dataset: dataset.csv
stages:
  features:
    kind: features
    params:
      path: features.parquet
  sample:
    kind: sample
    inputs: [features]
    params:
      tiles_per_slide: 0        # every instance
  sparse_map:
    kind: sparse_map
    inputs: [sample]
    params:
      downsample: 1             # one cell per tile position
  augment:
    kind: augment
    inputs: [sparse_map]
    params:
      translate_probability: 1.0
      max_translation: 4
      flip_probability: 0.5
      transpose_probability: 0.5
      rot90_probability: 0.5
      rotate_probability: 0.0
      scale_probability: 0.0
  train:
    kind: train
    inputs: [augment]
  evaluate:
    kind: evaluate
    inputs: [train]
sweep:
  train.pooling: [sparseconvmil, instance_max, instance_mean, instance_lse, max, mean, lse, attention, gated_attention]
seeds: [0, 1, 2]
"#,
        name = task.name()
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: make_study DIR [TASK ...]");
        std::process::exit(2);
    };
    let names: Vec<String> = args.collect();
    let tasks: Vec<Task> = if names.is_empty() {
        Task::ALL.to_vec()
    } else {
        let mut tasks = Vec::new();
        for n in &names {
            match Task::parse(n) {
                Some(t) => tasks.push(t),
                None => {
                    eprintln!(
                        "error: unknown task `{n}`; tasks: {}",
                        Task::ALL.map(|t| t.name()).join(", ")
                    );
                    std::process::exit(2);
                }
            }
        }
        tasks
    };
    for task in tasks {
        let out = dir.join(task.name());
        let written = generate(task, N_BAGS, 2026).and_then(|data| data.write(&out));
        if let Err(e) = written {
            eprintln!("error: {}: {e}", task.name());
            std::process::exit(1);
        }
        let yaml = out.join("experiment.yaml");
        if let Err(e) = std::fs::write(&yaml, experiment(task)) {
            eprintln!("error: writing {}: {e}", yaml.display());
            std::process::exit(1);
        }
        println!("wrote {}", out.display());
    }
}
