//! The training loop without the engine: checkpoints, resume, non-finite losses, early
//! stopping, class weights.

use candle_core::Device;
use tessera_mil::models::bag::BagError;
use tessera_mil::models::{Bag, Pooling};
use tessera_mil::train::checkpoint::{read_meta, CheckpointFiles};
use tessera_mil::train::epochs::{fit, Trainer};
use tessera_mil::train::error::TrainError;
use tessera_mil::train::record::Monitor;
use tessera_mil::train::schedule::LrSchedule;
use tessera_mil::train::synthetic::{spatial_slides, to_bags, SpatialConfig, CLASSES};
use tessera_mil::train::TrainParams;

fn bags() -> Vec<Bag> {
    let config = SpatialConfig::new(40, 16, 4, 1);
    to_bags(&spatial_slides(&config).unwrap(), 4)
}

fn trainer(params: &TrainParams) -> Trainer {
    let classes = CLASSES.iter().map(|c| c.to_string()).collect();
    Trainer::new(
        params.model_config(4, 2, None),
        params.train_config(5),
        classes,
        Device::Cpu,
    )
    .unwrap()
}

fn weights(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<_> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn resume_continues_from_the_saved_epoch_and_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let bags = bags();
    // A constant learning rate: a cosine depends on the total number of epochs, which the
    // resumed run changes (2 -> 4), so only a constant schedule can match the straight run.
    let params = |epochs| TrainParams {
        epochs,
        pooling: Pooling::Sparseconvmil,
        lr_schedule: LrSchedule::Constant,
        warmup_epochs: 0,
        ..TrainParams::default()
    };

    let mut first = trainer(&params(2)).with_checkpoints(dir.path().join("a"));
    fit(&mut first, &bags).unwrap();
    let files = CheckpointFiles::new(&dir.path().join("a"), "last");
    let meta = read_meta(&files).unwrap();
    assert_eq!(
        (meta.epoch, meta.step),
        (1, 24),
        "2 epochs of 24 train bags in batches of 2"
    );
    assert!(files.optimizer.is_file());

    let mut resumed = trainer(&params(4)).with_checkpoints(dir.path().join("b"));
    resumed.resume(&files.weights).unwrap();
    assert_eq!(resumed.next_epoch(), 2);
    let records = fit(&mut resumed, &bags).unwrap();
    assert_eq!(
        records.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(records.last().unwrap().step, 48);
    assert_eq!(resumed.log("train").resumed_at, Some(2));

    // Same seed, same data: resuming reproduces the uninterrupted run (optimizer state
    // included; a fresh Adam would diverge).
    let mut straight = trainer(&params(4)).with_checkpoints(dir.path().join("c"));
    fit(&mut straight, &bags).unwrap();
    let a = weights(&dir.path().join("b/last.safetensors"));
    let c = weights(&dir.path().join("c/last.safetensors"));
    assert_eq!(a.len(), c.len());
    for ((na, va), (_, vc)) in a.iter().zip(&c) {
        let diff = va
            .iter()
            .zip(vc)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-5,
            "{na}: resumed and straight runs differ by {diff}"
        );
    }
}

#[test]
fn resume_refuses_another_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(&TrainParams {
        epochs: 1,
        pooling: Pooling::Mean,
        ..TrainParams::default()
    })
    .with_checkpoints(dir.path());
    fit(&mut t, &bags()).unwrap();
    let mut other = trainer(&TrainParams {
        epochs: 2,
        pooling: Pooling::Max,
        ..TrainParams::default()
    });
    let err = other.resume(dir.path()).err().unwrap().to_string();
    assert!(err.contains("differs"), "{err}");
}

#[test]
fn nan_embeddings_are_refused_by_slide_and_keep_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut bags = bags();
    // No hidden layer: a ReLU would turn NaN into 0 (max semantics) and hide it.
    let params = TrainParams {
        epochs: 3,
        pooling: Pooling::Mean,
        head_hidden: 0,
        ..TrainParams::default()
    };
    let mut t = trainer(&params).with_checkpoints(dir.path());
    t.run_epoch(&bags).unwrap();
    let before = std::fs::read(dir.path().join("last.safetensors")).unwrap();
    for bag in bags.iter_mut() {
        bag.embeddings[0] = f32::NAN;
    }
    let err = t.run_epoch(&bags).unwrap_err();
    // The input is refused by name before it reaches the model, where the encoder's ReLU
    // would have turned the NaN into a silent 0.
    let message = err.to_string();
    assert!(
        matches!(
            &err,
            TrainError::Bag(BagError::NonFinite {
                instance: 0,
                dimension: 0,
                ..
            })
        ),
        "{message}"
    );
    assert!(
        message.contains("slide `spatial_") && message.contains("NaN"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("last.safetensors")).unwrap(),
        before
    );
    assert_eq!(
        read_meta(&CheckpointFiles::new(dir.path(), "last"))
            .unwrap()
            .epoch,
        0
    );
}

#[test]
fn early_stopping_stops_after_patience_epochs_without_improvement() {
    // A tiny learning rate on a chance-level task: validation AUC barely moves, loss does.
    let params = TrainParams {
        epochs: 50,
        pooling: Pooling::Mean,
        monitor: Monitor::ValBalancedAccuracy,
        patience: 2,
        lr: 1e-9,
        ..TrainParams::default()
    };
    let mut t = trainer(&params);
    let records = fit(&mut t, &bags()).unwrap();
    assert!(t.stopped_early());
    assert!(records.len() < 50);
    let best = t.best().unwrap().epoch;
    assert_eq!(
        records.len(),
        best + 1 + 2,
        "stops `patience` epochs after the best"
    );
    assert_eq!(t.load_best().unwrap(), Some(best));
}

