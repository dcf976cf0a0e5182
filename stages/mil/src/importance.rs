//! Per-instance importance of a trained MIL model: which tiles drive a slide's scores.
//!
//! Each model family gets the explanation that fits its architecture ([`Method`]):
//! - **SparseConvMIL**: class activation mapping on the sparse map, Grad-CAM style. `A` is the
//!   output of the last sparse block (conv, batch-norm, ReLU), one row per occupied site; the
//!   score of site `s` for class `c` is `sum_k dlogit_c/dA[s,k] * A[s,k]`. With global average
//!   pooling and a linear head this is exactly CAM (`(1/N) sum_k w_ck A[s,k]`); with the MLP
//!   head or max pooling it is its first-order generalisation. Scores are signed: positive
//!   sites push the class logit up, negative ones down.
//! - **attention / gated_attention / abmil / clam_sb**: the attention weights (softmax over
//!   the bag, summing to 1). They are class-agnostic: the same value is reported for every
//!   class.
//! - **clam_mb / dsmil**: the attention weights of each class's branch (CLAM-MB's per-class
//!   attention, DSMIL's attention to each class's critical instance), one column per class.
//! - **transmil / transmil_map**: the class token's attention to each instance in the last
//!   transformer layer, mean over heads (the Nystrom approximation of the attention matrix;
//!   tokens added by padding dropped). Class-agnostic, like the attention weights, but they
//!   need not sum to 1 and can be slightly negative.
//! - **instance_max / instance_mean / instance_lse**: each instance's class logits from the
//!   shared head, the very scores the model pools.
//! - **max / mean / lse** (embedding pooling): gradient x input saliency,
//!   `sum_d dlogit_c/dx[i,d] * x[i,d]` for instance embedding `x[i]`.
//!
//! Gradients with respect to an intermediate tensor are taken by re-rooting the graph: the
//! tensor is detached, wrapped in a `Var`, the rest of the forward pass runs from it, and the
//! class logit is back-propagated; the `Var`'s gradient is then read from the gradient store.

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_nn::VarMap;

use crate::models::bag::BagError;
use crate::models::init::seeded_var_builder;
use crate::models::{build_any, AnyModel, Bag, BagBatch, MilModel, MilNet, Pooling};
use crate::train::checkpoint::{self, CheckpointError, CheckpointFiles, CheckpointMeta};

/// How importance is computed (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Gradient x activation at the last sparse layer (SparseConvMIL).
    GradCam,
    /// Attention weights (attention, gated_attention, abmil, clam_sb).
    Attention,
    /// Attention weights of each class's branch (clam_mb, dsmil).
    BranchAttention,
    /// The class token's last-layer attention to each instance (transmil, transmil_map).
    ClsAttention,
    /// Per-instance class logits (instance_max/mean/lse).
    InstanceScores,
    /// Gradient x input saliency (max/mean/lse embedding pooling).
    GradientInput,
}

impl Method {
    /// The method a model family is explained with.
    pub fn for_pooling(pooling: Pooling) -> Method {
        match pooling {
            Pooling::Sparseconvmil => Method::GradCam,
            Pooling::Attention | Pooling::GatedAttention | Pooling::Abmil | Pooling::ClamSb => {
                Method::Attention
            }
            Pooling::ClamMb | Pooling::Dsmil => Method::BranchAttention,
            Pooling::InstanceMax | Pooling::InstanceMean | Pooling::InstanceLse => {
                Method::InstanceScores
            }
            Pooling::Max | Pooling::Mean | Pooling::Lse => Method::GradientInput,
            Pooling::Transmil | Pooling::TransmilMap => Method::ClsAttention,
        }
    }

    /// Name written into output metadata.
    pub fn name(self) -> &'static str {
        match self {
            Method::GradCam => "grad_cam",
            Method::Attention => "attention",
            Method::BranchAttention => "branch_attention",
            Method::ClsAttention => "cls_attention",
            Method::InstanceScores => "instance_scores",
            Method::GradientInput => "gradient_x_input",
        }
    }

    /// False when every class gets the same score (attention weights).
    pub fn class_specific(self) -> bool {
        !matches!(self, Method::Attention | Method::ClsAttention)
    }
}

