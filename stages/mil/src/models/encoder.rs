//! What every pooling model sees before it pools: the input standardised with the training
//! slides' statistics, then the shared trainable instance encoder. Frozen embeddings pooled raw
//! handicap the embedding-level baselines (max / mean / LSE have no trainable transform before
//! the pooling, whereas SparseConvMIL's first convolution is one): CLAM's and TRIDENT's ABMIL
//! put `Linear(D, 512) + ReLU + dropout` before their attention, and so does every model here
//! through `instance_encoder`, so a results table compares poolings, nothing else.

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::bag::{Bag, Split};
use super::head::torch_linear;

/// `Linear + ReLU (+ dropout)` per width, applied to every instance (`encoder.{n}.*`).
#[derive(Debug, Clone)]
pub struct InstanceEncoder {
    layers: Vec<Linear>,
    dropout: f32,
}

impl InstanceEncoder {
    /// Layers of `widths[n]` outputs under `vb.pp("encoder")`; no layers for `widths = []`
    /// (the paper's raw setting: pooling sees the embeddings themselves).
    pub fn new(
        in_dim: usize,
        widths: &[usize],
        dropout: f32,
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let mut layers = Vec::with_capacity(widths.len());
        let mut prev = in_dim;
        for (n, &w) in widths.iter().enumerate() {
            if w == 0 {
                candle_core::bail!("instance_encoder: layer {n} has width 0");
            }
            layers.push(torch_linear(
                prev,
                w,
                true,
                vb.pp("encoder").pp(n.to_string()),
            )?);
            prev = w;
        }
        Ok(InstanceEncoder { layers, dropout })
    }

    /// Width of the encoded instances (the input width without layers).
    pub fn out_dim(in_dim: usize, widths: &[usize]) -> usize {
        widths.last().copied().unwrap_or(in_dim)
    }

    /// Encodes instances `[N, D]` to `[N, out_dim]`; dropout after each ReLU when `train`.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x)?.relu()?;
            if train && self.dropout > 0.0 {
                x = candle_nn::ops::dropout(&x, self.dropout)?;
            }
        }
        Ok(x)
    }
}

/// Per-dimension mean and standard deviation of the training slides' instances, applied to
/// every split (and by the heatmap) as `(x - mean) / std`. Stored in the checkpoint's model
/// description, so a model always meets inputs scaled as in training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardization {
    pub mean: Vec<f32>,
    /// Population standard deviation (`ddof = 0`, as scikit-learn's `StandardScaler`); 1 for
    /// a dimension without variance, which is then only centred.
    pub std: Vec<f32>,
}

/// A fitted [`Standardization`] and the dimensions found constant (reported to the user).
#[derive(Debug, Clone, PartialEq)]
pub struct FittedStandardization {
    pub stats: Standardization,
    pub constant_dims: Vec<usize>,
    /// Instances the statistics were computed over.
    pub instances: usize,
}

/// Variance, relative to the squared mean, under which a dimension counts as constant (what is
/// left of an exactly constant column after rounding; scikit-learn uses a comparable bound).
const CONSTANT_REL_VAR: f64 = 1e-12;

impl Standardization {
    /// Fits on the instances of the **training** bags of `bags` only (validation and test
    /// slides never inform the scaling); `None` when there are no training instances or the
    /// bags carry pixels.
    pub fn fit<'a>(bags: impl IntoIterator<Item = &'a Bag>) -> Option<FittedStandardization> {
        let mut dim = None;
        let mut sum: Vec<f64> = Vec::new();
        let mut sum_sq: Vec<f64> = Vec::new();
        let mut count = 0usize;
        for bag in bags {
            if bag.split != Split::Train || bag.pixels.is_some() || bag.dim == 0 {
                continue;
            }
            let d = *dim.get_or_insert(bag.dim);
            if bag.dim != d {
                continue;
            }
            if sum.is_empty() {
                sum = vec![0.0; d];
                sum_sq = vec![0.0; d];
            }
            for row in bag.embeddings.chunks_exact(d) {
                for ((s, q), &v) in sum.iter_mut().zip(sum_sq.iter_mut()).zip(row) {
                    let v = f64::from(v);
                    *s += v;
                    *q += v * v;
                }
                count += 1;
            }
            bag.embeddings.release_pages();
        }
        if count == 0 {
            return None;
        }
        let n = count as f64;
        let mut constant_dims = Vec::new();
        let mut mean = Vec::with_capacity(sum.len());
        let mut std = Vec::with_capacity(sum.len());
        for (k, (s, q)) in sum.iter().zip(&sum_sq).enumerate() {
            let m = s / n;
            let var = (q / n - m * m).max(0.0);
            mean.push(m as f32);
            if var <= CONSTANT_REL_VAR * (m * m).max(f64::MIN_POSITIVE) {
                constant_dims.push(k);
                std.push(1.0);
            } else {
                std.push(var.sqrt() as f32);
            }
        }
        Some(FittedStandardization {
            stats: Standardization { mean, std },
            constant_dims,
            instances: count,
        })
    }

    /// Width the statistics were fitted on.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }
}

