//! MIL models behind one `pooling` choice. Every model ends with the same [`head::Head`] so
//! that comparisons between SparseConvMIL and the baselines measure the pooling, nothing else.

pub mod attention;
pub mod bag;
pub mod clam;
pub mod dsmil;
pub mod encoder;
pub mod head;
pub mod init;
pub mod nystrom;
pub mod pooling;
#[cfg(test)]
pub mod reference;
pub mod rows;
pub mod sparse;
pub mod transmil;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use bag::{Bag, BagBatch, Split};
pub use encoder::{InstanceEncoder, InstanceInput, Standardization};
pub use rows::EmbeddingRows;
pub use sparse::GlobalPool;

/// A bag classifier: logits `[B, n_classes]` for a batch of bags.
pub trait MilModel: Send {
    /// `train` enables dropout and batch statistics.
    fn forward(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor>;

    /// The training forward pass: the outputs the task loss is computed on, plus what the
    /// model adds to that loss (CLAM's instance clustering, DSMIL's max-instance branch).
    /// `labels` are the bags' class indices in classification, `None` for other tasks.
    fn forward_train(
        &self,
        bags: &BagBatch,
        labels: Option<&[usize]>,
    ) -> candle_core::Result<TrainOutput> {
        let _ = labels;
        Ok(TrainOutput::plain(self.forward(bags, true)?))
    }
}

/// What one training forward pass contributes to the loss:
/// `task_weight * task_loss(outputs) + sum of the auxiliary terms`.
#[derive(Debug, Clone)]
pub struct TrainOutput {
    /// `[B, n_outputs]`, the same outputs `forward` gives.
    pub outputs: Tensor,
    /// Weight of the task loss on `outputs` (1 for models without auxiliary terms).
    pub task_weight: f64,
    pub auxiliary: Vec<AuxiliaryLoss>,
}

impl TrainOutput {
    /// Outputs alone, trained with the task loss only.
    pub fn plain(outputs: Tensor) -> TrainOutput {
        TrainOutput {
            outputs,
            task_weight: 1.0,
            auxiliary: Vec::new(),
        }
    }
}

/// A term a model adds to the task loss.
#[derive(Debug, Clone)]
pub enum AuxiliaryLoss {
    /// A second set of outputs `[B, n_outputs]` trained with the task's own loss (DSMIL's
    /// max-instance branch), so the term works for every task.
    TaskOutputs { outputs: Tensor, weight: f64 },
    /// A scalar loss the model computed itself (CLAM's instance clustering).
    Value { loss: Tensor, weight: f64 },
}

/// Which model aggregates a bag's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Sparse CNN over the instances' map positions, then global pooling (needs `map_i`, `map_j`).
    Sparseconvmil,
    /// Instance classifier, max of instance scores.
    InstanceMax,
    /// Instance classifier, mean of instance scores.
    InstanceMean,
    /// Instance classifier, log-sum-exp of instance scores.
    InstanceLse,
    /// Max of embeddings, then the classifier.
    Max,
    /// Mean of embeddings, then the classifier.
    Mean,
    /// Log-sum-exp of embeddings, then the classifier.
    Lse,
    /// Attention pooling (Ilse et al. 2018).
    Attention,
    /// Gated attention pooling (Ilse et al. 2018).
    GatedAttention,
    /// ABMIL as CLAM/TRIDENT configure it: gated attention of `abmil_hidden` units with
    /// dropout `abmil_dropout` in its branches.
    Abmil,
    /// CLAM-SB (Lu et al. 2021): ABMIL plus instance-level clustering on the most and least
    /// attended instances.
    ClamSb,
    /// CLAM-MB: one attention branch per class, plus instance-level clustering.
    ClamMb,
    /// DSMIL (Li et al. 2021): critical-instance max branch plus distance-based attention.
    Dsmil,
    /// TransMIL (Shao et al. 2021): two Nystrom-attention layers around a convolutional
    /// position encoding (PPEG) of the tokens laid out on a square in bag order; class token
    /// to the head. Width = the encoder's output; heads, landmarks and the attention dropout
    /// (0.1) as the authors'.
    Transmil,
    /// TransMIL whose position encoding runs on the instances' sparse-map cells (submanifold
    /// depthwise convolutions) instead of the arbitrary square (needs `map_i`, `map_j`).
    TransmilMap,
}

