//! ABMIL as CLAM configures it, and CLAM-SB / CLAM-MB (Lu et al., Nature BME 2021).
//!
//! Followed: mahmoodlab/CLAM `models/model_clam.py` (`Attn_Net_Gated`, `CLAM_SB`, `CLAM_MB`,
//! `inst_eval`, `inst_eval_out`) and its training loop (`total_loss = bag_weight * loss +
//! (1 - bag_weight) * instance_loss`, bag weight 0.7, k_sample 8). In tessera the shared
//! instance encoder plays CLAM's `fc` (Linear(D, 512) + ReLU + Dropout: set
//! `instance_encoder: [512]`, `encoder_dropout: 0.25` for CLAM's exact sizes) and the shared
//! head plays its bag classifier, so only the pooling differs between models:
//! - the gated attention network `a = tanh(V h)`, `b = sigmoid(U h)` (each followed by
//!   dropout in training), `A = W (a * b)` with one output per branch;
//! - CLAM-SB: one branch, bag embedding `sum_k softmax(A)_k h_k`, head;
//! - CLAM-MB: one branch per class, class `c`'s score is the head's `c`-th output on branch
//!   `c`'s embedding (with a one-layer head exactly CLAM's independent per-class linear layers);
//! - instance-level clustering (CLAM-SB/MB, classification only): for the true class's branch
//!   the `k` most attended instances are pseudo-labelled positive and the `k` least attended
//!   negative for that class's binary instance classifier; with `subtyping` the other classes'
//!   classifiers also learn the top-`k` of their own branch as negatives, and the loss is
//!   averaged over classes. CLAM's default instance loss is a smooth top-1 SVM; tessera uses
//!   cross-entropy (CLAM's `--inst_loss ce`).
//!
//! `abmil` is the same attention network and pooling without instance clustering.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::bag::{BagBatch, Padded};
use super::head::{torch_linear, Head};
use super::pooling::masked_softmax;
use super::{AuxiliaryLoss, MilModel, TrainOutput};

/// CLAM's instance-level clustering settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clustering {
    /// Instances pseudo-labelled per side (CLAM's `k_sample`).
    pub k: usize,
    /// Weight of the bag loss; the instance loss gets `1 - bag_weight`.
    pub bag_weight: f64,
    /// Out-of-class branches also learn their top-`k` as negatives (CLAM's `subtyping`).
    pub subtyping: bool,
}

/// The gated attention network with `branches` outputs, CLAM's `Attn_Net_Gated`.
#[derive(Debug, Clone)]
struct GatedAttention {
    a: Linear,
    b: Linear,
    c: Linear,
    dropout: f32,
}

impl GatedAttention {
    fn new(
        in_dim: usize,
        hidden: usize,
        branches: usize,
        dropout: f32,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(GatedAttention {
            a: torch_linear(in_dim, hidden, true, vb.pp("attention_a"))?,
            b: torch_linear(in_dim, hidden, true, vb.pp("attention_b"))?,
            c: torch_linear(hidden, branches, true, vb.pp("attention_c"))?,
            dropout,
        })
    }

    /// Raw attention logits `[B, K, branches]`.
    fn logits(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let drop = |t: Tensor| -> candle_core::Result<Tensor> {
            if train && self.dropout > 0.0 {
                candle_nn::ops::dropout(&t, self.dropout)
            } else {
                Ok(t)
            }
        };
        let a = drop(self.a.forward(x)?.tanh()?)?;
        let b = drop(candle_nn::ops::sigmoid(&self.b.forward(x)?)?)?;
        self.c.forward(&(a * b)?)
    }
}

/// ABMIL / CLAM-SB / CLAM-MB (see the module documentation).
#[derive(Debug, Clone)]
pub struct ClamMil {
    attention: GatedAttention,
    /// One binary classifier per class, when instance clustering is on.
    instance_classifiers: Vec<Linear>,
    clustering: Option<Clustering>,
    multi_branch: bool,
    n_classes: usize,
    head: Head,
}

impl ClamMil {
    /// Parameters under `vb.pp("clam")` (`attention_a/b/c`, `instance_classifiers.{c}`), head
    /// under `vb.pp("head")` (built by the caller). `clustering: None` is ABMIL.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_dim: usize,
        hidden: usize,
        dropout: f32,
        n_classes: usize,
        multi_branch: bool,
        clustering: Option<Clustering>,
        head: Head,
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let vb = vb.pp("clam");
        let branches = if multi_branch { n_classes } else { 1 };
        let attention = GatedAttention::new(in_dim, hidden, branches, dropout, vb.clone())?;
        let instance_classifiers = match clustering {
            Some(_) => (0..n_classes)
                .map(|c| torch_linear(in_dim, 2, true, vb.pp("instance_classifiers").pp(c)))
                .collect::<candle_core::Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        Ok(ClamMil {
            attention,
            instance_classifiers,
            clustering,
            multi_branch,
            n_classes,
            head,
        })
    }

