//! End-to-end training (`finetune_embedder: true`, the paper's own setting): a trainable
//! ResNet turns each bag's tile pixels into embeddings inside the training step, so the loss
//! back-propagates through the sparse map into the CNN. Its parameters live in the trainer's
//! `VarMap` under `embedder.` (torchvision names below that), so Adam, checkpoints, the best
//! snapshot and resume cover them; its batch-norm running statistics are variables there too,
//! updated in training mode and used (eval mode) for validation and predictions.

use candle_core::{Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use tessera_embed::weights::var_builder;
use tessera_embed::{Architecture, Preprocess, ResNet, ResNetDepth, WeightsSource};

use super::error::{CandleContext, TrainError};
use crate::models::Bag;

/// Prefix of the embedder's parameters in the trainer's `VarMap` and in checkpoints.
pub const EMBEDDER_PREFIX: &str = "embedder";

/// The embedder's architecture and input (saved in checkpoints, checked on resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedderConfig {
    pub arch: Architecture,
    /// Side of the images the network sees; tiles of another size are resized.
    pub input_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Where the embedder's initial parameters come from.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedderSetup {
    pub config: EmbedderConfig,
    /// A torchvision-named `.safetensors`/`.pth` file, or seeded random values (the trainer's
    /// seeded initialisation: `WeightsSource::Random`'s seed is not used).
    pub weights: WeightsSource,
    /// Prefix of the parameter names inside the weights file (`module.`, `backbone.`).
    pub weights_prefix: String,
}

/// The ResNet depth of a fine-tunable architecture (ViTs are inference-only here).
pub fn resnet_depth(arch: Architecture) -> Option<ResNetDepth> {
    match arch {
        Architecture::Resnet18 => Some(ResNetDepth::R18),
        Architecture::Resnet34 => Some(ResNetDepth::R34),
        Architecture::Resnet50 => Some(ResNetDepth::R50),
        _ => None,
    }
}

/// A trainable tile embedder.
pub struct FinetuneEmbedder {
    config: EmbedderConfig,
    resnet: ResNet,
    preprocess: Preprocess,
    device: Device,
}

impl FinetuneEmbedder {
    /// Creates the network's parameters in `vars` (seeded through `vb`, which must build from
    /// `vars` under [`EMBEDDER_PREFIX`]), then overwrites them from the weights file if any.
    pub fn new(setup: &EmbedderSetup, vb: VarBuilder, vars: &VarMap) -> Result<Self, TrainError> {
        let config = setup.config.clone();
        let depth = resnet_depth(config.arch).ok_or_else(|| TrainError::Embedder {
            message: format!(
                "{:?} cannot be fine-tuned; use resnet18, resnet34 or resnet50",
                config.arch
            ),
        })?;
        let device = vb.device().clone();
        let resnet = ResNet::new(depth, vb).context(|| "building the embedder".into())?;
        if let WeightsSource::File(path) = &setup.weights {
            let loaded = load_weights(vars, &setup.weights, &setup.weights_prefix, &device)?;
            tracing::info!(weights = %path.display(), "embedder: {loaded} parameters loaded");
        }
        Ok(FinetuneEmbedder {
            preprocess: Preprocess {
                input_size: config.input_size,
                mean: config.mean,
                std: config.std,
            },
            config,
            resnet,
            device,
        })
    }

    pub fn config(&self) -> &EmbedderConfig {
        &self.config
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        self.resnet.dim()
    }

    /// Embeds every tile of `bags`, bag after bag: `[N, dim]`. With `train`, batch-norm uses
    /// (and updates the running averages from) the batch statistics and the result carries
    /// the graph back to the embedder's parameters; without, the running statistics are used.
    pub fn embed(&self, bags: &[&Bag], train: bool) -> Result<Tensor, TrainError> {
        let mut images: Vec<(&[u8], usize)> = Vec::new();
        for bag in bags {
            let pixels = bag.pixels.as_ref().ok_or_else(|| TrainError::Slide {
                slide: bag.slide_id.clone(),
                message: "carries embeddings, not tile pixels, but the embedder is being \
                          fine-tuned (finetune_embedder: true)"
                    .into(),
            })?;
            images.extend(pixels.iter().map(|p| (p.rgb.as_slice(), p.side)));
        }
        let input = self
            .preprocess
            .to_tensor_sized(&images, &self.device)
            .map_err(|e| TrainError::Embedder {
                message: e.to_string(),
            })?;
        self.resnet
            .features_t(&input, train)
            .context(|| format!("embedding {} tiles", images.len()))
    }
}