impl Pooling {
    /// Every choice, for tests and documentation.
    pub const ALL: [Pooling; 15] = [
        Pooling::Sparseconvmil,
        Pooling::InstanceMax,
        Pooling::InstanceMean,
        Pooling::InstanceLse,
        Pooling::Max,
        Pooling::Mean,
        Pooling::Lse,
        Pooling::Attention,
        Pooling::GatedAttention,
        Pooling::Abmil,
        Pooling::ClamSb,
        Pooling::ClamMb,
        Pooling::Dsmil,
        Pooling::Transmil,
        Pooling::TransmilMap,
    ];

    /// Whether the model reads instance positions (the others are permutation-invariant).
    pub fn is_spatial(self) -> bool {
        matches!(self, Pooling::Sparseconvmil | Pooling::TransmilMap)
    }

    /// Whether the bag's logits ignore the order of its instances. TransMIL is not: its
    /// square (and Nystrom's landmarks and value convolution, for both variants) follow the
    /// bag order, which is the tiles' table order (a scan of the slide) unless shuffled.
    pub fn is_permutation_invariant(self) -> bool {
        !matches!(
            self,
            Pooling::Sparseconvmil | Pooling::Transmil | Pooling::TransmilMap
        )
    }

    /// The YAML name.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Sparseconvmil => "sparseconvmil",
            Pooling::InstanceMax => "instance_max",
            Pooling::InstanceMean => "instance_mean",
            Pooling::InstanceLse => "instance_lse",
            Pooling::Max => "max",
            Pooling::Mean => "mean",
            Pooling::Lse => "lse",
            Pooling::Attention => "attention",
            Pooling::GatedAttention => "gated_attention",
            Pooling::Abmil => "abmil",
            Pooling::ClamSb => "clam_sb",
            Pooling::ClamMb => "clam_mb",
            Pooling::Dsmil => "dsmil",
            Pooling::Transmil => "transmil",
            Pooling::TransmilMap => "transmil_map",
        }
    }
}

/// Everything needed to rebuild a model's architecture (saved next to its weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub pooling: Pooling,
    /// Width of the instance embeddings.
    pub input_dim: usize,
    pub n_classes: usize,
    /// Hidden units of the head (0: a single linear layer).
    pub head_hidden: usize,
    /// Dropout before the head, in training.
    pub dropout: f32,
    /// Output channels of each submanifold convolution (sparseconvmil).
    pub sparse_channels: Vec<usize>,
    pub sparse_kernel: usize,
    pub sparse_batch_norm: bool,
    pub sparse_pool: GlobalPool,
    /// Hidden units of the attention network.
    pub attention_hidden: usize,
    /// Sharpness of log-sum-exp pooling.
    pub lse_r: f64,
    /// Widths of the shared instance encoder (Linear + ReLU each) before the pooling; empty
    /// in checkpoints written before it existed.
    #[serde(default)]
    pub instance_encoder: Vec<usize>,
    /// Dropout after each encoder layer, in training.
    #[serde(default)]
    pub encoder_dropout: f32,
    /// The training slides' per-dimension statistics the inputs are standardised with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardize: Option<Standardization>,
    /// Settings of ABMIL, CLAM and DSMIL (defaults in checkpoints written before them).
    #[serde(default)]
    pub clam_dsmil: ClamDsmilOptions,
}

