//! Attention-based MIL pooling (Ilse, Tomczak & Welling, ICML 2018): a learned weight per
//! instance, softmax over the bag, bag embedding = weighted sum of instance embeddings.

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::bag::BagBatch;
use super::head::{torch_linear, Head};
use super::pooling::masked_softmax;
use super::MilModel;

/// `a_k = softmax_k(w^T tanh(V h_k))`, or with `gated`,
/// `a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`; then `head(sum_k a_k h_k)`.
#[derive(Debug, Clone)]
pub struct AttentionMil {
    v: Linear,
    u: Option<Linear>,
    w: Linear,
    head: Head,
}

impl AttentionMil {
    /// Attention network of `hidden` units (Ilse et al. use 128; 512/2048 for wide embeddings)
    /// under `vb.pp("attention")`, head under `vb.pp("head")`.
    pub fn new(
        in_dim: usize,
        hidden: usize,
        gated: bool,
        head: Head,
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let vb = vb.pp("attention");
        Ok(AttentionMil {
            v: torch_linear(in_dim, hidden, true, vb.pp("v"))?,
            u: if gated {
                Some(torch_linear(in_dim, hidden, true, vb.pp("u"))?)
            } else {
                None
            },
            w: torch_linear(hidden, 1, true, vb.pp("w"))?,
            head,
        })
    }

    /// Attention weights `[B, K_max, 1]` (zero on padding): which instances drive the decision.
    pub fn weights(&self, bags: &BagBatch) -> candle_core::Result<Tensor> {
        let p = bags.padded()?;
        self.attend(&p)
    }

    fn attend(&self, p: &super::bag::Padded) -> candle_core::Result<Tensor> {
        let mut a = self.v.forward(&p.x)?.tanh()?;
        if let Some(u) = &self.u {
            a = (a * candle_nn::ops::sigmoid(&u.forward(&p.x)?)?)?;
        }
        masked_softmax(p, &self.w.forward(&a)?)
    }
}

impl MilModel for AttentionMil {
    fn forward(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        let p = bags.padded()?;
        let weights = self.attend(&p)?;
        let pooled = p.x.broadcast_mul(&weights)?.sum(1)?;
        self.head.forward(&pooled, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::bag::{Bag, Split};
    use crate::models::init::seeded_var_builder;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn attention_is_a_convex_combination_invariant_to_order_and_padding() {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, 5, &dev);
        let head = Head::new(3, 0, 2, 0.0, vb.pp("head")).unwrap();
        let model = AttentionMil::new(3, 4, true, head, &vb).unwrap();
        let rows = vec![1f32, 0.5, -1.0, 0.0, 2.0, 1.0, -3.0, 0.1, 0.2];
        let mk = |e: Vec<f32>| Bag {
            slide_id: "s".into(),
            label_index: 0,
            split: Split::Val,
            dim: 3,
            embeddings: e.into(),
            positions: None,
            pixels: None,
        };
        let a = mk(rows.clone());
        let reversed: Vec<f32> = rows.chunks(3).rev().flatten().copied().collect();
        let b = mk(reversed);
        let short = mk(vec![0.0, 0.0, 1.0]);
        let alone = model
            .forward(&BagBatch::from_bags(&[&a], &dev).unwrap(), false)
            .unwrap();
        let both = model
            .forward(&BagBatch::from_bags(&[&b, &short], &dev).unwrap(), false)
            .unwrap();
        let alone = alone.to_vec2::<f32>().unwrap();
        let both = both.to_vec2::<f32>().unwrap();
        for c in 0..2 {
            assert!((alone[0][c] - both[0][c]).abs() < 1e-5);
        }
        let w = model
            .weights(&BagBatch::from_bags(&[&a, &short], &dev).unwrap())
            .unwrap();
        let w = w.squeeze(2).unwrap().to_vec2::<f32>().unwrap();
        assert!((w[0].iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(w[0].iter().all(|v| *v > 0.0));
        assert_eq!(&w[1][1..], &[0.0, 0.0]);
    }
}
