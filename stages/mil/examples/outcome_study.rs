//! The study behind `train`'s survival and regression defaults (docs/defaults-study.md,
//! "Survival and regression"): pooling models trained with the training loop directly (no
//! engine, no files) on synthetic cohorts whose outcome is driven either by how positives are
//! arranged (spatial: the size of a blob among a fixed number of positives) or by how many
//! positives a slide holds (not spatial: every MIL model should rank those), under one
//! configuration (the defaults, overridden by `--set`). Prints one Markdown row per
//! (cohort, model, seed): test C-index (survival) or R^2 (regression), the selected epoch and
//! the "learned nothing" alerts.
//!
//! Run: `cargo run --release -p tessera-mil --example outcome_study -- [--set key=value]...
//! [--cohorts surv_count,surv_arrangement,reg_count,reg_arrangement] [--poolings mean,...]
//! [--seeds 0,1,2] [--slides N] [--tiles N]`, e.g. `--set survival_loss=cox --set batch_size=16`.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::Device;
use rand::seq::SliceRandom;
use serde_json::Value;
use tessera_mil::models::{Bag, Pooling, Split, Standardization};
use tessera_mil::seeding::stream_rng;
use tessera_mil::train::epochs::{fit, Trainer};
use tessera_mil::train::objective::Objective;
use tessera_mil::train::outcomes::{
    outcome_slides, OutcomeConfig, OutcomeDriver, OutcomeKind, OutcomeSlide,
};
use tessera_mil::train::TrainParams;
use tessera_pipeline::{SlideTarget, Task};

/// One cohort of the study.
#[derive(Debug, Clone, Copy)]
struct Cohort {
    name: &'static str,
    kind: OutcomeKind,
    driver: OutcomeDriver,
}

const COHORTS: [Cohort; 4] = [
    Cohort {
        name: "surv_count",
        kind: OutcomeKind::Survival,
        driver: OutcomeDriver::Count,
    },
    Cohort {
        name: "surv_arrangement",
        kind: OutcomeKind::Survival,
        driver: OutcomeDriver::Arrangement,
    },
    Cohort {
        name: "reg_count",
        kind: OutcomeKind::Regression,
        driver: OutcomeDriver::Count,
    },
    Cohort {
        name: "reg_arrangement",
        kind: OutcomeKind::Regression,
        driver: OutcomeDriver::Arrangement,
    },
];

/// Parsed command line.
struct Args {
    sets: Vec<(String, Value)>,
    cohorts: Vec<Cohort>,
    poolings: Vec<Pooling>,
    seeds: Vec<u64>,
    slides: usize,
    tiles: usize,
}

