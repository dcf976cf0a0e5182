//! DSMIL (Li, Li & Eliceiri, CVPR 2021): a max-pooling instance branch finds each class's
//! critical instance; a second branch attends to every instance by its distance to it.
//!
//! Followed: binli123/dsmil-wsi `dsmil.py` (`IClassifier`'s `fc`, `BClassifier` with
//! `nonlinear=True`, `passing_v=False`) and `train_tcga.py` (`loss = 0.5 * bag_loss +
//! 0.5 * max_loss`; predictions from the bag branch). Per bag with instances `h [N, D]`:
//! - instance scores `c = h W_i^T + b_i`, `[N, C]`; the max branch's scores are
//!   `max_n c[n, :]`, trained with the task's own loss (weight 0.5);
//! - critical instance of class `j`: `m_j = argmax_n c[n, j]`;
//! - queries `q(h) = tanh(L2(relu(L1 h)))` (128 units); attention of class `j`
//!   `A[:, j] = softmax_n(q(h_n) . q(h_{m_j}) / sqrt(128))`; `V = h`;
//! - bag representation `B = A^T V`, `[C, D]`; DSMIL's bag classifier, a `Conv1d(C, C,
//!   kernel D)`, is a linear map of the flattened `B`: here the shared head reads the
//!   flattened `B` (with a one-layer head exactly DSMIL's).

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::bag::BagBatch;
use super::head::{torch_linear, Head};
use super::{AuxiliaryLoss, MilModel, TrainOutput};

/// Weight of the bag branch's loss (the max branch gets the rest), as DSMIL trains.
pub const DSMIL_BAG_WEIGHT: f64 = 0.5;

/// DSMIL (see the module documentation).
#[derive(Debug, Clone)]
pub struct Dsmil {
    instance: Linear,
    q1: Linear,
    q2: Linear,
    query_dim: usize,
    n_classes: usize,
    head: Head,
}

/// One bag's outputs.
struct BagOutputs {
    /// `[1, C]` from the attention branch.
    bag: Tensor,
    /// `[1, C]` max over instances of the instance scores.
    max: Tensor,
    /// `[N, C]` attention per class.
    attention: Tensor,
}

impl Dsmil {
    /// Width the head reads for `in_dim`-wide instances and `n_classes` classes.
    pub fn head_width(in_dim: usize, n_classes: usize) -> usize {
        in_dim * n_classes
    }

    /// Parameters under `vb.pp("dsmil")` (`instance`, `q1`, `q2`), head under `vb.pp("head")`
    /// reading [`Dsmil::head_width`] features (built by the caller).
    pub fn new(
        in_dim: usize,
        query_dim: usize,
        n_classes: usize,
        head: Head,
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let vb = vb.pp("dsmil");
        Ok(Dsmil {
            instance: torch_linear(in_dim, n_classes, true, vb.pp("instance"))?,
            q1: torch_linear(in_dim, query_dim, true, vb.pp("q1"))?,
            q2: torch_linear(query_dim, query_dim, true, vb.pp("q2"))?,
            query_dim,
            n_classes,
            head,
        })
    }

    fn bag(&self, h: &Tensor, train: bool) -> candle_core::Result<BagOutputs> {
        let scores = self.instance.forward(h)?; // [N, C]
        let max = scores.max_keepdim(0)?; // [1, C]
        let critical: Vec<u32> = scores
            .detach()
            .to_dtype(DType::F32)?
            .argmax(0)?
            .to_vec1::<u32>()?;
        let queries = self.q2.forward(&self.q1.forward(h)?.relu()?)?.tanh()?; // [N, Q]
        let index = Tensor::from_vec(critical, self.n_classes, h.device())?;
        let q_max = queries.index_select(&index, 0)?; // [C, Q]
        let logits = (queries.matmul(&q_max.t()?)? / (self.query_dim as f64).sqrt())?;
        let attention = candle_nn::ops::softmax(&logits, 0)?; // [N, C]
        let pooled = attention.t()?.matmul(h)?; // [C, D]
        let bag = self
            .head
            .forward(&pooled.flatten_all()?.unsqueeze(0)?, train)?;
        Ok(BagOutputs {
            bag,
            max,
            attention,
        })
    }

    fn each_bag(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Vec<BagOutputs>> {
        let features = bags.features();
        let mut start = 0;
        let mut out = Vec::with_capacity(bags.batch_size());
        for &len in bags.lengths() {
            out.push(self.bag(&features.narrow(0, start, len)?, train)?);
            start += len;
        }
        Ok(out)
    }

    /// Attention per class of every bag, `[N_b, C]` each: the heatmap scores.
    pub fn attention(&self, bags: &BagBatch) -> candle_core::Result<Vec<Tensor>> {
        Ok(self
            .each_bag(bags, false)?
            .into_iter()
            .map(|o| o.attention)
            .collect())
    }
}

impl MilModel for Dsmil {
    fn forward(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        let outs = self.each_bag(bags, train)?;
        Tensor::cat(&outs.iter().map(|o| &o.bag).collect::<Vec<_>>(), 0)
    }