/// Copies the parameters named `embedder.<name>` in `vars` from `<prefix><name>` of the
/// weights file (every one must be there, with its shape); returns how many were copied.
fn load_weights(
    vars: &VarMap,
    source: &WeightsSource,
    prefix: &str,
    device: &Device,
) -> Result<usize, TrainError> {
    let file = var_builder(source, prefix, device).map_err(|e| TrainError::Embedder {
        message: e.to_string(),
    })?;
    let data = vars.data().lock().map_err(|_| TrainError::Embedder {
        message: "parameter store lock poisoned".into(),
    })?;
    let own = format!("{EMBEDDER_PREFIX}.");
    let mut loaded = 0;
    for (name, var) in data.iter() {
        let Some(inner) = name.strip_prefix(&own) else {
            continue;
        };
        let tensor = file
            .get(var.shape().clone(), inner)
            .map_err(|e| TrainError::Embedder {
                message: format!("{source:?}: parameter `{prefix}{inner}`: {e}"),
            })?;
        var.set(&tensor)
            .context(|| format!("loading embedder parameter `{inner}`"))?;
        loaded += 1;
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::columns::TilePixels;
    use crate::models::{GlobalPool, ModelConfig, Pooling, Split};
    use crate::train::checkpoint::{self, CheckpointFiles};
    use crate::train::epochs::{TrainConfig, Trainer};
    use crate::train::optim::AdamConfig;
    use crate::train::record::Monitor;

    const SIDE: usize = 32;

    /// A bag of `k` tiles of varied colours on a row of the sparse map.
    fn bag(id: &str, label: usize, split: Split, k: usize) -> Bag {
        let pixels = (0..k)
            .map(|t| TilePixels {
                rgb: (0..SIDE * SIDE * 3)
                    .map(|i| ((i * 7 + t * 31 + label * 97) % 251) as u8)
                    .collect(),
                side: SIDE,
            })
            .collect();
        Bag {
            slide_id: id.into(),
            label_index: label,
            split,
            dim: 0,
            embeddings: Default::default(),
            positions: Some((0..k as i64).map(|j| [0, j]).collect()),
            pixels: Some(pixels),
        }
    }

    fn trainer(dir: Option<&std::path::Path>) -> Trainer {
        let model = ModelConfig {
            pooling: Pooling::Sparseconvmil,
            input_dim: 512,
            n_classes: 2,
            head_hidden: 8,
            dropout: 0.0,
            sparse_channels: vec![8],
            sparse_kernel: 3,
            sparse_batch_norm: false,
            sparse_pool: GlobalPool::Avg,
            attention_hidden: 8,
            lse_r: 1.0,
            instance_encoder: Vec::new(),
            encoder_dropout: 0.0,
            standardize: None,
            clam_dsmil: Default::default(),
        };
        let config = TrainConfig {
            epochs: 1,
            batch_size: 2,
            optimizer: AdamConfig::default(),
            class_weighted: false,
            monitor: Monitor::ValLoss,
            patience: 0,
            seed: 3,
            schedule: crate::train::schedule::LrSchedule::Constant,
            warmup_epochs: 0,
            grad_clip: 0.0,
        };
        let setup = EmbedderSetup {
            config: EmbedderConfig {
                arch: Architecture::Resnet18,
                input_size: SIDE,
                mean: tessera_embed::IMAGENET_MEAN,
                std: tessera_embed::IMAGENET_STD,
            },
            weights: WeightsSource::Random { seed: 0 },
            weights_prefix: String::new(),
        };
        let t = Trainer::new_finetuning(
            model,
            config,
            vec!["a".into(), "b".into()],
            Device::Cpu,
            &setup,
        )
        .unwrap();
        match dir {
            Some(d) => t.with_checkpoints(d),
            None => t,
        }
    }

    fn param(t: &Trainer, name: &str) -> Vec<f32> {
        t.parameter(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn a_step_changes_the_embedder_and_its_batch_norm_statistics() {
        let mut t = trainer(None);
        let bags = [bag("s0", 0, Split::Train, 3), bag("s1", 1, Split::Train, 2)];
        let refs: Vec<&Bag> = bags.iter().collect();
        let conv = "embedder.layer1.0.conv1.weight";
        let stem_bn = "embedder.bn1.running_mean";
        let (conv0, bn0) = (param(&t, conv), param(&t, stem_bn));
        let loss = t.step(&refs, None, 0, 0).unwrap();
        assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
        let (conv1, bn1) = (param(&t, conv), param(&t, stem_bn));
        let moved = conv0.iter().zip(&conv1).filter(|(a, b)| a != b).count();
        assert!(
            moved > conv0.len() / 2,
            "Adam moved {moved} of {} embedder weights",
            conv0.len()
        );
        assert!(
            bn0.iter().all(|v| *v == 0.0) && bn1.iter().any(|v| *v != 0.0),
            "running mean updated in training mode"
        );
        // Prediction uses the running statistics: deterministic, and independent of which
        // other bags share the batch (batch statistics would mix them).
        let alone = t.predict(&refs[..1]).unwrap();
        let together = t.predict(&refs).unwrap();
        for (a, b) in alone[0].iter().zip(&together[0]) {
            assert!((a - b).abs() < 1e-5, "{alone:?} vs {together:?}");
        }
    }

    #[test]
    fn checkpoints_hold_the_embedder_and_resume_checks_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = trainer(Some(dir.path()));
        let bags = vec![
            bag("s0", 0, Split::Train, 2),
            bag("s1", 1, Split::Train, 2),
            bag("s2", 0, Split::Val, 2),
        ];
        t.run_epoch(&bags).unwrap();
        let files = CheckpointFiles::new(dir.path(), "last");
        let saved = candle_core::safetensors::load(&files.weights, &Device::Cpu).unwrap();
        for name in [
            "embedder.conv1.weight",
            "embedder.bn1.running_var",
            "embedder.layer4.1.bn2.running_mean",
        ] {
            assert!(
                saved.contains_key(name),
                "{name} missing from the checkpoint"
            );
        }
        let trained = param(&t, "embedder.layer1.0.conv1.weight");
        let meta = checkpoint::read_meta(&files).unwrap();
        assert_eq!(meta.embedder.as_ref(), t.embedder_config());
        let mut fresh = trainer(None);
        assert_ne!(param(&fresh, "embedder.layer1.0.conv1.weight"), trained);
        fresh.resume(&files.meta).unwrap();
        assert_eq!(param(&fresh, "embedder.layer1.0.conv1.weight"), trained);
        assert_eq!(
            fresh.predict(&[&bags[2]]).unwrap(),
            t.predict(&[&bags[2]]).unwrap()
        );
    }
}