/// Settings of the CLAM family and DSMIL, as their authors configure them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClamDsmilOptions {
    /// Hidden units of the gated attention network (CLAM's "small": 256).
    pub abmil_hidden: usize,
    /// Dropout in the attention branches while training (CLAM: 0.25).
    pub abmil_dropout: f32,
    /// Instances pseudo-labelled on each side by CLAM's clustering (`k_sample`: 8).
    pub clam_k: usize,
    /// Weight of CLAM's bag loss; the instance loss gets the rest (0.7).
    pub clam_bag_weight: f64,
    /// CLAM's `subtyping`: out-of-class branches learn their top-k as negatives.
    pub clam_subtyping: bool,
    /// Units of DSMIL's query network (128).
    pub dsmil_query: usize,
}

impl ClamDsmilOptions {
    /// The authors' settings (CLAM "small" with dropout, k_sample 8, bag weight 0.7; DSMIL's
    /// 128-unit queries).
    pub const DEFAULT: ClamDsmilOptions = ClamDsmilOptions {
        abmil_hidden: 256,
        abmil_dropout: 0.25,
        clam_k: 8,
        clam_bag_weight: 0.7,
        clam_subtyping: false,
        dsmil_query: 128,
    };
}

impl Default for ClamDsmilOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl ModelConfig {
    /// Width of what the pooling reads (the encoder's output).
    pub fn pooled_dim(&self) -> usize {
        InstanceEncoder::out_dim(self.input_dim, &self.instance_encoder)
    }

    /// The parameter counts of this architecture (built once on the CPU and counted): the
    /// "#Params" column of a comparison.
    pub fn parameter_counts(&self) -> candle_core::Result<ParameterCounts> {
        let vars = candle_nn::VarMap::new();
        let vb = init::seeded_var_builder(&vars, 0, &candle_core::Device::Cpu);
        build_any(self, &vb)?;
        Ok(ParameterCounts::of(&vars))
    }
}

/// Trainable parameters by part, so a results table can show what each model costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParameterCounts {
    /// The shared instance encoder (`encoder.*`).
    pub encoder: usize,
    /// What differs between models: sparse CNN, attention network (everything else).
    pub pooling: usize,
    /// The shared classifier head (`head.*`).
    pub head: usize,
    /// A fine-tuned tile embedder (`embedder.*`), in end-to-end training.
    pub embedder: usize,
    pub total: usize,
}

impl ParameterCounts {
    /// Counts the variables of `vars` by name prefix. Batch-norm running statistics are
    /// buffers, not parameters, and are left out (as `sum(p.numel() for p in parameters())`).
    pub fn of(vars: &candle_nn::VarMap) -> ParameterCounts {
        let mut c = ParameterCounts::default();
        for (name, var) in init::named_vars(vars) {
            if name.ends_with("running_mean") || name.ends_with("running_var") {
                continue;
            }
            let n = var.elem_count();
            if name.starts_with("encoder.") {
                c.encoder += n;
            } else if name.starts_with("head.") {
                c.head += n;
            } else if name.starts_with("embedder.") {
                c.embedder += n;
            } else {
                c.pooling += n;
            }
            c.total += n;
        }
        c
    }
}

/// A built model with its concrete type, for code that needs more than the logits (the
/// `heatmap` stage reads activations, attention weights and instance scores).
#[derive(Debug, Clone)]
pub enum AnyModel {
    Sparse(sparse::SparseConvMil),
    Instance(pooling::InstancePooling),
    Embedding(pooling::EmbeddingPooling),
    Attention(attention::AttentionMil),
    Clam(clam::ClamMil),
    Dsmil(dsmil::Dsmil),
    TransMil(Box<transmil::TransMil>),
}

impl AnyModel {
    fn as_model(&self) -> &dyn MilModel {
        match self {
            AnyModel::Sparse(m) => m,
            AnyModel::Instance(m) => m,
            AnyModel::Embedding(m) => m,
            AnyModel::Attention(m) => m,
            AnyModel::Clam(m) => m,
            AnyModel::Dsmil(m) => m,
            AnyModel::TransMil(m) => m.as_ref(),
        }
    }
}

impl MilModel for AnyModel {
    fn forward(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        self.as_model().forward(bags, train)
    }

    fn forward_train(
        &self,
        bags: &BagBatch,
        labels: Option<&[usize]>,
    ) -> candle_core::Result<TrainOutput> {
        self.as_model().forward_train(bags, labels)
    }
}