/// Why importance could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ImportanceError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Bag(#[from] BagError),
    #[error("{context}: {source}")]
    Candle {
        context: String,
        source: candle_core::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

trait Context<T> {
    fn context(self, what: &str) -> Result<T, ImportanceError>;
}

impl<T> Context<T> for candle_core::Result<T> {
    fn context(self, what: &str) -> Result<T, ImportanceError> {
        self.map_err(|source| ImportanceError::Candle {
            context: what.to_string(),
            source,
        })
    }
}

/// A trained model read back from its checkpoint, ready for inference.
pub struct LoadedModel {
    pub meta: CheckpointMeta,
    pub model: MilNet,
    pub device: Device,
    /// Keeps the parameters alive.
    _vars: VarMap,
}

impl LoadedModel {
    /// Reads checkpoint `files` (its JSON describes the architecture and classes).
    pub fn load(files: &CheckpointFiles, device: &Device) -> Result<Self, ImportanceError> {
        let meta = checkpoint::read_meta(files)?;
        let mut vars = VarMap::new();
        let vb = seeded_var_builder(&vars, 0, device);
        let model = build_any(&meta.model, &vb).context("building the checkpoint's model")?;
        checkpoint::load_into(files, &mut vars, None)?;
        Ok(LoadedModel {
            meta,
            model,
            device: device.clone(),
            _vars: vars,
        })
    }

    /// The method this model is explained with.
    pub fn method(&self) -> Method {
        Method::for_pooling(self.meta.model.pooling)
    }

    /// Importance of every instance of `bag` (see [`importance`]).
    pub fn explain(&self, bag: &Bag) -> Result<Importance, ImportanceError> {
        importance(&self.model, bag, &self.device)
    }
}

/// The importance of a bag's instances.
#[derive(Debug, Clone, PartialEq)]
pub struct Importance {
    pub method: Method,
    pub n_classes: usize,
    /// Row-major `[instances, classes]`, in the bag's instance order.
    pub scores: Vec<f32>,
    /// The bag's class probabilities (evaluation mode).
    pub probs: Vec<f32>,
}

impl Importance {
    /// Scores of one instance, one per class.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.scores[i * self.n_classes..(i + 1) * self.n_classes]
    }

    /// The predicted class.
    pub fn predicted(&self) -> usize {
        crate::train::epochs::argmax(&self.probs)
    }
}