    /// Attention weights `[B, K_max, branches]` (softmax over each bag, zero on padding): one
    /// column for ABMIL and CLAM-SB, one per class for CLAM-MB.
    pub fn weights(&self, bags: &BagBatch) -> candle_core::Result<Tensor> {
        let p = bags.padded()?;
        masked_softmax(&p, &self.attention.logits(&p.x, false)?)
    }

    /// Bag scores `[B, C]` from softmaxed attention `[B, K, branches]`.
    fn scores(&self, p: &Padded, weights: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        // [B, branches, D]
        let pooled = weights.transpose(1, 2)?.contiguous()?.matmul(&p.x)?;
        if !self.multi_branch {
            return self.head.forward(&pooled.squeeze(1)?, train);
        }
        // Branch c's embedding scored by the head's output c.
        let all = self.head.forward(&pooled, train)?; // [B, C, C]
        let eye = Tensor::eye(self.n_classes, all.dtype(), all.device())?;
        all.broadcast_mul(&eye)?.sum(D::Minus1)
    }

    /// CLAM's instance loss, averaged over the bags of the batch.
    fn instance_loss(
        &self,
        p: &Padded,
        bags: &BagBatch,
        weights: &Tensor,
        labels: &[usize],
        clustering: Clustering,
    ) -> candle_core::Result<Tensor> {
        let attention: Vec<Vec<Vec<f32>>> = weights.detach().to_dtype(DType::F32)?.to_vec3()?;
        let mut total: Option<Tensor> = None;
        for (b, (&len, &label)) in bags.lengths().iter().zip(labels).enumerate() {
            let x = p.x.get(b)?.narrow(0, 0, len)?;
            let mut bag_loss: Option<Tensor> = None;
            for (c, classifier) in self.instance_classifiers.iter().enumerate() {
                let in_class = c == label;
                if !in_class && !clustering.subtyping {
                    continue;
                }
                let branch = if self.multi_branch { c } else { 0 };
                let a: Vec<f32> = attention[b][..len].iter().map(|r| r[branch]).collect();
                let k = clustering.k.min(len);
                let (top, bottom) = top_bottom(&a, k);
                let (ids, targets): (Vec<u32>, Vec<u32>) = if in_class {
                    let mut ids = top.clone();
                    ids.extend(&bottom);
                    let mut t = vec![1u32; top.len()];
                    t.extend(std::iter::repeat_n(0u32, bottom.len()));
                    (ids, t)
                } else {
                    (top.clone(), vec![0u32; top.len()])
                };
                let n = ids.len();
                let ids = Tensor::from_vec(ids, n, x.device())?;
                let logits = classifier.forward(&x.index_select(&ids, 0)?)?;
                let targets = Tensor::from_vec(targets, n, x.device())?;
                let ce = candle_nn::loss::cross_entropy(&logits, &targets)?;
                bag_loss = Some(match bag_loss {
                    None => ce,
                    Some(l) => (l + ce)?,
                });
            }
            let Some(mut l) = bag_loss else { continue };
            if clustering.subtyping {
                l = (l / self.n_classes as f64)?;
            }
            total = Some(match total {
                None => l,
                Some(t) => (t + l)?,
            });
        }
        match total {
            Some(t) => t / bags.batch_size() as f64,
            None => Tensor::zeros((), p.x.dtype(), p.x.device()),
        }
    }
}

/// Indices of the `k` largest and the `k` smallest values (ties: the earlier index first), as
/// `torch.topk` on a 1-D tensor.
pub fn top_bottom(values: &[f32], k: usize) -> (Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    order.sort_by(|&i, &j| {
        values[j as usize]
            .total_cmp(&values[i as usize])
            .then(i.cmp(&j))
    });
    let top = order[..k].to_vec();
    let mut ascending: Vec<u32> = (0..values.len() as u32).collect();
    ascending.sort_by(|&i, &j| {
        values[i as usize]
            .total_cmp(&values[j as usize])
            .then(i.cmp(&j))
    });
    (top, ascending[..k].to_vec())
}

impl MilModel for ClamMil {
    fn forward(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        let p = bags.padded()?;
        let weights = masked_softmax(&p, &self.attention.logits(&p.x, train)?)?;
        self.scores(&p, &weights, train)
    }

