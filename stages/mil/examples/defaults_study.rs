//! The study that chose `train`'s defaults (docs/defaults-study.md): every pooling model on
//! every data set of `tessera_mil::train::tasks`, trained with the training loop directly
//! (no engine, no files) under one configuration: the defaults, overridden by `--set`.
//! Prints one Markdown row per (task, model) and a summary of the acceptance criteria:
//! spatial tasks (SparseConvMIL >= 0.9 test balanced accuracy, permutation-invariant models
//! <= 0.6) and presence tasks (every embedding-level model within 0.05 of the best).
//!
//! Run: `cargo run --release -p tessera-mil --example defaults_study -- [--set key=value]...
//! [--tasks spatial,presence] [--poolings max,mean] [--seed N] [--bags N]`
//! e.g. `--set lr=0.0003 --set instance_encoder=[]`. `TESSERA_STUDY_EPOCHS=1` prints every
//! epoch's losses to stderr.

use std::time::Instant;

use candle_core::Device;
use serde_json::Value;
use tessera_mil::metrics::ClassificationMetrics;
use tessera_mil::models::{Bag, Pooling, Split, Standardization};
use tessera_mil::train::epochs::{argmax, fit, Trainer};
use tessera_mil::train::tasks::{generate, Task, N_BAGS};
use tessera_mil::train::TrainParams;

/// Parsed command line.
struct Args {
    sets: Vec<(String, Value)>,
    tasks: Vec<Task>,
    poolings: Vec<Pooling>,
    seed: u64,
    bags: usize,
}

fn parse_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sets: Vec::new(),
        tasks: Task::ALL.to_vec(),
        poolings: Pooling::ALL.to_vec(),
        seed: 0,
        bags: N_BAGS,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--set" => {
                let v = value()?;
                let (k, v) = v.split_once('=').ok_or(format!("--set {v}: key=value"))?;
                args.sets.push((k.to_string(), parse_value(v)));
            }
            "--tasks" => {
                args.tasks = value()?
                    .split(',')
                    .map(|t| Task::parse(t).ok_or(format!("unknown task {t}")))
                    .collect::<Result<_, _>>()?
            }
            "--poolings" => {
                args.poolings = value()?
                    .split(',')
                    .map(|p| {
                        serde_json::from_value(Value::String(p.into()))
                            .map_err(|_| format!("unknown pooling {p}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--bags" => args.bags = value()?.parse().map_err(|e| format!("--bags: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// What one model reached on one task.
struct Outcome {
    balanced_accuracy: f64,
    auc: Option<f64>,
    best_epoch: usize,
    collapsed: bool,
    /// Selected epoch within the band of guessing on validation.
    at_chance: bool,
    seconds: f64,
}

fn run(
    params: &TrainParams,
    bags: &[Bag],
    classes: &[String],
    dim: usize,
    seed: u64,
) -> Result<Outcome, String> {
    let started = Instant::now();
    let standardize = params
        .standardizes()
        .then(|| Standardization::fit(bags).map(|f| f.stats))
        .flatten();
    let mut trainer = Trainer::new(
        params.model_config(dim, classes.len(), standardize),
        params.train_config(seed),
        classes.to_vec(),
        Device::Cpu,
    )
    .map_err(|e| e.to_string())?;
    let records = fit(&mut trainer, bags).map_err(|e| e.to_string())?;
    if std::env::var_os("TESSERA_STUDY_EPOCHS").is_some() {
        for r in &records {
            eprintln!(
                "  {} epoch {:>3}: lr {:.2e} train {:.4} (constant {:.4}) val {:.4} bacc {:.3}",
                params.pooling.name(),
                r.epoch + 1,
                r.lr,
                r.train_loss,
                r.constant_loss.unwrap_or(f64::NAN),
                r.val_loss.unwrap_or(f64::NAN),
                r.val_balanced_accuracy.unwrap_or(f64::NAN)
            );
        }
    }
    let collapsed = trainer.collapse().is_some();
    let at_chance = trainer.at_chance().is_some();
    let best_epoch = trainer.load_best().map_err(|e| e.to_string())?.unwrap_or(0);
    let test: Vec<&Bag> = bags.iter().filter(|b| b.split == Split::Test).collect();
    let probs = trainer.predict(&test).map_err(|e| e.to_string())?;
    let labels: Vec<usize> = test.iter().map(|b| b.label_index).collect();
    let predicted: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
    let flat: Vec<f32> = probs.into_iter().flatten().collect();
    let m = ClassificationMetrics::compute(&labels, &predicted, &flat, classes.len())
        .map_err(|e| e.to_string())?;
    Ok(Outcome {
        balanced_accuracy: m.balanced_accuracy,
        auc: m.auc,
        best_epoch,
        collapsed,
        at_chance,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn is_embedding_level(p: Pooling) -> bool {
    matches!(
        p,
        Pooling::Max | Pooling::Mean | Pooling::Lse | Pooling::Attention | Pooling::GatedAttention
    )
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let label: Vec<String> = args.sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let label = if label.is_empty() {
        "defaults".to_string()
    } else {
        label.join(" ")
    };
    println!("### {label} (seed {})\n", args.seed);
    println!("| task | model | test balanced accuracy | AUC | best epoch | alert | s |");
    println!("|---|---|---:|---:|---:|---|---:|");
    let mut spatial_sparse_min = f64::INFINITY;
    let mut spatial_invariant_max = f64::NEG_INFINITY;
    let mut presence_gap_max = f64::NEG_INFINITY;
    let mut collapses = 0;
    for &task in &args.tasks {
        let data = match generate(task, args.bags, 1000 + args.seed) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("error: {}: {e}", task.name());
                std::process::exit(1);
            }
        };
        let bags = data.bags();
        let mut results: Vec<(Pooling, f64)> = Vec::new();
        for &pooling in &args.poolings {
            let p = match TrainParams::with_overrides(&args.sets, pooling) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            };
            match run(&p, &bags, &data.classes, data.dim, args.seed) {
                Ok(o) => {
                    println!(
                        "| {} | {} | {:.3} | {} | {} | {} | {:.1} |",
                        task.name(),
                        pooling.name(),
                        o.balanced_accuracy,
                        o.auc.map_or("n/a".into(), |a| format!("{a:.3}")),
                        o.best_epoch + 1,
                        if o.collapsed {
                            "collapsed"
                        } else if o.at_chance {
                            "chance"
                        } else {
                            ""
                        },
                        o.seconds
                    );
                    collapses += usize::from(o.collapsed);
                    results.push((pooling, o.balanced_accuracy));
                }
                Err(e) => println!(
                    "| {} | {} | failed: {e} | | | | |",
                    task.name(),
                    pooling.name()
                ),
            }
        }
        if task.is_spatial() {
            for (p, acc) in &results {
                if p.is_spatial() {
                    spatial_sparse_min = spatial_sparse_min.min(*acc);
                } else {
                    spatial_invariant_max = spatial_invariant_max.max(*acc);
                }
            }
        } else {
            let best = results
                .iter()
                .map(|r| r.1)
                .fold(f64::NEG_INFINITY, f64::max);
            for (p, acc) in &results {
                if is_embedding_level(*p) {
                    presence_gap_max = presence_gap_max.max(best - acc);
                }
            }
        }
    }
    println!(
        "\nsummary [{label}]: spatial: sparseconvmil min {spatial_sparse_min:.3} (>= 0.9), permutation-invariant max {spatial_invariant_max:.3} (<= 0.6); presence: largest gap of an embedding-level model to the best {presence_gap_max:.3} (<= 0.05); collapsed runs {collapses}\n"
    );
}