    fn forward_train(
        &self,
        bags: &BagBatch,
        _labels: Option<&[usize]>,
    ) -> candle_core::Result<TrainOutput> {
        let outs = self.each_bag(bags, true)?;
        let bag = Tensor::cat(&outs.iter().map(|o| &o.bag).collect::<Vec<_>>(), 0)?;
        let max = Tensor::cat(&outs.iter().map(|o| &o.max).collect::<Vec<_>>(), 0)?;
        Ok(TrainOutput {
            outputs: bag,
            task_weight: DSMIL_BAG_WEIGHT,
            auxiliary: vec![AuxiliaryLoss::TaskOutputs {
                outputs: max,
                weight: 1.0 - DSMIL_BAG_WEIGHT,
            }],
        })
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

    fn config(n_classes: usize, head_hidden: usize) -> ModelConfig {
        let options = ClamDsmilOptions {
            dsmil_query: 5,
            ..ClamDsmilOptions::DEFAULT
        };
        r::config(Pooling::Dsmil, n_classes, head_hidden, options)
    }

    /// Loss `0.5 CE(bag) + 0.5 CE(max instance)` (mean over bags), logits and every
    /// parameter's gradient against the f64 formulation and central differences.
    #[test]
    fn dsmil_loss_and_gradients_match_the_f64_formulation() {
        for (n_classes, head_hidden) in [(2, 0), (3, 5)] {
            let dev = Device::Cpu;
            let vars = VarMap::new();
            let net = build_any(
                &config(n_classes, head_hidden),
                &init::seeded_var_builder(&vars, 4, &dev),
            )
            .unwrap();
            let labels: Vec<usize> = (0..3).map(|b| b % n_classes).collect();
            let bags = r::test_bags(&[5, 1, 4], 4, &labels);
            let refs: Vec<&crate::models::Bag> = bags.iter().collect();
            let batch = BagBatch::from_bags(&refs, &dev).unwrap();
            let out = net.forward_train(&batch, Some(&labels)).unwrap();
            let loss = total_loss(&Objective::Classification, &out, &refs, None, &dev).unwrap();
            let reference = |p: &Params| -> f64 {
                bags.iter()
                    .zip(&labels)
                    .map(|(bag, &label)| {
                        let (bag_logits, max) = r::dsmil_logits(p, &r::rows(bag), n_classes);
                        0.5 * r::cross_entropy(&bag_logits, label)
                            + 0.5 * r::cross_entropy(&max, label)
                    })
                    .sum::<f64>()
                    / bags.len() as f64
            };
            let p = r::params_of(&vars);
            let expected = reference(&p);
            let got = f64::from(loss.to_scalar::<f32>().unwrap());
            assert!(
                (got - expected).abs() < 1e-5 * expected.max(1.0),
                "loss {got} vs {expected}"
            );
            let logits = net
                .forward(&batch, false)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (bag, row) in bags.iter().zip(&logits) {
                let (e, _) = r::dsmil_logits(&p, &r::rows(bag), n_classes);
                for (g, e) in row.iter().zip(&e) {
                    assert!((f64::from(*g) - e).abs() < 1e-5, "logit {g} vs {e}");
                }
            }
            let grads = loss.backward().unwrap();
            r::assert_gradients_match(&vars, &grads, &r::numeric_gradient(&p, reference));
        }
    }

    /// Each class's attention is a distribution over the bag: one `[N_b, C]` matrix per bag
    /// whose columns sum to 1 (the heatmap's per-class scores).
    #[test]
    fn attention_is_a_distribution_per_class() {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let AnyModel::Dsmil(m) =
            build_any(&config(3, 0), &init::seeded_var_builder(&vars, 5, &dev))
                .unwrap()
                .pooling
        else {
            panic!("dsmil builds a Dsmil")
        };
        let bags = r::test_bags(&[6, 2], 4, &[0, 1]);
        let batch = BagBatch::from_bags(&[&bags[0], &bags[1]], &dev).unwrap();
        let a = m.attention(&batch).unwrap();
        assert_eq!(a[0].dims(), &[6, 3]);
        assert_eq!(a[1].dims(), &[2, 3]);
        for t in a {
            for s in t.sum(0).unwrap().to_vec1::<f32>().unwrap() {
                assert!((s - 1.0).abs() < 1e-5);
            }
        }
    }
}
