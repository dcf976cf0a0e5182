//! Adam with **L2** weight decay, as `torch.optim.Adam(weight_decay=...)` used by the original
//! SparseConvMIL code: the decay is added to the gradient (`g += wd * w`) *before* the moment
//! updates, unlike AdamW's decoupled decay (`candle_nn::AdamW`), so results stay comparable
//! with the paper's. On CPU the whole update is one fused in-place pass per parameter (no
//! temporaries); other devices use candle tensor ops.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};

/// Adam hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-6,
        }
    }
}

/// First and second moments of one parameter.
enum Moments {
    /// Host vectors updated in place with the weights (f32 on CPU).
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Device tensors (other devices / dtypes).
    Device { m: Tensor, v: Tensor },
}

/// One named parameter and its moments.
struct Slot {
    name: String,
    var: Var,
    moments: Moments,
}

/// Adam over a fixed set of named variables.
pub struct Adam {
    config: AdamConfig,
    slots: Vec<Slot>,
    /// Optimizer steps taken (bias correction uses it).
    step: u64,
}

impl Adam {
    /// An optimizer over `vars` (name, variable), in the given order.
    pub fn new(vars: Vec<(String, Var)>, config: AdamConfig) -> candle_core::Result<Adam> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let moments = if var.device().is_cpu() && var.dtype() == DType::F32 {
                    let n = var.elem_count();
                    Moments::Host {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    Moments::Device {
                        m: var.zeros_like()?,
                        v: var.zeros_like()?,
                    }
                };
                Ok(Slot { name, var, moments })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Adam {
            config,
            slots,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Sets the learning rate of the next steps (a schedule's value).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// The global L2 norm of the gradients of every parameter (what
    /// `torch.nn.utils.clip_grad_norm_` compares with its `max_norm`).
    pub fn grad_norm(&self, grads: &GradStore) -> candle_core::Result<f64> {
        let mut sum = 0f64;
        for slot in &self.slots {
            if let Some(g) = grads.get(slot.var.as_tensor()) {
                sum += g
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()? as f64;
            }
        }
        Ok(sum.sqrt())
    }

    /// One update from `grads`; variables without a gradient (e.g. batch-norm running
    /// statistics) are left alone, as in PyTorch.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// [`Adam::step`] with every gradient multiplied by `scale` first (gradient clipping:
    /// `min(1, max_norm / norm)`, as `clip_grad_norm_` before `torch.optim.Adam.step`, so the
    /// L2 decay is added after the scaling).
    pub fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> candle_core::Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            match &mut slot.moments {
                Moments::Host { m, v } => {
                    let grad = grad.contiguous()?;
                    let kernel = AdamKernel {
                        m: RefCell::new(m),
                        v: RefCell::new(v),
                        c,
                        scale: scale as f32,
                        bias1,
                        bias2,
                    };
                    slot.var.as_tensor().inplace_op2(&grad, &kernel)?;
                }
                Moments::Device { m, v } => {
                    let w = slot.var.as_tensor();
                    let grad = if scale != 1.0 {
                        (grad * scale)?
                    } else {
                        grad.clone()
                    };
                    let g = if c.weight_decay != 0.0 {
                        (grad + (w.detach() * c.weight_decay)?)?
                    } else {
                        grad
                    };
                    let new_m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    let new_v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let m_hat = (&new_m / bias1)?;
                    let v_hat = (&new_v / bias2)?;
                    let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
                    slot.var.set(&(w.detach() - (update * c.lr)?)?)?;
                    *m = new_m;
                    *v = new_v;
                }
            }
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<name>`, `v.<name>`) plus the step count, for
    /// checkpoints.
    pub fn state(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.slots.len() + 1);
        for s in &self.slots {
            let shape = s.var.shape().clone();
            let (m, v) = match &s.moments {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, shape.clone(), &candle_core::Device::Cpu)?,
                    Tensor::from_slice(v, shape, &candle_core::Device::Cpu)?,
                ),
                Moments::Device { m, v } => (m.clone(), v.clone()),
            };
            out.push((format!("m.{}", s.name), m));
            out.push((format!("v.{}", s.name), v));
        }
        out.push((
            "step".into(),
            Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?,
        ));
        Ok(out)
    }

    /// Restores what [`Adam::state`] saved; parameters missing from `state` keep zero moments.
    pub fn load_state(
        &mut self,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> candle_core::Result<()> {
        if let Some(step) = get("step") {
            self.step = step
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .first()
                .copied()
                .unwrap_or(0.0) as u64;
        }
        for s in &mut self.slots {
            let (Some(m), Some(v)) = (get(&format!("m.{}", s.name)), get(&format!("v.{}", s.name)))
            else {
                continue;
            };
            if m.shape() != s.var.shape() || v.shape() != s.var.shape() {
                candle_core::bail!(
                    "optimizer state for `{}` has shape {:?}, the parameter {:?}",
                    s.name,
                    m.shape(),
                    s.var.shape()
                );
            }
            match &mut s.moments {
                Moments::Host { m: hm, v: hv } => {
                    *hm = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    *hv = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                }
                Moments::Device { m: dm, v: dv } => {
                    *dm = m.to_device(s.var.device())?.to_dtype(s.var.dtype())?;
                    *dv = v.to_device(s.var.device())?.to_dtype(s.var.dtype())?;
                }
            }
        }
        Ok(())
    }
}

/// The fused CPU update of one parameter: `w` (in place), its moments, its gradient.
struct AdamKernel<'a> {
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    c: AdamConfig,
    /// Multiplies the gradient before the decay is added (clipping).
    scale: f32,
    bias1: f64,
    bias2: f64,
}

impl InplaceOp2 for AdamKernel<'_> {
    fn name(&self) -> &'static str {
        "adam-l2"
    }

    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(w), CpuStorage::F32(g)) = (w, g) else {
            candle_core::bail!("adam-l2: the CPU path handles f32 parameters only");
        };
        let (Some((w0, w1)), Some((g0, g1))) = (lw.contiguous_offsets(), lg.contiguous_offsets())
        else {
            candle_core::bail!("adam-l2: parameter and gradient must be contiguous");
        };
        let (w, g) = (&mut w[w0..w1], &g[g0..g1]);
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        if g.len() != w.len() || m.len() != w.len() {
            candle_core::bail!(
                "adam-l2: {} weights, {} gradients, {} moments",
                w.len(),
                g.len(),
                m.len()
            );
        }
        let c = self.c;
        let (b1, b2, wd) = (c.beta1 as f32, c.beta2 as f32, c.weight_decay as f32);
        // lr * m_hat / (sqrt(v_hat) + eps) with m_hat = m / bias1, v_hat = v / bias2.
        let step = (c.lr / self.bias1) as f32;
        let inv_sqrt_bias2 = (1.0 / self.bias2.sqrt()) as f32;
        let eps = c.eps as f32;
        for (((wi, &gi), mi), vi) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = self.scale * gi + wd * *wi;
            *mi = b1 * *mi + (1.0 - b1) * gi;
            *vi = b2 * *vi + (1.0 - b2) * gi * gi;
            *wi -= step * *mi / (vi.sqrt() * inv_sqrt_bias2 + eps);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Oracle: PyTorch's Adam (L2 weight decay) written out in f64.
    fn torch_adam(w0: &[f64], grads: &[Vec<f64>], c: AdamConfig) -> Vec<f64> {
        let mut w = w0.to_vec();
        let (mut m, mut v) = (vec![0.0; w.len()], vec![0.0; w.len()]);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..w.len() {
                let gi = g[i] + c.weight_decay * w[i];
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
                v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
                let m_hat = m[i] / (1.0 - c.beta1.powi(t));
                let v_hat = v[i] / (1.0 - c.beta2.powi(t));
                w[i] -= c.lr * m_hat / (v_hat.sqrt() + c.eps);
            }
        }
        w
    }

    fn run(dtype: DType) -> Vec<f64> {
        let dev = Device::Cpu;
        let c = AdamConfig {
            lr: 0.1,
            beta1: 0.8,
            beta2: 0.9,
            eps: 1e-8,
            weight_decay: 0.05,
        };
        let var = Var::from_tensor(
            &Tensor::new(&[1.0f64, -2.0, 0.5], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let mut adam = Adam::new(vec![("w".into(), var.clone())], c).unwrap();
        for _ in 0..3 {
            // loss = sum(w^3) -> grad 3 w^2
            let loss = var.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
            adam.step(&loss.backward().unwrap()).unwrap();
        }
        var.as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    #[test]
    fn matches_torch_adam_with_l2_on_both_paths() {
        let c = AdamConfig {
            lr: 0.1,
            beta1: 0.8,
            beta2: 0.9,
            eps: 1e-8,
            weight_decay: 0.05,
        };
        // Replay the oracle with gradients taken at its own iterates.
        let mut w = vec![1.0, -2.0, 0.5];
        let mut grads = Vec::new();
        for _ in 0..3 {
            grads.push(w.iter().map(|x: &f64| 3.0 * x * x).collect::<Vec<_>>());
            w = torch_adam(&[1.0, -2.0, 0.5], &grads, c);
        }
        for dtype in [DType::F32, DType::F64] {
            let got = run(dtype);
            for (g, e) in got.iter().zip(&w) {
                assert!((g - e).abs() < 1e-5, "{dtype:?}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn state_round_trips() {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let mut adam = Adam::new(vec![("w".into(), var.clone())], AdamConfig::default()).unwrap();
        let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
        adam.step(&loss.backward().unwrap()).unwrap();
        let state: std::collections::HashMap<String, Tensor> =
            adam.state().unwrap().into_iter().collect();
        let mut fresh = Adam::new(vec![("w".into(), var.clone())], AdamConfig::default()).unwrap();
        fresh.load_state(|n| state.get(n).cloned()).unwrap();
        assert_eq!(fresh.step_count(), 1);
        let a: std::collections::HashMap<String, Tensor> =
            fresh.state().unwrap().into_iter().collect();
        assert_eq!(
            a["m.w"].to_vec1::<f32>().unwrap(),
            state["m.w"].to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            a["v.w"].to_vec1::<f32>().unwrap(),
            state["v.w"].to_vec1::<f32>().unwrap()
        );
    }

    /// Oracle: clip_grad_norm_ then Adam, by hand, on both update paths.
    #[test]
    fn clipping_scales_gradients_to_the_max_norm_before_the_decay() {
        let c = AdamConfig {
            lr: 0.1,
            beta1: 0.8,
            beta2: 0.9,
            eps: 1e-8,
            weight_decay: 0.05,
        };
        for dtype in [DType::F32, DType::F64] {
            let dev = Device::Cpu;
            let w0 = [3.0f64, -4.0];
            let var = Var::from_tensor(&Tensor::new(&w0, &dev).unwrap().to_dtype(dtype).unwrap())
                .unwrap();
            let mut adam = Adam::new(vec![("w".into(), var.clone())], c).unwrap();
            // loss = sum(w^2) / 2 -> grad w, norm 5; clip to 1 -> grad w / 5.
            let loss = (var.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            let grads = loss.backward().unwrap();
            let norm = adam.grad_norm(&grads).unwrap();
            assert!((norm - 5.0).abs() < 1e-6, "{norm}");
            adam.step_scaled(&grads, 1.0 / norm).unwrap();
            let clipped: Vec<Vec<f64>> = vec![w0.iter().map(|w| w / 5.0).collect()];
            let expected = torch_adam(&w0, &clipped, c);
            let got = var
                .as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (g, e) in got.iter().zip(&expected) {
                assert!((g - e).abs() < 1e-6, "{dtype:?}: {g} vs {e}");
            }
        }
    }
}