/// A whole MIL model: the shared input layers (standardisation, instance encoder), then the
/// pooling model with its head.
#[derive(Debug, Clone)]
pub struct MilNet {
    pub input: InstanceInput,
    pub pooling: AnyModel,
}

impl MilNet {
    /// The batch the pooling model reads: the same bags with standardised, encoded instances.
    pub fn prepare(&self, bags: &BagBatch, train: bool) -> candle_core::Result<BagBatch> {
        bags.with_instance_features(self.input.forward(bags.features(), train)?)
    }
}

impl MilModel for MilNet {
    fn forward(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        self.pooling.forward(&self.prepare(bags, train)?, train)
    }

    fn forward_train(
        &self,
        bags: &BagBatch,
        labels: Option<&[usize]>,
    ) -> candle_core::Result<TrainOutput> {
        self.pooling
            .forward_train(&self.prepare(bags, true)?, labels)
    }
}

/// Builds the model `config` describes, creating its parameters through `vb`.
pub fn build_model(
    config: &ModelConfig,
    vb: &VarBuilder,
) -> candle_core::Result<Box<dyn MilModel>> {
    Ok(Box::new(build_any(config, vb)?))
}

/// [`build_model`] with the concrete type kept (same parameter names, so checkpoints load).
pub fn build_any(config: &ModelConfig, vb: &VarBuilder) -> candle_core::Result<MilNet> {
    let input = InstanceInput::new(
        config.input_dim,
        config.standardize.as_ref(),
        &config.instance_encoder,
        config.encoder_dropout,
        vb,
    )?;
    Ok(MilNet {
        input,
        pooling: build_pooling(config, vb)?,
    })
}