/// Standardisation then the instance encoder, as tensors on the model's device.
#[derive(Debug, Clone)]
pub struct InstanceInput {
    /// `(mean [1, D], 1 / std [1, D])`.
    scale: Option<(Tensor, Tensor)>,
    encoder: InstanceEncoder,
}

impl InstanceInput {
    /// The input layers of a model reading `in_dim`-wide instances.
    pub fn new(
        in_dim: usize,
        standardize: Option<&Standardization>,
        widths: &[usize],
        dropout: f32,
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let scale = match standardize {
            None => None,
            Some(s) => {
                if s.dim() != in_dim || s.std.len() != in_dim {
                    candle_core::bail!(
                        "standardize: statistics of width {} for {in_dim}-wide instances",
                        s.dim()
                    );
                }
                let dev = vb.device();
                let inv: Vec<f32> = s.std.iter().map(|v| 1.0 / v).collect();
                Some((
                    Tensor::from_slice(&s.mean, (1, in_dim), dev)?.to_dtype(vb.dtype())?,
                    Tensor::from_vec(inv, (1, in_dim), dev)?.to_dtype(vb.dtype())?,
                ))
            }
        };
        Ok(InstanceInput {
            scale,
            encoder: InstanceEncoder::new(in_dim, widths, dropout, vb)?,
        })
    }

    /// `[N, D]` instances to what the pooling reads.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = match &self.scale {
            None => x.clone(),
            Some((mean, inv_std)) => x.broadcast_sub(mean)?.broadcast_mul(inv_std)?,
        };
        self.encoder.forward(&x, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::init::seeded_var_builder;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn bag(split: Split, rows: Vec<[f32; 2]>) -> Bag {
        Bag {
            slide_id: "s".into(),
            label_index: 0,
            split,
            dim: 2,
            embeddings: rows.into_iter().flatten().collect(),
            positions: None,
            pixels: None,
        }
    }

    #[test]
    fn statistics_come_from_training_slides_only() {
        // Validation and test slides are shifted far away: the statistics must not move.
        let train = bag(Split::Train, vec![[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]]);
        let val = bag(Split::Val, vec![[1000.0, -70.0], [2000.0, 90.0]]);
        let test = bag(Split::Test, vec![[-500.0, 3.0]]);
        let fitted = Standardization::fit([&val, &train, &test]).unwrap();
        assert_eq!(fitted.instances, 3);
        assert_eq!(fitted.stats.mean, vec![3.0, 5.0]);
        // Population std of {1, 3, 5} = sqrt(8/3); the second dimension is constant.
        assert!((fitted.stats.std[0] - (8f32 / 3.0).sqrt()).abs() < 1e-6);
        assert_eq!(fitted.stats.std[1], 1.0);
        assert_eq!(fitted.constant_dims, vec![1]);
        assert!(Standardization::fit([&val, &test]).is_none());
    }

    #[test]
    fn input_layers_standardise_then_encode() {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, 4, &dev);
        let stats = Standardization {
            mean: vec![1.0, -2.0],
            std: vec![2.0, 0.5],
        };
        let none = InstanceInput::new(2, Some(&stats), &[], 0.0, &vb).unwrap();
        let x = Tensor::new(&[[3f32, -1.0], [1.0, -2.0]], &dev).unwrap();
        let y = none.forward(&x, false).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![1.0, 2.0], vec![0.0, 0.0]]);

        let enc = InstanceInput::new(2, Some(&stats), &[3], 0.0, &vb).unwrap();
        let y = enc.forward(&x, false).unwrap().to_vec2::<f32>().unwrap();
        let get = |n: &str| vars.data().lock().unwrap()[n].as_tensor().clone();
        let w = get("encoder.0.weight").to_vec2::<f32>().unwrap();
        let b = get("encoder.0.bias").to_vec1::<f32>().unwrap();
        for o in 0..3 {
            let expected = (w[o][0] * 1.0 + w[o][1] * 2.0 + b[o]).max(0.0);
            assert!((y[0][o] - expected).abs() < 1e-6);
        }
        assert!(InstanceInput::new(3, Some(&stats), &[], 0.0, &vb).is_err());
        assert!(InstanceEncoder::new(2, &[4, 0], 0.0, &vb).is_err());
        assert_eq!(InstanceEncoder::out_dim(7, &[]), 7);
        assert_eq!(InstanceEncoder::out_dim(7, &[16, 5]), 5);
    }
}
