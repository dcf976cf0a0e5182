//! Batch normalisation over active sites.

use candle_core::{DType, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::error::SparseError;
use crate::module::SparseModuleT;
use crate::tensor::SparseTensor;

/// Batch-norm whose statistics are taken over the active sites only (inactive sites do not
/// exist, so they cannot drag the mean to zero), with running statistics for evaluation.
///
/// Parameters (names as PyTorch/sparseconvnet): `weight` (1), `bias` (0), `running_mean` (0),
/// `running_var` (1), all `[C]`. Running statistics are updated in training mode as
/// `(1 - momentum) * running + momentum * batch`, with the unbiased variance (the biased one
/// when a batch has a single site). They live in `Var`s: with a `VarMap` they are saved with
/// the model and, never receiving a gradient, ignored by optimisers.
#[derive(Clone, Debug)]
pub struct SparseBatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl SparseBatchNorm {
    /// Batch-norm over `c` channels with `eps = 1e-5`, `momentum = 0.1`.
    pub fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_config(c, 1e-5, 0.1, vb)
    }

    /// Batch-norm with explicit `eps` and `momentum`.
    pub fn with_config(
        c: usize,
        eps: f64,
        momentum: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if !(0.0..=1.0).contains(&momentum) || eps < 0.0 {
            return Err(SparseError::InvalidConfig(format!(
                "batch-norm eps {eps} / momentum {momentum}"
            ))
            .into());
        }
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.))?;
        let running_mean =
            Var::from_tensor(&vb.get_with_hints(c, "running_mean", Init::Const(0.))?)?;
        let running_var =
            Var::from_tensor(&vb.get_with_hints(c, "running_var", Init::Const(1.))?)?;
        Ok(SparseBatchNorm {
            weight,
            bias,
            running_mean,
            running_var,
            eps,
            momentum,
        })
    }

    /// Running mean `[C]`.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// Running variance `[C]`.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    fn update(var: &Var, stat: &Tensor, momentum: f64) -> candle_core::Result<()> {
        let old = var.as_detached_tensor();
        let new =
            ((&old * (1.0 - momentum))? + (stat.detach().to_dtype(old.dtype())? * momentum)?)?;
        var.set(&new)
    }
}

impl SparseModuleT for SparseBatchNorm {
    fn forward_t(&self, x: &SparseTensor, train: bool) -> candle_core::Result<SparseTensor> {
        let f = x.features();
        let (n, c) = f.dims2()?;
        if c != self.weight.dim(0)? {
            return Err(SparseError::ShapeMismatch(format!(
                "SparseBatchNorm: {} channels, got {c}",
                self.weight.dim(0)?
            ))
            .into());
        }
        let dtype = f.dtype();
        // Statistics in f32 at least (f16/bf16 inputs).
        let fi = match dtype {
            DType::F16 | DType::BF16 => f.to_dtype(DType::F32)?,
            _ => f.clone(),
        };
        let (mean, var) = if train {
            if n == 0 {
                return Err(SparseError::ShapeMismatch(
                    "SparseBatchNorm: no active site in training mode".into(),
                )
                .into());
            }
            let mean = fi.mean_keepdim(0)?;
            let var = fi.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
            let unbiased = if n > 1 {
                (&var * (n as f64 / (n as f64 - 1.0)))?
            } else {
                var.clone()
            };
            Self::update(&self.running_mean, &mean.squeeze(0)?, self.momentum)?;
            Self::update(&self.running_var, &unbiased.squeeze(0)?, self.momentum)?;
            (mean, var)
        } else {
            let rd = fi.dtype();
            (
                self.running_mean
                    .as_detached_tensor()
                    .to_dtype(rd)?
                    .unsqueeze(0)?,
                self.running_var
                    .as_detached_tensor()
                    .to_dtype(rd)?
                    .unsqueeze(0)?,
            )
        };
        let y = fi
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = y
            .broadcast_mul(&self.weight.to_dtype(y.dtype())?)?
            .broadcast_add(&self.bias.to_dtype(y.dtype())?)?;
        x.with_features(y.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::testutil::*;

    #[test]
    fn normalises_over_active_sites_and_tracks_running_stats() {
        let dev = Device::Cpu;
        let coords = random_coords(1, 2, 8, 8, 0.3);
        let n = coords.len();
        let f = (rand_tensor(2, &[n, 4], DType::F32) * 3.0)
            .and_then(|t| t + 5.0)
            .expect("f");
        let x = SparseTensor::new(coords, f.clone(), 2).expect("x");
        let vm = VarMap::new();
        let bn =
            SparseBatchNorm::new(4, VarBuilder::from_varmap(&vm, DType::F32, &dev)).expect("bn");
        let y = bn.forward_t(&x, true).expect("train");
        let mean = y.features().mean(0).expect("mean");
        let var = y.features().sqr().and_then(|t| t.mean(0)).expect("var");
        assert_close(&mean, &mean.zeros_like().expect("z"), 1e-5, "mean");
        assert_close(&var, &var.ones_like().expect("o"), 1e-3, "var");
        let want_mean = (f.mean(0).expect("m") * 0.1).expect("m");
        assert_close(bn.running_mean(), &want_mean, 1e-5, "running mean");
        // Eval mode uses running stats: output differs from train mode, and no update.
        let before = bn.running_mean().to_vec1::<f32>().expect("v");
        let _ = bn.forward_t(&x, false).expect("eval");
        assert_eq!(before, bn.running_mean().to_vec1::<f32>().expect("v"));
    }

    #[test]
    fn finite_difference_gradients_f64() {
        let dev = Device::Cpu;
        let coords = random_coords(3, 1, 6, 6, 0.4);
        let f = Var::from_tensor(&rand_tensor(4, &[coords.len(), 3], DType::F64)).expect("f");
        let x = SparseTensor::new(coords, f.as_tensor().clone(), 1).expect("x");
        let vm = VarMap::new();
        let bn =
            SparseBatchNorm::new(3, VarBuilder::from_varmap(&vm, DType::F64, &dev)).expect("bn");
        let r = rand_tensor(5, &[x.num_sites(), 3], DType::F64);
        let loss = || {
            let y = bn.forward_t(&x.with_features(f.as_tensor().clone())?, true)?;
            (y.features() * &r)?.sum_all()
        };
        let w = vm
            .get(3, "weight", candle_nn::Init::Const(1.), DType::F64, &dev)
            .expect("w");
        let wv = Var::from_tensor(&w).expect("wv");
        finite_diff_check(&[&f, &wv], &loss, 30);
    }
}