/// Importance of each instance of `bag` for each class, by the method that fits `model`.
/// Spatial models need positions on distinct cells (merge collisions first, as the
/// `sparse_map` stage does): every instance must keep its own site to receive a score.
pub fn importance(
    model: &MilNet,
    bag: &Bag,
    device: &Device,
) -> Result<Importance, ImportanceError> {
    let batch = BagBatch::from_bags(&[bag], device)?;
    if batch.duplicate_sites() > 0 {
        return Err(ImportanceError::Invalid(format!(
            "slide `{}`: {} instances share a sparse-map cell with another; merge them first",
            bag.slide_id,
            batch.duplicate_sites()
        )));
    }
    // What the pooling reads (standardised, encoded): the scores below explain it.
    let batch = model
        .prepare(&batch, false)
        .context("the instance encoder")?;
    let logits = model
        .pooling
        .forward(&batch, false)
        .context("the forward pass")?;
    let n_classes = logits.dim(1).context("the logits")?;
    let probs = candle_nn::ops::softmax(&logits.detach(), D::Minus1)
        .and_then(|p| p.i(0)?.to_dtype(DType::F32)?.to_vec1::<f32>())
        .context("the class probabilities")?;
    let n = bag.len();
    let (method, per_class): (Method, Vec<Vec<f32>>) = match &model.pooling {
        AnyModel::Sparse(m) => {
            let x = m.activations(&batch, false).context("the sparse CNN")?;
            let a = Var::from_tensor(&x.features().detach()).context("the activations")?;
            let rooted = x
                .with_features(a.as_tensor().clone())
                .context("the activations")?;
            let logits = m.classify(&rooted, false).context("the sparse head")?;
            (
                Method::GradCam,
                grad_times(&logits, &a, n_classes, "gradient x activation")?,
            )
        }
        AnyModel::Embedding(m) => {
            let x = Var::from_tensor(&batch.features().detach()).context("the embeddings")?;
            let rooted = batch
                .with_features(x.as_tensor().clone())
                .context("the embeddings")?;
            let logits = m.forward(&rooted, false).context("the forward pass")?;
            (
                Method::GradientInput,
                grad_times(&logits, &x, n_classes, "gradient x input")?,
            )
        }
        AnyModel::Attention(m) => {
            let w = m
                .weights(&batch)
                .and_then(|w| w.flatten_all()?.to_vec1::<f32>())
                .context("the attention weights")?;
            (Method::Attention, vec![w; n_classes])
        }
        AnyModel::Clam(m) => {
            // [1, K, branches]: one branch (ABMIL, CLAM-SB) or one per class (CLAM-MB).
            let w = m
                .weights(&batch)
                .and_then(|w| w.squeeze(0)?.to_vec2::<f32>())
                .context("the attention weights")?;
            if w.first().is_some_and(|r| r.len() == n_classes) && n_classes > 1 {
                let per_class = (0..n_classes)
                    .map(|c| w.iter().map(|row| row[c]).collect())
                    .collect();
                (Method::BranchAttention, per_class)
            } else {
                let column: Vec<f32> = w.iter().map(|row| row[0]).collect();
                (Method::Attention, vec![column; n_classes])
            }
        }
        AnyModel::Dsmil(m) => {
            let a = m
                .attention(&batch)
                .and_then(|a| match a.into_iter().next() {
                    Some(a) => a.to_dtype(DType::F32)?.to_vec2::<f32>(),
                    None => candle_core::bail!("no bag"),
                })
                .context("the attention weights")?;
            let per_class = (0..n_classes)
                .map(|c| a.iter().map(|row| row[c]).collect())
                .collect();
            (Method::BranchAttention, per_class)
        }
        AnyModel::TransMil(m) => {
            let w = m
                .cls_attention(&batch)
                .context("the class token's attention")?
                .into_iter()
                .next()
                .unwrap_or_default();
            (Method::ClsAttention, vec![w; n_classes])
        }
        AnyModel::Instance(m) => {
            let s = m
                .instance_scores(&batch)
                .and_then(|s| s.squeeze(0)?.to_vec2::<f32>())
                .context("the instance scores")?;
            let per_class = (0..n_classes)
                .map(|c| s.iter().map(|row| row[c]).collect())
                .collect();
            (Method::InstanceScores, per_class)
        }
    };
    let mut scores = vec![0f32; n * n_classes];
    for (c, column) in per_class.iter().enumerate() {
        if column.len() != n {
            return Err(ImportanceError::Invalid(format!(
                "slide `{}`: {} scores for {n} instances",
                bag.slide_id,
                column.len()
            )));
        }
        for (i, v) in column.iter().enumerate() {
            scores[i * n_classes + c] = *v;
        }
    }
    Ok(Importance {
        method,
        n_classes,
        scores,
        probs,
    })
}

