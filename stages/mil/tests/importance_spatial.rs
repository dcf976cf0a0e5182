//! Class activation mapping points at the evidence: on the synthetic spatial benchmark, a
//! SparseConvMIL trained to tell clustered from scattered positives scores the tiles of the
//! positive cluster above the rest of a clustered slide, for the class `clustered`. The model
//! is read back from the best checkpoint, as the `heatmap` stage does.

use candle_core::Device;
use tessera_mil::importance::{LoadedModel, Method};
use tessera_mil::models::{Pooling, Split};
use tessera_mil::train::checkpoint::CheckpointFiles;
use tessera_mil::train::epochs::{fit, Trainer};
use tessera_mil::train::synthetic::{spatial_slides, to_bags, SpatialConfig, CLASSES};
use tessera_mil::train::TrainParams;

#[test]
fn grad_cam_highlights_the_positive_cluster() {
    let config = SpatialConfig {
        val_fraction: 0.2,
        test_fraction: 0.3,
        ..SpatialConfig::new(240, 36, 16, 11)
    };
    let slides = spatial_slides(&config).expect("synthetic data");
    let bags = to_bags(&slides, config.dim);
    // train's defaults (epochs included): what a user's heatmap explains.
    let params = TrainParams {
        pooling: Pooling::Sparseconvmil,
        ..TrainParams::default()
    };
    let classes: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(
        params.model_config(config.dim, 2, None),
        params.train_config(0),
        classes,
        Device::Cpu,
    )
    .unwrap()
    .with_checkpoints(dir.path());
    fit(&mut trainer, &bags).unwrap();
    let model = LoadedModel::load(&CheckpointFiles::new(dir.path(), "best"), &Device::Cpu).unwrap();
    assert_eq!(model.method(), Method::GradCam);

    let clustered = 0;
    let (mut wins, mut total, mut correct) = (0, 0, 0);
    for (slide, bag) in slides.iter().zip(&bags) {
        if bag.split != Split::Test || bag.label_index != clustered {
            continue;
        }
        let importance = model.explain(bag).unwrap();
        correct += usize::from(importance.predicted() == clustered);
        let (mut pos, mut neg) = (Vec::new(), Vec::new());
        for (i, &positive) in slide.positive.iter().enumerate() {
            let s = importance.row(i)[clustered];
            if positive {
                pos.push(s)
            } else {
                neg.push(s)
            }
        }
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
        total += 1;
        wins += usize::from(mean(&pos) > mean(&neg));
    }
    eprintln!("cluster scored above the rest on {wins}/{total} clustered test slides; {correct} predicted clustered");
    assert!(total >= 20, "too few clustered test slides: {total}");
    assert!(
        wins as f64 >= 0.9 * total as f64,
        "the positive cluster should score highest: {wins}/{total}"
    );
}