    fn forward_train(
        &self,
        bags: &BagBatch,
        labels: Option<&[usize]>,
    ) -> candle_core::Result<TrainOutput> {
        let p = bags.padded()?;
        let weights = masked_softmax(&p, &self.attention.logits(&p.x, true)?)?;
        let outputs = self.scores(&p, &weights, true)?;
        match (self.clustering, labels) {
            (Some(clustering), Some(labels)) => {
                let loss = self.instance_loss(&p, bags, &weights, labels, clustering)?;
                Ok(TrainOutput {
                    outputs,
                    task_weight: clustering.bag_weight,
                    auxiliary: vec![AuxiliaryLoss::Value {
                        loss,
                        weight: 1.0 - clustering.bag_weight,
                    }],
                })
            }
            _ => Ok(TrainOutput::plain(outputs)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::reference::{self as r, Params};
    use crate::models::{build_any, init, AnyModel, ClamDsmilOptions, ModelConfig, Pooling};
    use crate::train::epochs::total_loss;
    use crate::train::objective::Objective;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn config(
        pooling: Pooling,
        n_classes: usize,
        subtyping: bool,
        head_hidden: usize,
    ) -> ModelConfig {
        let options = ClamDsmilOptions {
            abmil_hidden: 6,
            abmil_dropout: 0.0,
            clam_k: 2,
            clam_subtyping: subtyping,
            ..ClamDsmilOptions::DEFAULT
        };
        r::config(pooling, n_classes, head_hidden, options)
    }

    /// The whole training loss (bag cross-entropy weighted 0.7 plus CLAM's instance loss
    /// weighted 0.3, mean over bags) and its gradient with respect to every parameter, against
    /// the f64 formulation and central differences; the logits against the f64 forward.
    fn check_against_reference(
        pooling: Pooling,
        n_classes: usize,
        subtyping: bool,
        head_hidden: usize,
    ) {
        let dev = Device::Cpu;
        let cfg = config(pooling, n_classes, subtyping, head_hidden);
        let vars = VarMap::new();
        let net = build_any(&cfg, &init::seeded_var_builder(&vars, 11, &dev)).unwrap();
        let labels: Vec<usize> = (0..3).map(|b| (b + 1) % n_classes).collect();
        let bags = r::test_bags(&[5, 3, 6], 4, &labels);
        let refs: Vec<&crate::models::Bag> = bags.iter().collect();
        let batch = BagBatch::from_bags(&refs, &dev).unwrap();
        let out = net.forward_train(&batch, Some(&labels)).unwrap();
        let loss = total_loss(&Objective::Classification, &out, &refs, None, &dev).unwrap();
        let multi = pooling == Pooling::ClamMb;
        let clustering = pooling != Pooling::Abmil;
        let reference = |p: &Params| -> f64 {
            bags.iter()
                .zip(&labels)
                .map(|(bag, &label)| {
                    let h = r::rows(bag);
                    let ce = r::cross_entropy(&r::clam_logits(p, &h, n_classes, multi), label);
                    if clustering {
                        0.7 * ce
                            + 0.3
                                * r::clam_instance_loss(
                                    p, &h, label, n_classes, multi, 2, subtyping,
                                )
                    } else {
                        ce
                    }
                })
                .sum::<f64>()
                / bags.len() as f64
        };
        let p = r::params_of(&vars);
        let expected = reference(&p);
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!(
            (got - expected).abs() < 1e-5 * expected.abs().max(1.0),
            "{}: loss {got} vs {expected}",
            pooling.name()
        );
        let logits = net
            .forward(&batch, false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (bag, row) in bags.iter().zip(&logits) {
            let e = r::clam_logits(&p, &r::rows(bag), n_classes, multi);
            for (g, e) in row.iter().zip(&e) {
                assert!(
                    (f64::from(*g) - e).abs() < 1e-5,
                    "{}: logit {g} vs {e}",
                    pooling.name()
                );
            }
        }
        let grads = loss.backward().unwrap();
        r::assert_gradients_match(&vars, &grads, &r::numeric_gradient(&p, reference));
    }

    #[test]
    fn abmil_matches_the_f64_formulation() {
        check_against_reference(Pooling::Abmil, 3, false, 5);
    }

    #[test]
    fn clam_sb_loss_and_gradients_match_the_f64_formulation() {
        check_against_reference(Pooling::ClamSb, 2, false, 5);
        check_against_reference(Pooling::ClamSb, 3, true, 0);
    }

    #[test]
    fn clam_mb_loss_and_gradients_match_the_f64_formulation() {
        check_against_reference(Pooling::ClamMb, 3, false, 0);
        check_against_reference(Pooling::ClamMb, 3, true, 5);
    }

    /// A hand-computed case: 4 instances, k = 1, label 1 of 2, subtyping off. Attention ranks
    /// instance 2 highest and 0 lowest; only class 1's instance classifier learns, with
    /// instance 2 positive and instance 0 negative.
    #[test]
    fn top_and_bottom_instances_by_hand() {
        assert_eq!(top_bottom(&[0.1, 0.5, 0.9, 0.3], 1), (vec![2], vec![0]));
        assert_eq!(top_bottom(&[0.2, 0.2, 0.1], 2), (vec![0, 1], vec![2, 0]));
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = init::seeded_var_builder(&vars, 0, &dev);
        let head = Head::new(1, 0, 2, 0.0, vb.pp("head")).unwrap();
        let model = ClamMil::new(
            1,
            1,
            0.0,
            2,
            false,
            Some(Clustering {
                k: 1,
                bag_weight: 0.7,
                subtyping: false,
            }),
            head,
            &vb,
        )
        .unwrap();
        // attention_c = identity of a*b with a = tanh(x), b = sigmoid(0) = 1/2: increasing in x.
        let set = |name: &str, v: f32| {
            let data = vars.data().lock().unwrap();
            data[name]
                .set(
                    &Tensor::new(&[v], &dev)
                        .unwrap()
                        .reshape(data[name].shape())
                        .unwrap(),
                )
                .unwrap();
        };
        set("clam.attention_a.weight", 1.0);
        set("clam.attention_a.bias", 0.0);
        set("clam.attention_b.weight", 0.0);
        set("clam.attention_b.bias", 0.0);
        set("clam.attention_c.weight", 1.0);
        set("clam.attention_c.bias", 0.0);
        // Class 1's classifier: logits (0, x), so p(positive) = sigmoid(x).
        for (name, w) in [
            ("clam.instance_classifiers.1.weight", [0f32, 1.0]),
            ("clam.instance_classifiers.0.weight", [3.0, -2.0]),
        ] {
            let data = vars.data().lock().unwrap();
            data[name]
                .set(&Tensor::new(&w, &dev).unwrap().reshape((2, 1)).unwrap())
                .unwrap();
        }
        for name in [
            "clam.instance_classifiers.0.bias",
            "clam.instance_classifiers.1.bias",
        ] {
            let data = vars.data().lock().unwrap();
            data[name]
                .set(&Tensor::zeros(2, DType::F32, &dev).unwrap())
                .unwrap();
        }
        let bag = crate::models::Bag {
            slide_id: "s".into(),
            label_index: 1,
            split: crate::models::Split::Train,
            dim: 1,
            embeddings: vec![-1.0, 0.5, 2.0, 0.0].into(),
            positions: None,
            pixels: None,
        };
        let batch = BagBatch::from_bags(&[&bag], &dev).unwrap();
        let out = model.forward_train(&batch, Some(&[1])).unwrap();
        assert_eq!(out.task_weight, 0.7);
        let AuxiliaryLoss::Value { loss, weight } = &out.auxiliary[0] else {
            panic!("CLAM adds a ready loss")
        };
        assert!((weight - 0.3).abs() < 1e-12);
        // Positive x = 2: -ln sigmoid(2); negative x = -1: -ln(1 - sigmoid(-1)) = -ln sigmoid(1).
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let expected = (-(sig(2.0)).ln() - sig(1.0).ln()) / 2.0;
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    /// Without labels (survival, regression) CLAM trains on the bag loss alone.
    #[test]
    fn clustering_needs_labels() {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let net = build_any(
            &config(Pooling::ClamSb, 2, false, 0),
            &init::seeded_var_builder(&vars, 1, &dev),
        )
        .unwrap();
        let bags = r::test_bags(&[4], 4, &[0]);
        let batch = BagBatch::from_bags(&[&bags[0]], &dev).unwrap();
        let out = net.forward_train(&batch, None).unwrap();
        assert_eq!(out.task_weight, 1.0);
        assert!(out.auxiliary.is_empty());
    }

    /// Attention weights are a distribution over each bag, one column per branch.
    #[test]
    fn weights_per_branch() {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let AnyModel::Clam(m) = build_any(
            &config(Pooling::ClamMb, 3, true, 0),
            &init::seeded_var_builder(&vars, 2, &dev),
        )
        .unwrap()
        .pooling
        else {
            panic!("clam_mb builds a ClamMil")
        };
        let bags = r::test_bags(&[4, 2], 4, &[0, 1]);
        let batch = BagBatch::from_bags(&[&bags[0], &bags[1]], &dev).unwrap();
        let w = m.weights(&batch).unwrap().to_vec3::<f32>().unwrap();
        for c in 0..3 {
            let s: f32 = w[0].iter().map(|r| r[c]).sum();
            assert!((s - 1.0).abs() < 1e-5);
            assert_eq!(w[1][2][c], 0.0);
            assert_eq!(w[1][3][c], 0.0);
        }
    }
}