/// For each class `c`: `sum_k dlogit_c/dx[i,k] * x[i,k]` per row `i` of `x`.
fn grad_times(
    logits: &Tensor,
    x: &Var,
    n_classes: usize,
    what: &str,
) -> Result<Vec<Vec<f32>>, ImportanceError> {
    (0..n_classes)
        .map(|c| {
            let grads = logits.i((0, c))?.backward()?;
            let g = match grads.get(x.as_tensor()) {
                Some(g) => g.clone(),
                // The logit does not depend on x (e.g. a dead ReLU everywhere).
                None => x.as_tensor().zeros_like()?,
            };
            (g * x.as_tensor())?
                .sum(1)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .context(what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{GlobalPool, ModelConfig, Split};

    fn config(pooling: Pooling, head_hidden: usize) -> ModelConfig {
        ModelConfig {
            pooling,
            input_dim: 3,
            n_classes: 2,
            head_hidden,
            dropout: 0.0,
            sparse_channels: vec![4, 5],
            sparse_kernel: 3,
            sparse_batch_norm: false,
            sparse_pool: GlobalPool::Avg,
            attention_hidden: 6,
            lse_r: 1.0,
            instance_encoder: Vec::new(),
            encoder_dropout: 0.0,
            standardize: None,
            clam_dsmil: Default::default(),
        }
    }

    fn bag(n: usize) -> Bag {
        Bag {
            slide_id: "s".into(),
            label_index: 0,
            split: Split::Test,
            dim: 3,
            embeddings: (0..n * 3).map(|v| ((v as f32) * 0.71).sin()).collect(),
            positions: Some((0..n as i64).map(|k| [k / 3, k % 3]).collect()),
            pixels: None,
        }
    }

    fn model(c: &ModelConfig, seed: u64) -> (MilNet, VarMap) {
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, seed, &Device::Cpu);
        (build_any(c, &vb).unwrap(), vars)
    }

    /// Oracle: central finite differences of the class logit with respect to each activation
    /// of the last sparse layer, multiplied by that activation and summed over channels.
    #[test]
    fn grad_cam_matches_finite_differences_of_the_logit() {
        let dev = Device::Cpu;
        for (hidden, pool) in [
            (0, GlobalPool::Avg),
            (7, GlobalPool::Avg),
            (7, GlobalPool::Max),
        ] {
            let c = ModelConfig {
                sparse_pool: pool,
                ..config(Pooling::Sparseconvmil, hidden)
            };
            let (m, _vars) = model(&c, 3);
            let AnyModel::Sparse(sparse) = &m.pooling else {
                panic!("not sparse")
            };
            let b = bag(7);
            let got = importance(&m, &b, &dev).unwrap();
            assert_eq!(got.method, Method::GradCam);
            let batch = BagBatch::from_bags(&[&b], &dev).unwrap();
            let x = sparse.activations(&batch, false).unwrap();
            let a = x.features().to_dtype(DType::F64).unwrap();
            let a = a.to_vec2::<f64>().unwrap();
            let logit = |values: &[Vec<f64>], class: usize| -> f64 {
                let t = Tensor::new(values.to_vec(), &dev)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let l = sparse
                    .classify(&x.with_features(t).unwrap(), false)
                    .unwrap();
                l.i((0, class)).unwrap().to_scalar::<f32>().unwrap() as f64
            };
            let eps = 1e-2;
            for class in 0..2 {
                for s in 0..a.len() {
                    let mut expected = 0.0;
                    for k in 0..a[s].len() {
                        let (mut up, mut down) = (a.clone(), a.clone());
                        up[s][k] += eps;
                        down[s][k] -= eps;
                        let g = (logit(&up, class) - logit(&down, class)) / (2.0 * eps);
                        expected += g * a[s][k];
                    }
                    let found = got.row(s)[class] as f64;
                    assert!(
                        (found - expected).abs() < 2e-3 * (1.0 + expected.abs()),
                        "hidden {hidden} {pool:?} class {class} site {s}: {found} vs {expected}"
                    );
                }
            }
        }
    }

    /// With average pooling and a linear head, Grad-CAM is CAM: `(1/N) sum_k w_ck A[s,k]`,
    /// and the scores sum to the logit minus the bias.
    #[test]
    fn grad_cam_with_a_linear_head_is_cam() {
        let dev = Device::Cpu;
        let (m, vars) = model(&config(Pooling::Sparseconvmil, 0), 5);
        let b = bag(6);
        let got = importance(&m, &b, &dev).unwrap();
        let batch = BagBatch::from_bags(&[&b], &dev).unwrap();
        let logits = m.forward(&batch, false).unwrap().to_vec2::<f32>().unwrap();
        let bias = vars.data().lock().unwrap()["head.out.bias"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        for c in 0..2 {
            let total: f32 = (0..6).map(|s| got.row(s)[c]).sum();
            assert!((total - (logits[0][c] - bias[c])).abs() < 1e-4);
        }
        assert!((got.probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn attention_weights_sum_to_one_and_are_class_agnostic() {
        let dev = Device::Cpu;
        for pooling in [Pooling::Attention, Pooling::GatedAttention] {
            let (m, _vars) = model(&config(pooling, 4), 1);
            let got = importance(&m, &bag(9), &dev).unwrap();
            assert_eq!(got.method, Method::Attention);
            let w: Vec<f32> = (0..9).map(|i| got.row(i)[0]).collect();
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{w:?}");
            assert!(w.iter().all(|v| *v > 0.0));
            assert!((0..9).all(|i| got.row(i)[0] == got.row(i)[1]));
        }
    }

    /// Instance scores pool back to the bag's logits (mean pooling: their mean).
    #[test]
    fn instance_scores_pool_to_the_bag_logits() {
        let dev = Device::Cpu;
        let (m, _vars) = model(&config(Pooling::InstanceMean, 4), 2);
        let b = bag(5);
        let got = importance(&m, &b, &dev).unwrap();
        let logits = m
            .forward(&BagBatch::from_bags(&[&b], &dev).unwrap(), false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (c, logit) in logits[0].iter().enumerate() {
            let mean = (0..5).map(|i| got.row(i)[c]).sum::<f32>() / 5.0;
            assert!((mean - logit).abs() < 1e-5);
        }
    }

    /// Gradient x input of mean pooling with a linear head also sums to logit minus bias.
    #[test]
    fn gradient_x_input_of_mean_pooling_sums_to_the_logit() {
        let dev = Device::Cpu;
        let (m, vars) = model(&config(Pooling::Mean, 0), 4);
        let b = bag(4);
        let got = importance(&m, &b, &dev).unwrap();
        assert_eq!(got.method, Method::GradientInput);
        let logits = m
            .forward(&BagBatch::from_bags(&[&b], &dev).unwrap(), false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let bias = vars.data().lock().unwrap()["head.out.bias"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        for c in 0..2 {
            let total: f32 = (0..4).map(|i| got.row(i)[c]).sum();
            assert!((total - (logits[0][c] - bias[c])).abs() < 1e-4);
        }
    }

    /// TransMIL's scores: one per instance (repeated padding tokens dropped), the same for
    /// every class, finite; transmil ignores positions, transmil_map ignores a translation of
    /// the map but not a rearrangement.
    #[test]
    fn cls_attention_scores_one_per_instance_and_invariances() {
        let dev = Device::Cpu;
        for pooling in [Pooling::Transmil, Pooling::TransmilMap] {
            let c = ModelConfig {
                instance_encoder: vec![16],
                ..config(pooling, 4)
            };
            let (m, _vars) = model(&c, 6);
            let b = bag(7);
            let got = importance(&m, &b, &dev).unwrap();
            assert_eq!(got.method, Method::ClsAttention);
            assert!(!got.method.class_specific());
            assert_eq!(got.scores.len(), 7 * 2);
            assert!(got.scores.iter().all(|v| v.is_finite()));
            assert!((0..7).all(|i| got.row(i)[0] == got.row(i)[1]));
            assert!((got.probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            let mut moved = b.clone();
            moved.positions = Some(
                b.positions
                    .as_ref()
                    .unwrap()
                    .iter()
                    .map(|p| [p[0] + 11, p[1] + 3])
                    .collect(),
            );
            assert_eq!(importance(&m, &moved, &dev).unwrap().scores, got.scores);
            let mut spread = b.clone();
            spread.positions = Some((0..7).map(|k| [3 * k, 0]).collect());
            let other = importance(&m, &spread, &dev).unwrap().scores;
            if pooling == Pooling::Transmil {
                assert_eq!(other, got.scores);
                let mut bare = b.clone();
                bare.positions = None;
                assert_eq!(importance(&m, &bare, &dev).unwrap().scores, got.scores);
            } else {
                assert_ne!(other, got.scores);
            }
        }
    }

    #[test]
    fn duplicate_cells_are_refused() {
        let (m, _vars) = model(&config(Pooling::Sparseconvmil, 0), 1);
        let mut b = bag(3);
        b.positions = Some(vec![[0, 0], [0, 0], [1, 1]]);
        let err = importance(&m, &b, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("share a sparse-map cell"), "{err}");
    }
}