fn parse_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sets: Vec::new(),
        cohorts: COHORTS.to_vec(),
        poolings: vec![
            Pooling::Mean,
            Pooling::Attention,
            Pooling::Abmil,
            Pooling::Sparseconvmil,
        ],
        seeds: vec![0],
        slides: 240,
        tiles: 36,
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
            "--cohorts" => {
                args.cohorts = value()?
                    .split(',')
                    .map(|c| {
                        COHORTS
                            .iter()
                            .find(|k| k.name == c)
                            .copied()
                            .ok_or(format!("unknown cohort {c}"))
                    })
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
            "--seeds" => {
                args.seeds = value()?
                    .split(',')
                    .map(|s| s.parse().map_err(|e| format!("--seeds: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--slides" => args.slides = value()?.parse().map_err(|e| format!("--slides: {e}"))?,
            "--tiles" => args.tiles = value()?.parse().map_err(|e| format!("--tiles: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// 70 / 15 / 15 splits as `sample` makes them without a split column: stratified by the event
/// (survival) or one stratum (regression), shuffled by `seed`.
fn assign_splits(slides: &[OutcomeSlide], seed: u64) -> Vec<Split> {
    let mut strata: HashMap<bool, Vec<usize>> = HashMap::new();
    for (i, s) in slides.iter().enumerate() {
        strata
            .entry(s.survival.is_some_and(|(_, e)| e))
            .or_default()
            .push(i);
    }
    let mut splits = vec![Split::Train; slides.len()];
    for (event, mut members) in strata {
        members.shuffle(&mut stream_rng(
            seed,
            "study-splits",
            None,
            &event.to_string(),
        ));
        let n = members.len();
        let n_train = (n as f64 * 0.7).round() as usize;
        let n_val = (n as f64 * 0.15).round() as usize;
        for (rank, i) in members.into_iter().enumerate() {
            splits[i] = if rank < n_train {
                Split::Train
            } else if rank < n_train + n_val {
                Split::Val
            } else {
                Split::Test
            };
        }
    }
    splits
}

/// What one model reached on one cohort.
struct Outcome {
    /// Test Harrell C-index (survival) or R^2 (regression).
    score: Option<f64>,
    /// The same score of the ground-truth driver (the best a model can rank).
    oracle: Option<f64>,
    best_epoch: usize,
    alert: &'static str,
    seconds: f64,
}

fn score(task: Task, test: &[&OutcomeSlide], predicted: &[f64]) -> Option<f64> {
    match task {
        Task::Survival => {
            let outcomes: Vec<tessera_stats::Outcome> = test
                .iter()
                .filter_map(|s| s.survival)
                .map(|(time, event)| tessera_stats::Outcome { time, event })
                .collect();
            tessera_stats::harrell_c_index(&outcomes, predicted, None)
                .ok()
                .flatten()
        }
        _ => {
            let truth: Vec<f64> = test.iter().filter_map(|s| s.target).collect();
            tessera_stats::RegressionMetrics::compute(&truth, predicted, None)
                .ok()
                .flatten()
                .map(|m| m.r2)
        }
    }
}

fn run(
    params: &TrainParams,
    cohort: Cohort,
    slides: &[OutcomeSlide],
    splits: &[Split],
    dim: usize,
    seed: u64,
) -> Result<Outcome, String> {
    let started = Instant::now();
    let task = match cohort.kind {
        OutcomeKind::Survival => Task::Survival,
        OutcomeKind::Regression => Task::Regression,
    };
    let bags: Vec<Bag> = slides
        .iter()
        .zip(splits)
        .map(|(s, &split)| Bag {
            slide_id: s.slide.row.slide_id.clone(),
            label_index: usize::from(s.survival.is_some_and(|(_, e)| e)),
            split,
            dim,
            embeddings: s.slide.embeddings.clone().into(),
            positions: Some(s.slide.cells.clone()),
            pixels: None,
        })
        .collect();
    let targets: HashMap<String, SlideTarget> = slides
        .iter()
        .filter_map(|s| {
            let target = match (s.survival, s.target) {
                (Some((time, event)), _) => SlideTarget::Survival { time, event },
                (None, Some(v)) => SlideTarget::Value(v),
                (None, None) => return None,
            };
            Some((s.slide.row.slide_id.clone(), target))
        })
        .collect();
    let train_ids: Vec<&str> = bags
        .iter()
        .filter(|b| b.split == Split::Train)
        .map(|b| b.slide_id.as_str())
        .collect();
    let objective_config = params.objective_config();
    let objective =
        Objective::fit(task, &objective_config, &targets, &train_ids).map_err(|e| e.to_string())?;
    let width = Objective::width(task, &objective_config, 2);
    let names = Objective::output_names(task, &objective_config, &["censored".into()]);
    let standardize = params
        .standardizes()
        .then(|| Standardization::fit(&bags).map(|f| f.stats))
        .flatten();
    let mut trainer = Trainer::new(
        params.model_config(dim, width, standardize),
        params.train_config(seed),
        names,
        Device::Cpu,
    )
    .map_err(|e| e.to_string())?
    .with_objective(objective);
    let records = fit(&mut trainer, &bags).map_err(|e| e.to_string())?;
    if std::env::var_os("TESSERA_STUDY_EPOCHS").is_some() {
        for r in &records {
            eprintln!(
                "  {} epoch {:>3}: lr {:.2e} train {:.4} (constant {:.4}) val {:.4} C {:.3} R2 {:.3}",
                params.pooling.name(),
                r.epoch + 1,
                r.lr,
                r.train_loss,
                r.constant_loss.unwrap_or(f64::NAN),
                r.val_loss.unwrap_or(f64::NAN),
                r.val_c_index.unwrap_or(f64::NAN),
                r.val_r2.unwrap_or(f64::NAN),
            );
        }
    }
    let val: Vec<&Bag> = bags.iter().filter(|b| b.split == Split::Val).collect();
    let alert = if trainer.collapse().is_some() {
        "collapse"
    } else if trainer.no_signal(&val).is_some() {
        "no signal"
    } else {
        ""
    };
    let best_epoch = trainer.load_best().map_err(|e| e.to_string())?.unwrap_or(0);
    let test_bags: Vec<&Bag> = bags.iter().filter(|b| b.split == Split::Test).collect();
    let test_slides: Vec<&OutcomeSlide> = slides
        .iter()
        .zip(splits)
        .filter(|(_, &s)| s == Split::Test)
        .map(|(s, _)| s)
        .collect();
    let outputs = trainer.predict(&test_bags).map_err(|e| e.to_string())?;
    let predicted: Vec<f64> = outputs
        .iter()
        .map(|o| trainer.objective().score(o).unwrap_or(f64::NAN))
        .collect();
    // The driver itself as the prediction: a larger blob / more positives, an earlier event
    // and a larger target.
    let truth: Vec<f64> = test_slides.iter().map(|s| s.blob as f64).collect();
    Ok(Outcome {
        score: score(task, &test_slides, &predicted),
        oracle: score(task, &test_slides, &truth),
        best_epoch,
        alert,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "sets: {:?}, {} slides of {} tiles",
        args.sets, args.slides, args.tiles
    );
    println!(
        "| cohort | model | seed | test C-index / R^2 | driver's own | best epoch | alert | s |"
    );
    println!("|---|---|---:|---:|---:|---:|---|---:|");
    for cohort in &args.cohorts {
        for &seed in &args.seeds {
            let config = OutcomeConfig {
                driver: cohort.driver,
                tiles: args.tiles,
                ..OutcomeConfig::new(cohort.kind, args.slides, 2026 + seed)
            };
            let slides = match outcome_slides(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {}: {e}", cohort.name);
                    std::process::exit(1);
                }
            };
            let splits = assign_splits(&slides, seed);
            for &pooling in &args.poolings {
                let p = match TrainParams::with_overrides(&args.sets, pooling) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("error: {e}");
                        std::process::exit(2);
                    }
                };
                match run(&p, *cohort, &slides, &splits, config.dim, seed) {
                    Ok(o) => println!(
                        "| {} | {} | {seed} | {} | {} | {} | {} | {:.1} |",
                        cohort.name,
                        pooling.name(),
                        o.score.map_or("-".into(), |v| format!("{v:.3}")),
                        o.oracle.map_or("-".into(), |v| format!("{v:.3}")),
                        o.best_epoch + 1,
                        o.alert,
                        o.seconds
                    ),
                    Err(e) => println!(
                        "| {} | {} | {seed} | error: {e} | | | | |",
                        cohort.name,
                        pooling.name()
                    ),
                }
            }
        }
    }
}