/// The pooling model and head of `config`, reading [`ModelConfig::pooled_dim`]-wide instances.
fn build_pooling(config: &ModelConfig, vb: &VarBuilder) -> candle_core::Result<AnyModel> {
    use pooling::{head_for, EmbeddingPooling, InstancePooling, Reduce};
    let pooled = ModelConfig {
        input_dim: config.pooled_dim(),
        ..config.clone()
    };
    let c = &pooled;
    let head = |in_dim: usize| head_for(in_dim, c.head_hidden, c.n_classes, c.dropout, vb);
    Ok(match c.pooling {
        Pooling::Sparseconvmil => {
            let head = head(sparse::SparseConvMil::embedding_channels(
                c.input_dim,
                &c.sparse_channels,
            ))?;
            AnyModel::Sparse(sparse::SparseConvMil::new(
                c.input_dim,
                &c.sparse_channels,
                c.sparse_kernel,
                c.sparse_batch_norm,
                c.sparse_pool,
                head,
                vb,
            )?)
        }
        Pooling::InstanceMax => {
            AnyModel::Instance(InstancePooling::new(head(c.input_dim)?, Reduce::Max))
        }
        Pooling::InstanceMean => {
            AnyModel::Instance(InstancePooling::new(head(c.input_dim)?, Reduce::Mean))
        }
        Pooling::InstanceLse => AnyModel::Instance(InstancePooling::new(
            head(c.input_dim)?,
            Reduce::Lse(c.lse_r),
        )),
        Pooling::Max => AnyModel::Embedding(EmbeddingPooling::new(head(c.input_dim)?, Reduce::Max)),
        Pooling::Mean => {
            AnyModel::Embedding(EmbeddingPooling::new(head(c.input_dim)?, Reduce::Mean))
        }
        Pooling::Lse => AnyModel::Embedding(EmbeddingPooling::new(
            head(c.input_dim)?,
            Reduce::Lse(c.lse_r),
        )),
        Pooling::Attention | Pooling::GatedAttention => {
            AnyModel::Attention(attention::AttentionMil::new(
                c.input_dim,
                c.attention_hidden,
                c.pooling == Pooling::GatedAttention,
                head(c.input_dim)?,
                vb,
            )?)
        }
        Pooling::Abmil | Pooling::ClamSb | Pooling::ClamMb => {
            let o = &c.clam_dsmil;
            let clustering = (c.pooling != Pooling::Abmil).then_some(clam::Clustering {
                k: o.clam_k,
                bag_weight: o.clam_bag_weight,
                subtyping: o.clam_subtyping,
            });
            AnyModel::Clam(clam::ClamMil::new(
                c.input_dim,
                o.abmil_hidden,
                o.abmil_dropout,
                c.n_classes,
                c.pooling == Pooling::ClamMb,
                clustering,
                head(c.input_dim)?,
                vb,
            )?)
        }
        // DSMIL's bag classifier is its own linear map of the per-class representation (the
        // paper's `Conv1d(C, C, kernel D)`), whatever `head_hidden` says: with the shared
        // hidden layer on top of the C x D representation it failed to learn the six-class
        // presence task at the default learning rate (docs/defaults-study.md).
        Pooling::Dsmil => AnyModel::Dsmil(dsmil::Dsmil::new(
            c.input_dim,
            c.clam_dsmil.dsmil_query,
            c.n_classes,
            head_for(
                dsmil::Dsmil::head_width(c.input_dim, c.n_classes),
                0,
                c.n_classes,
                c.dropout,
                vb,
            )?,
            vb,
        )?),
        Pooling::Transmil | Pooling::TransmilMap => {
            let layout = if c.pooling == Pooling::TransmilMap {
                transmil::PpegLayout::Map
            } else {
                transmil::PpegLayout::Square
            };
            AnyModel::TransMil(Box::new(transmil::TransMil::new(
                c.input_dim,
                nystrom::NystromConfig::transmil(c.input_dim),
                layout,
                head(c.input_dim)?,
                vb,
            )?))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn every_pooling_builds_and_gives_one_row_of_logits_per_bag() {
        let dev = Device::Cpu;
        let bags: Vec<Bag> = (0..3)
            .map(|b| {
                let n = 2 + b;
                Bag {
                    slide_id: format!("s{b}"),
                    label_index: b % 2,
                    split: Split::Train,
                    dim: 4,
                    embeddings: (0..n * 4).map(|v| (v as f32 * 0.37).sin()).collect(),
                    positions: Some((0..n as i64).map(|k| [k, 2 * k]).collect()),
                    pixels: None,
                }
            })
            .collect();
        let refs: Vec<&Bag> = bags.iter().collect();
        let batch = BagBatch::from_bags(&refs, &dev).unwrap();
        for pooling in Pooling::ALL {
            let config = ModelConfig {
                pooling,
                input_dim: 4,
                n_classes: 3,
                head_hidden: 5,
                dropout: 0.0,
                sparse_channels: vec![6, 6],
                sparse_kernel: 3,
                sparse_batch_norm: true,
                sparse_pool: GlobalPool::Avg,
                attention_hidden: 7,
                lse_r: 1.0,
                instance_encoder: vec![5],
                encoder_dropout: 0.1,
                standardize: None,
                clam_dsmil: Default::default(),
            };
            let vars = VarMap::new();
            let vb = init::seeded_var_builder(&vars, 0, &dev);
            let model = build_model(&config, &vb).unwrap();
            let logits = model.forward(&batch, true).unwrap();
            assert_eq!(logits.dims(), &[3, 3], "{}", pooling.name());
            let v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{}", pooling.name());
        }
    }

    fn config(pooling: Pooling, encoder: Vec<usize>) -> ModelConfig {
        ModelConfig {
            pooling,
            input_dim: 10,
            n_classes: 3,
            head_hidden: 4,
            dropout: 0.0,
            sparse_channels: vec![6, 5],
            sparse_kernel: 3,
            sparse_batch_norm: false,
            sparse_pool: GlobalPool::Avg,
            attention_hidden: 7,
            lse_r: 1.0,
            instance_encoder: encoder,
            encoder_dropout: 0.0,
            standardize: None,
            clam_dsmil: Default::default(),
        }
    }

    /// Hand-counted parameters of every model, with and without the shared encoder: the
    /// encoder and the head are the same for every model reading the same width.
    #[test]
    fn parameter_counts_per_model_by_hand() {
        let lin = |i: usize, o: usize| i * o + o;
        for encoder in [vec![], vec![8], vec![12, 8]] {
            let width = encoder.last().copied().unwrap_or(10);
            let enc = match encoder.as_slice() {
                [] => 0,
                [a] => lin(10, *a),
                [a, b] => lin(10, *a) + lin(*a, *b),
                _ => unreachable!(),
            };
            let head = |d: usize| lin(d, 4) + lin(4, 3);
            for pooling in Pooling::ALL {
                let (pool, head_in) = match pooling {
                    Pooling::Sparseconvmil => (9 * width * 6 + 6 + 9 * 6 * 5 + 5, 5),
                    Pooling::Attention => (lin(width, 7) + lin(7, 1), width),
                    Pooling::GatedAttention => (2 * lin(width, 7) + lin(7, 1), width),
                    // CLAM's sizes by default: 256 attention units, one 2-way instance
                    // classifier per class.
                    Pooling::Abmil => (2 * lin(width, 256) + lin(256, 1), width),
                    Pooling::ClamSb => {
                        (2 * lin(width, 256) + lin(256, 1) + 3 * lin(width, 2), width)
                    }
                    Pooling::ClamMb => {
                        (2 * lin(width, 256) + lin(256, 3) + 3 * lin(width, 2), width)
                    }
                    // Instance classifier, 128-unit query network; the head reads C x width.
                    Pooling::Dsmil => (lin(width, 3) + lin(width, 128) + lin(128, 128), 3 * width),
                    Pooling::Transmil | Pooling::TransmilMap => {
                        // 8 heads of max(d / 8, 1), no qkv bias; res_conv 8 x 33; PPEG
                        // depthwise 7x7, 5x5, 3x3 with bias; three layer norms; class token.
                        let d = width;
                        let inner = 8 * (d / 8).max(1);
                        let layer = 2 * d + 3 * inner * d + lin(inner, d) + 8 * 33;
                        let ppeg = d * (49 + 25 + 9) + 3 * d;
                        (d + 2 * layer + ppeg + 2 * d, width)
                    }
                    _ => (0, width),
                };
                let c = config(pooling, encoder.clone()).parameter_counts().unwrap();
                // DSMIL's bag classifier: one linear map of C x width, no hidden layer.
                let head = if pooling == Pooling::Dsmil {
                    lin(head_in, 3)
                } else {
                    head(head_in)
                };
                let expected = ParameterCounts {
                    encoder: enc,
                    pooling: pool,
                    head,
                    embedder: 0,
                    total: enc + pool + head,
                };
                assert_eq!(c, expected, "{} with encoder {encoder:?}", pooling.name());
            }
        }
    }

    /// The encoder widens or narrows what the pooling reads; the logits keep their shape.
    #[test]
    fn encoder_output_feeds_the_pooling() {
        let dev = Device::Cpu;
        let bag = Bag {
            slide_id: "s".into(),
            label_index: 0,
            split: Split::Train,
            dim: 10,
            embeddings: (0..40).map(|v| (v as f32 * 0.21).cos()).collect(),
            positions: Some(vec![[0, 0], [0, 1], [1, 0], [3, 3]]),
            pixels: None,
        };
        let batch = BagBatch::from_bags(&[&bag], &dev).unwrap();
        for pooling in Pooling::ALL {
            let vars = VarMap::new();
            let vb = init::seeded_var_builder(&vars, 2, &dev);
            let net = build_any(&config(pooling, vec![16, 6]), &vb).unwrap();
            let prepared = net.prepare(&batch, false).unwrap();
            assert_eq!(prepared.features().dims(), &[4, 6], "{}", pooling.name());
            assert_eq!(
                net.forward(&batch, false).unwrap().dims(),
                &[1, 3],
                "{}",
                pooling.name()
            );
        }
    }
}
