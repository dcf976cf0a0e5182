//! Permutation-invariant baselines: pool instance scores (`instance_max/mean/lse`: the head
//! classifies each instance, then scores are pooled) or pool embeddings (`max/mean/lse`: the
//! bag embedding is pooled, then classified).

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use super::bag::{BagBatch, Padded};
use super::head::Head;
use super::MilModel;

/// How instances are reduced to one vector per bag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reduce {
    Max,
    Mean,
    /// Log-sum-exp with sharpness `r`: `(1/r) log(mean(exp(r x)))`, between mean (`r -> 0`)
    /// and max (`r -> inf`).
    Lse(f64),
}

/// Reduces padded instances `[B, K, C]` to `[B, C]`, ignoring padding.
pub fn reduce(p: &Padded, values: &Tensor, how: Reduce) -> candle_core::Result<Tensor> {
    let mask = p.additive_mask()?;
    let masked = |v: &Tensor| -> candle_core::Result<Tensor> {
        match &mask {
            Some(m) => v.broadcast_add(m),
            None => Ok(v.clone()),
        }
    };
    match how {
        Reduce::Max => masked(values)?.max(1),
        Reduce::Mean => {
            let summed = match &p.mask {
                Some(m) => values.broadcast_mul(&m.unsqueeze(2)?)?.sum(1)?,
                None => values.sum(1)?,
            };
            summed.broadcast_div(&p.counts()?)
        }
        Reduce::Lse(r) => {
            let v = masked(values)?;
            let top = v.max_keepdim(1)?.detach();
            let sum_exp = (v.broadcast_sub(&top)? * r)?.exp()?.sum(1)?;
            let mean_exp = sum_exp.broadcast_div(&p.counts()?)?;
            top.squeeze(1)? + (mean_exp.log()? / r)?
        }
    }
}

/// Instance-level MIL: the head scores every instance, scores are pooled per bag.
#[derive(Debug, Clone)]
pub struct InstancePooling {
    head: Head,
    reduce: Reduce,
}

impl InstancePooling {
    pub fn new(head: Head, reduce: Reduce) -> Self {
        InstancePooling { head, reduce }
    }

    /// Every instance's class scores (logits) `[B, K_max, classes]`, before pooling; rows past
    /// a bag's length are padding.
    pub fn instance_scores(&self, bags: &BagBatch) -> candle_core::Result<Tensor> {
        self.head.forward(&bags.padded()?.x, false)
    }
}

impl MilModel for InstancePooling {
    fn forward(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        let p = bags.padded()?;
        let scores = self.head.forward(&p.x, train)?;
        reduce(&p, &scores, self.reduce)
    }
}

/// Embedding-level MIL: instances' embeddings are pooled per bag, the head classifies.
#[derive(Debug, Clone)]
pub struct EmbeddingPooling {
    head: Head,
    reduce: Reduce,
}

impl EmbeddingPooling {
    pub fn new(head: Head, reduce: Reduce) -> Self {
        EmbeddingPooling { head, reduce }
    }
}

impl MilModel for EmbeddingPooling {
    fn forward(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        let p = bags.padded()?;
        let pooled = reduce(&p, &p.x, self.reduce)?;
        self.head.forward(&pooled, train)
    }
}

/// Builds the head under `vb.pp("head")` for either family (kept here so every pooling model
/// names its head the same way in checkpoints).
pub fn head_for(
    in_dim: usize,
    hidden: usize,
    classes: usize,
    dropout: f32,
    vb: &VarBuilder,
) -> candle_core::Result<Head> {
    Head::new(in_dim, hidden, classes, dropout, vb.pp("head"))
}

/// Softmax over the instance axis of `[B, K, 1]` logits, ignoring padding.
pub fn masked_softmax(p: &Padded, logits: &Tensor) -> candle_core::Result<Tensor> {
    let logits = match p.additive_mask()? {
        Some(m) => logits.broadcast_add(&m)?,
        None => logits.clone(),
    };
    candle_nn::ops::softmax(&logits, D::Minus2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::bag::{Bag, Split};
    use candle_core::Device;

    fn bag(id: &str, rows: &[[f32; 2]]) -> Bag {
        Bag {
            slide_id: id.into(),
            label_index: 0,
            split: Split::Train,
            dim: 2,
            embeddings: rows.iter().flatten().copied().collect(),
            positions: None,
            pixels: None,
        }
    }

    #[test]
    fn reductions_ignore_padding() {
        let a = bag("a", &[[1.0, -1.0], [3.0, 0.0], [2.0, -4.0]]);
        let b = bag("b", &[[-5.0, 2.0]]);
        let batch = BagBatch::from_bags(&[&a, &b], &Device::Cpu).unwrap();
        let p = batch.padded().unwrap();
        assert_eq!(p.x.dims(), &[2, 3, 2]);
        let max = reduce(&p, &p.x, Reduce::Max)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(max, vec![vec![3.0, 0.0], vec![-5.0, 2.0]]);
        let mean = reduce(&p, &p.x, Reduce::Mean)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(mean, vec![vec![2.0, -5.0 / 3.0], vec![-5.0, 2.0]]);
        let r = 2.0;
        let lse = reduce(&p, &p.x, Reduce::Lse(r))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let oracle =
            |xs: &[f64]| (xs.iter().map(|x| (r * x).exp()).sum::<f64>() / xs.len() as f64).ln() / r;
        let expected = [
            oracle(&[1.0, 3.0, 2.0]),
            oracle(&[-1.0, 0.0, -4.0]),
            oracle(&[-5.0]),
            oracle(&[2.0]),
        ];
        let got = [lse[0][0], lse[0][1], lse[1][0], lse[1][1]];
        for (g, e) in got.iter().zip(expected) {
            assert!((*g as f64 - e).abs() < 1e-5, "{g} vs {e}");
        }
        let logits = p.x.narrow(2, 0, 1).unwrap();
        let w = masked_softmax(&p, &logits)
            .unwrap()
            .squeeze(2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((w[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(w[1], vec![1.0, 0.0, 0.0]);
    }
}