#[test]
fn class_weights_are_inverse_frequencies() {
    let mut bags = bags();
    for b in bags.iter_mut().take(6) {
        b.label_index = 0;
    }
    let t = trainer(&TrainParams::default());
    let refs: Vec<&Bag> = bags.iter().take(8).collect();
    // 7 of class 0, 1 of class 1 among the first 8.
    let w = t.class_weights(&refs);
    assert!(
        (w[0] - 8.0 / 14.0).abs() < 1e-6 && (w[1] - 4.0).abs() < 1e-6,
        "{w:?}"
    );
}

#[test]
fn weighted_loss_is_the_torch_weighted_mean() {
    let dev = Device::Cpu;
    let logits = candle_core::Tensor::new(&[[2.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev).unwrap();
    let bags = bags();
    let picked: Vec<&Bag> = vec![&bags[0], &bags[1], &bags[2]]; // labels 0, 1, 0
    let w = [0.5f32, 2.0];
    let got = tessera_mil::train::epochs::loss(&logits, &picked, Some(&w), &dev)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let nll = |l: [f64; 2], y: usize| -(l[y] - (l[0].exp() + l[1].exp()).ln());
    let expected =
        (0.5 * nll([2.0, 0.0], 0) + 2.0 * nll([0.0, 1.0], 1) + 0.5 * nll([1.0, 1.0], 0)) / 3.0;
    assert!(
        (f64::from(got) - expected).abs() < 1e-5,
        "{got} vs {expected}"
    );
}

/// Inputs that carry nothing (every embedding the same) cannot be learned: the training loss
/// stays at the constant predictor's, and the collapse is told; the same model on the real
/// spatial bags learns and raises nothing.
#[test]
fn collapse_is_told_for_a_run_that_cannot_learn_and_not_for_one_that_does() {
    let params = TrainParams {
        epochs: 6,
        pooling: Pooling::Sparseconvmil,
        ..TrainParams::default()
    };
    let mut blank = bags();
    for bag in blank.iter_mut() {
        bag.embeddings.iter_mut().for_each(|v| *v = 0.25);
    }
    let mut t = trainer(&params);
    fit(&mut t, &blank).unwrap();
    let collapse = t.collapse().expect("a run on constant inputs collapses");
    assert!(
        (collapse.constant_loss - std::f64::consts::LN_2).abs() < 1e-9,
        "balanced classes: the prior's entropy is ln 2, got {}",
        collapse.constant_loss
    );
    assert!(collapse.message().contains("training collapsed"));
    assert!(t.log("train").collapse.is_some());

    let learns = TrainParams {
        epochs: 12,
        ..params
    };
    let mut t = trainer(&learns);
    let records = fit(&mut t, &bags()).unwrap();
    assert!(
        t.collapse().is_none(),
        "a learning run is not a collapse: {:?}",
        records.iter().map(|r| r.train_loss).collect::<Vec<_>>()
    );
    assert!(records.last().unwrap().train_loss < 0.5 * std::f64::consts::LN_2);
}

/// The constant predictor's loss is the entropy of the training prior, and ln(C) when the
/// loss is class-weighted (the weights make the prior uniform).
#[test]
fn constant_loss_is_the_entropy_of_the_training_prior() {
    let mut bags = bags();
    // 3 of the training bags to class 0, the rest keep theirs: count the prior by hand.
    for b in bags
        .iter_mut()
        .filter(|b| b.split == tessera_mil::models::Split::Train)
        .take(3)
    {
        b.label_index = 0;
    }
    let train: Vec<&Bag> = bags
        .iter()
        .filter(|b| b.split == tessera_mil::models::Split::Train)
        .collect();
    let n0 = train.iter().filter(|b| b.label_index == 0).count() as f64;
    let n = train.len() as f64;
    let (p0, p1) = (n0 / n, 1.0 - n0 / n);
    let expected = -(p0 * p0.ln() + p1 * p1.ln());
    let t = trainer(&TrainParams::default());
    assert!((t.constant_loss(&bags).unwrap() - expected).abs() < 1e-12);
    let weighted = trainer(&TrainParams {
        class_weighted: true,
        ..TrainParams::default()
    });
    assert!((weighted.constant_loss(&bags).unwrap() - 2f64.ln()).abs() < 1e-12);
}

/// A permutation-invariant model on a spatial label fits nothing that holds on validation:
/// its selected epoch is within the band of guessing and that is told; SparseConvMIL on the
/// same bags is not.
#[test]
fn a_model_at_chance_on_validation_is_told_and_a_learning_one_is_not() {
    let config = SpatialConfig::new(120, 16, 4, 2);
    let bags = to_bags(&spatial_slides(&config).unwrap(), 4);
    let val = bags
        .iter()
        .filter(|b| b.split == tessera_mil::models::Split::Val)
        .count();
    assert!(val >= tessera_mil::train::epochs::CHANCE_MIN_VAL_BAGS);
    let run = |pooling| {
        let mut t = trainer(&TrainParams {
            pooling,
            epochs: 12,
            ..TrainParams::default()
        });
        fit(&mut t, &bags).unwrap();
        t
    };
    let mean = run(Pooling::Mean);
    let chance = mean
        .at_chance()
        .expect("mean pooling cannot see a spatial label");
    assert_eq!(chance.val_bags, val);
    assert!((chance.chance - 0.5).abs() < 1e-12);
    assert!(chance.message().starts_with("no better than chance"));
    assert!(mean.log("train").at_chance.is_some());
    let sparse = run(Pooling::Sparseconvmil);
    assert!(
        sparse.at_chance().is_none(),
        "{:?}",
        sparse
            .records()
            .iter()
            .map(|r| r.val_balanced_accuracy)
            .collect::<Vec<_>>()
    );
}
