//! Nystrom self-attention (Xiong et al., AAAI 2021) as TransMIL uses it: a port of
//! `NystromAttention` from lucidrains' `nystrom-attention` package (0.0.14,
//! `nystrom_attention/nystrom_attention.py`, read before writing this), which the TransMIL
//! authors import unchanged. Followed exactly, including what matters for equal outputs:
//! - the sequence is padded **at the front** with zero tokens to a multiple of the landmark
//!   count, without a mask (the zero tokens have zero queries, keys and values, since
//!   `to_qkv` has no bias, but they still take part in the softmaxes and the landmark means),
//!   and the last `n` outputs are kept;
//! - landmarks are the means of `l = ceil(n / m)` consecutive queries / keys;
//! - the pseudo-inverse of the landmark kernel is the iterative Moore-Penrose approximation,
//!   started from `A^T / (max_i sum_j |A_ij| * max_j sum_i |A_ij|)` with the maxima taken over
//!   **all heads at once**;
//! - a depthwise convolution of the values along the sequence (kernel 33, no bias, one filter
//!   per head) is added to the attention output ("residual"), then `to_out` and dropout.
//!
//! Every operation is a differentiable candle op in the input's dtype (no fused layer-norm or
//! softmax kernels, which candle implements without a backward pass).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor, WithDType, D};
use candle_nn::{Init, Linear, VarBuilder};

use super::head::torch_linear;

/// The shape of one Nystrom attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NystromConfig {
    pub heads: usize,
    pub dim_head: usize,
    /// Number of landmarks `m` (the sequence is padded to a multiple of it).
    pub landmarks: usize,
    /// Iterations of the Moore-Penrose pseudo-inverse approximation.
    pub pinv_iterations: usize,
    /// Kernel of the depthwise value convolution along the sequence (0: none).
    pub residual_kernel: usize,
    /// Dropout after the output projection, in training.
    pub dropout: f32,
}

impl NystromConfig {
    /// TransMIL's choice for width `dim`: 8 heads of `dim / 8`, `dim / 2` landmarks, 6
    /// pseudo-inverse iterations, residual kernel 33, dropout 0.1. Widths under 16 would give
    /// empty heads or no landmark; they get heads of 1 and at least one landmark instead.
    pub fn transmil(dim: usize) -> NystromConfig {
        NystromConfig {
            heads: 8,
            dim_head: (dim / 8).max(1),
            landmarks: (dim / 2).max(1),
            pinv_iterations: 6,
            residual_kernel: 33,
            dropout: 0.1,
        }
    }

    fn inner(&self) -> usize {
        self.heads * self.dim_head
    }
}

/// Nystrom attention over one sequence `[n, dim]` (parameters `to_qkv`, `to_out`, `res_conv`
/// named as in the PyTorch module, `to_out.0` written `to_out`).
#[derive(Debug, Clone)]
pub struct NystromAttention {
    to_qkv: Linear,
    to_out: Linear,
    /// `[heads, 1, kernel, 1]`, PyTorch's `Conv2d(heads, heads, (k, 1), groups=heads)` weight.
    res_conv: Option<Tensor>,
    config: NystromConfig,
}

/// Intermediate results of one pass, kept for the attention map.
struct Pass {
    out: Tensor,
    /// `[h, np, m]`, `[h, m, m]` (pseudo-inverse), `[h, m, np]`.
    attn: (Tensor, Tensor, Tensor),
    /// Zero tokens added at the front.
    pad: usize,
}

impl NystromAttention {
    /// Parameters under `vb` with PyTorch's default initialisation.
    pub fn new(dim: usize, config: NystromConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        if config.heads == 0 || config.dim_head == 0 || config.landmarks == 0 {
            candle_core::bail!("Nystrom attention needs heads, head width and landmarks > 0");
        }
        let inner = config.inner();
        let res_conv = if config.residual_kernel > 0 {
            let k = config.residual_kernel;
            if k.is_multiple_of(2) {
                candle_core::bail!("the residual value convolution needs an odd kernel, not {k}");
            }
            // nn.Conv2d default: kaiming-uniform(a = sqrt 5), bound 1 / sqrt(fan_in = k).
            let bound = 1.0 / (k as f64).sqrt();
            Some(vb.pp("res_conv").get_with_hints(
                (config.heads, 1, k, 1),
                "weight",
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
        } else {
            None
        };
        Ok(NystromAttention {
            to_qkv: torch_linear(dim, 3 * inner, false, vb.pp("to_qkv"))?,
            to_out: torch_linear(inner, dim, true, vb.pp("to_out"))?,
            res_conv,
            config,
        })
    }

    /// The layer's shape.
    pub fn config(&self) -> NystromConfig {
        self.config
    }

    /// Changes the training dropout (0 makes a training step deterministic, for comparisons
    /// of training steps with another implementation).
    pub fn set_dropout(&mut self, p: f32) {
        self.config.dropout = p;
    }

    /// Attention output `[n, dim]` for the tokens `x` `[n, dim]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.pass(x, train)?.out)
    }

    /// The output and row `row` of the approximate attention matrix
    /// `softmax(Q K~) pinv(softmax(Q~ K~)) softmax(Q~ K)`, mean over heads, over the `n`
    /// tokens `[n]` (front padding dropped): what the token at `row` attends to.
    pub fn forward_with_attention_row(
        &self,
        x: &Tensor,
        row: usize,
        train: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (n, _) = x.dims2()?;
        if row >= n {
            candle_core::bail!("attention row {row} of a sequence of {n}");
        }
        let p = self.pass(x, train)?;
        let (a1, a2inv, a3) = &p.attn;
        let attn_row = a1
            .narrow(1, p.pad + row, 1)?
            .matmul(a2inv)?
            .matmul(a3)?
            .squeeze(1)?
            .mean(0)?
            .narrow(0, p.pad, n)?;
        Ok((p.out, attn_row))
    }

    fn pass(&self, x: &Tensor, train: bool) -> candle_core::Result<Pass> {
        let c = &self.config;
        let (n, _) = x.dims2()?;
        let m = c.landmarks;
        let pad = (m - n % m) % m;
        let x = if pad > 0 {
            x.pad_with_zeros(0, pad, 0)?
        } else {
            x.clone()
        };
        let np = n + pad;
        let (h, dh, inner) = (c.heads, c.dim_head, c.inner());
        let qkv = self.to_qkv.forward(&x)?;
        let split = |k: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(1, k * inner, inner)?
                .reshape((np, h, dh))?
                .transpose(0, 1)?
                .contiguous()
        };
        let q = (split(0)? * (dh as f64).powf(-0.5))?;
        let k = split(1)?;
        let v = split(2)?;
        let (mut out, attn) = nystrom_core(&q, &k, &v, m, c.pinv_iterations)?;
        if let Some(w) = &self.res_conv {
            out = (out + sequence_depthwise_conv(&v, w)?)?;
        }
        let out = out.transpose(0, 1)?.reshape((np, inner))?;
        let mut out = self.to_out.forward(&out)?;
        if train && c.dropout > 0.0 {
            out = candle_nn::ops::dropout(&out, c.dropout)?;
        }
        Ok(Pass {
            out: out.narrow(0, pad, n)?,
            attn,
            pad,
        })
    }
}

/// The Nystrom approximation of `softmax(q k^T) v` for one sequence of `[h, np, d]` queries
/// (already scaled), keys and values, `np` a multiple of `m`: landmarks are means of `np / m`
/// consecutive queries / keys. Returns the output `[h, np, d]` and the three factors
/// `softmax(Q K~)` `[h, np, m]`, `pinv(softmax(Q~ K~))` `[h, m, m]`, `softmax(Q~ K)` `[h, m, np]`.
/// With `m = np` (every token its own landmark) and enough iterations it is exact attention.
pub fn nystrom_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    m: usize,
    pinv_iterations: usize,
) -> candle_core::Result<(Tensor, (Tensor, Tensor, Tensor))> {
    let (h, np, dh) = q.dims3()?;
    if m == 0 || !np.is_multiple_of(m) {
        candle_core::bail!("{np} tokens do not split into {m} landmarks");
    }
    let l = np / m;
    let landmarks = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.reshape((h, m, l, dh))?.sum(2)? / l as f64
    };
    let (ql, kl) = (landmarks(q)?, landmarks(k)?);
    let kl_t = kl.t()?.contiguous()?;
    let a1 = candle_nn::ops::softmax(&q.matmul(&kl_t)?, D::Minus1)?;
    let a2 = candle_nn::ops::softmax(&ql.matmul(&kl_t)?, D::Minus1)?;
    let a3 = candle_nn::ops::softmax(&ql.matmul(&k.t()?.contiguous()?)?, D::Minus1)?;
    let a2inv = moore_penrose_pinv(&a2, pinv_iterations)?;
    let out = a1.matmul(&a2inv)?.matmul(&a3.matmul(v)?)?;
    Ok((out, (a1, a2inv, a3)))
}

/// Iterative Moore-Penrose pseudo-inverse of a batch of square matrices `[.., m, m]`
/// (Razavi et al. 2014, as in the Nystromformer): `Z <- Z (13 I - XZ (15 I - XZ (7 I - XZ))) / 4`
/// from `Z0 = X^T / (max row sum * max column sum)` of `|X|`, maxima over the whole batch.
pub fn moore_penrose_pinv(x: &Tensor, iterations: usize) -> candle_core::Result<Tensor> {
    let m = x.dim(D::Minus1)?;
    let abs = x.abs()?;
    let col = abs.sum(D::Minus1)?.flatten_all()?.max(0)?;
    let row = abs.sum(D::Minus2)?.flatten_all()?.max(0)?;
    let mut z = x.t()?.broadcast_div(&(col * row)?)?;
    // `c I` as full tensors of x's shape, made once: same-shape subtractions take candle's
    // fast contiguous path (a broadcast operand goes through a slow strided one).
    let eye = Tensor::eye(m, x.dtype(), x.device())?
        .broadcast_as(x.shape())?
        .contiguous()?;
    let (eye7, eye15, eye13) = ((&eye * 7.0)?, (&eye * 15.0)?, (&eye * 13.0)?);
    for _ in 0..iterations {
        let xz = x.matmul(&z)?;
        let t = (&eye7 - &xz)?;
        let t = (&eye15 - xz.matmul(&t)?)?;
        let t = (&eye13 - xz.matmul(&t)?)?;
        z = (z.matmul(&t)? * 0.25)?;
    }
    Ok(z)
}

/// PyTorch's `Conv2d(h, h, (k, 1), padding=(k/2, 0), groups=h, bias=False)` on values
/// `[h, n, d]`: every head's values convolved along the sequence with that head's filter,
/// zeros beyond the ends. On the CPU (f32, f64) a direct kernel with its own backward pass
/// ([`SeqConv`]: no `[h, k, n, d]` gather, which dominates at a thousand tokens); elsewhere
/// [`sequence_depthwise_conv_gemm`].
pub fn sequence_depthwise_conv(v: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let (h, _, _) = v.dims3()?;
    let k = weight.elem_count() / h.max(1);
    // The kernel's backward pass for the values (the filters reversed) needs an odd `k`.
    let direct = v.device().is_cpu()
        && !k.is_multiple_of(2)
        && weight.dtype() == v.dtype()
        && matches!(v.dtype(), DType::F32 | DType::F64);
    if !direct {
        return sequence_depthwise_conv_gemm(v, weight);
    }
    let w = weight.reshape((h, k))?.contiguous()?;
    v.contiguous()?.apply_op2(&w, SeqConv { flip: false })
}

/// [`sequence_depthwise_conv`] as one batched matrix product, for any device: the `k` shifted
/// copies of each head's (zero-padded) values are gathered into `[h, k, n * d]` (one
/// `index_select`), and the head's filter `[1, k]` multiplies them, so forward and backward
/// are gemms instead of reductions over a middle dimension.
pub fn sequence_depthwise_conv_gemm(v: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let (h, n, d) = v.dims3()?;
    let k = weight.elem_count() / h.max(1);
    let w = weight.reshape((h, 1, k))?;
    let half = k / 2;
    let padded = v.pad_with_zeros(1, half, half)?;
    let index: Vec<u32> = (0..k)
        .flat_map(|o| (0..n).map(move |t| (t + o) as u32))
        .collect();
    let index = Tensor::from_vec(index, k * n, v.device())?;
    let shifted = padded.index_select(&index, 1)?.reshape((h, k, n * d))?;
    w.matmul(&shifted)?.reshape((h, n, d))
}

/// The CPU kernel of [`sequence_depthwise_conv`]: contiguous values `[h, n, d]` and filters
/// `[h, k]` (`k` odd), `out[h, t] = sum_o w[h, o] v[h, t + o - k / 2]`; with `flip` the
/// filters are read reversed, which is the convolution's backward pass for the values.
struct SeqConv {
    flip: bool,
}

/// The filters' gradient of [`SeqConv`]: values `[h, n, d]` and output gradient `[h, n, d]`
/// give `[h, k]`, `gw[h, o] = sum_t <g[h, t], v[h, t + o - k / 2]>`.
struct SeqConvFilterGrad {
    k: usize,
}

fn contiguous_slice<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("sequence convolution: non-contiguous operand"),
    }
}

fn seq_conv<T: WithDType>(
    v: &[T],
    w: &[T],
    (h, n, d, k): (usize, usize, usize, usize),
    flip: bool,
) -> Vec<T> {
    let half = k / 2;
    let mut out = vec![T::zero(); h * n * d];
    for hh in 0..h {
        let (vh, wh) = (&v[hh * n * d..(hh + 1) * n * d], &w[hh * k..(hh + 1) * k]);
        let oh = &mut out[hh * n * d..(hh + 1) * n * d];
        for t in 0..n {
            let dst = &mut oh[t * d..(t + 1) * d];
            // Source row t + o - half must lie in 0..n.
            for o in half.saturating_sub(t)..k.min(n + half - t) {
                let wo = if flip { wh[k - 1 - o] } else { wh[o] };
                let s = t + o - half;
                for (y, x) in dst.iter_mut().zip(&vh[s * d..(s + 1) * d]) {
                    *y += wo * *x;
                }
            }
        }
    }
    out
}

fn seq_conv_filter_grad<T: WithDType>(
    v: &[T],
    g: &[T],
    (h, n, d, k): (usize, usize, usize, usize),
) -> Vec<T> {
    let half = k / 2;
    let mut out = vec![T::zero(); h * k];
    let mut acc = vec![T::zero(); d];
    for hh in 0..h {
        let (vh, gh) = (
            &v[hh * n * d..(hh + 1) * n * d],
            &g[hh * n * d..(hh + 1) * n * d],
        );
        for o in 0..k {
            // Output rows t with t + o - half in 0..n: one contiguous dot product.
            let t0 = half.saturating_sub(o);
            let t1 = n.min((n + half).saturating_sub(o));
            if t0 >= t1 {
                continue;
            }
            let s0 = t0 + o - half;
            // One partial sum per channel (vectorises), added up at the end.
            acc.iter_mut().for_each(|a| *a = T::zero());
            let rows = gh[t0 * d..t1 * d]
                .chunks_exact(d)
                .zip(vh[s0 * d..(s0 + t1 - t0) * d].chunks_exact(d));
            for (gr, vr) in rows {
                for ((a, x), y) in acc.iter_mut().zip(gr).zip(vr) {
                    *a += *x * *y;
                }
            }
            out[hh * k + o] = acc.iter().fold(T::zero(), |s, a| s + *a);
        }
    }
    out
}

impl CustomOp2 for SeqConv {
    fn name(&self) -> &'static str {
        "sequence-depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, n, d) = l1.shape().dims3()?;
        let (_, k) = l2.shape().dims2()?;
        let dims = (h, n, d, k);
        let out = match (s1, s2) {
            (CpuStorage::F32(v), CpuStorage::F32(w)) => CpuStorage::F32(seq_conv(
                contiguous_slice(v, l1)?,
                contiguous_slice(w, l2)?,
                dims,
                self.flip,
            )),
            (CpuStorage::F64(v), CpuStorage::F64(w)) => CpuStorage::F64(seq_conv(
                contiguous_slice(v, l1)?,
                contiguous_slice(w, l2)?,
                dims,
                self.flip,
            )),
            _ => candle_core::bail!("sequence convolution: f32 or f64 operands of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        v: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gv = grad.apply_op2_no_bwd(w, &SeqConv { flip: !self.flip })?;
        let gw = v.apply_op2_no_bwd(&grad, &SeqConvFilterGrad { k: w.dim(1)? })?;
        let gw = if self.flip {
            let k = w.dim(1)?;
            let rev: Vec<u32> = (0..k as u32).rev().collect();
            gw.index_select(&Tensor::from_vec(rev, k, w.device())?, 1)?
        } else {
            gw
        };
        Ok((Some(gv), Some(gw)))
    }
}

impl CustomOp2 for SeqConvFilterGrad {
    fn name(&self) -> &'static str {
        "sequence-depthwise-conv-filter-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, n, d) = l1.shape().dims3()?;
        let dims = (h, n, d, self.k);
        let out = match (s1, s2) {
            (CpuStorage::F32(v), CpuStorage::F32(g)) => CpuStorage::F32(seq_conv_filter_grad(
                contiguous_slice(v, l1)?,
                contiguous_slice(g, l2)?,
                dims,
            )),
            (CpuStorage::F64(v), CpuStorage::F64(g)) => CpuStorage::F64(seq_conv_filter_grad(
                contiguous_slice(v, l1)?,
                contiguous_slice(g, l2)?,
                dims,
            )),
            _ => candle_core::bail!("sequence convolution: f32 or f64 operands of one dtype"),
        };
        Ok((out, Shape::from((h, self.k))))
    }
}

/// Exact softmax attention `softmax(q k^T) v` of `[h, n, d]` tensors (`q` already scaled):
/// what Nystrom attention approximates, for tests and as a reference.
pub fn exact_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(&q.matmul(&k.t()?.contiguous()?)?, D::Minus1)?.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// `[h, n, d]` f64 values from a fixed smooth sequence, scaled.
    fn values(h: usize, n: usize, d: usize, phase: f64, scale: f64) -> Tensor {
        let v: Vec<f64> = (0..h * n * d)
            .map(|i| scale * ((i as f64) * 0.734 + phase).sin())
            .collect();
        Tensor::from_vec(v, (h, n, d), &Device::Cpu).unwrap()
    }

    /// Plain-Rust softmax(q k^T) v for one head.
    fn exact(q: &[Vec<f64>], k: &[Vec<f64>], v: &[Vec<f64>]) -> Vec<Vec<f64>> {
        q.iter()
            .map(|qi| {
                let s: Vec<f64> = k
                    .iter()
                    .map(|kj| qi.iter().zip(kj).map(|(a, b)| a * b).sum())
                    .collect();
                let top = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - top).exp()).collect();
                let z: f64 = e.iter().sum();
                (0..v[0].len())
                    .map(|c| e.iter().zip(v).map(|(w, vj)| w / z * vj[c]).sum())
                    .collect()
            })
            .collect()
    }

    /// Oracle (a): with every token its own landmark (`m = n`, so `l = 1`), the Nystrom
    /// formula is `A pinv(A) A V = A V` for `A = softmax(Q K^T)`, i.e. exact softmax attention,
    /// once the pseudo-inverse has converged. The iteration is of order 7 and converges from its
    /// scaled-transpose start for any matrix; with moderate logits (|q.k| up to ~3, condition
    /// number of A in the tens) 40 iterations reach the f64 floor, which the first assertion
    /// checks directly (`A Z = I` to 1e-10) before the outputs are compared to 1e-9.
    #[test]
    fn nystrom_with_every_token_a_landmark_is_exact_softmax_attention() {
        let (h, n, d) = (2, 6, 3);
        let q = values(h, n, d, 0.3, 1.2);
        let k = values(h, n, d, 1.7, 1.0);
        let v = values(h, n, d, 2.9, 1.0);
        let (out, (_, a2inv, _)) = nystrom_core(&q, &k, &v, n, 40).unwrap();
        let a = candle_nn::ops::softmax(&q.matmul(&k.t().unwrap()).unwrap(), D::Minus1).unwrap();
        let az = a.matmul(&a2inv).unwrap().to_vec3::<f64>().unwrap();
        for m in &az {
            for (i, row) in m.iter().enumerate() {
                for (j, x) in row.iter().enumerate() {
                    let e = if i == j { 1.0 } else { 0.0 };
                    assert!((x - e).abs() < 1e-10, "A Z [{i}][{j}] = {x}");
                }
            }
        }
        let (qv, kv, vv, ov) = (
            q.to_vec3::<f64>().unwrap(),
            k.to_vec3::<f64>().unwrap(),
            v.to_vec3::<f64>().unwrap(),
            out.to_vec3::<f64>().unwrap(),
        );
        for head in 0..h {
            let e = exact(&qv[head], &kv[head], &vv[head]);
            for (r, row) in e.iter().enumerate() {
                for (c, x) in row.iter().enumerate() {
                    assert!(
                        (ov[head][r][c] - x).abs() < 1e-9,
                        "{} vs {x}",
                        ov[head][r][c]
                    );
                }
            }
        }
        // exact_attention agrees with the plain-Rust one too.
        let ex = exact_attention(&q, &k, &v).unwrap();
        let diff = (ex - out).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-9);
    }

    /// With fewer landmarks than tokens the approximation is exact when the tokens of each
    /// landmark group (`l` consecutive ones) share their query and key: then
    /// `softmax(Q K^T)[i, j] = softmax(Q K~^T)[i, g(j)] / l` and likewise for the third factor,
    /// so `A1 pinv(A2) A3 = A`. This pins down the grouping (consecutive tokens, not strided):
    /// any other grouping mixes different keys into one landmark and is not exact. Values are
    /// arbitrary.
    #[test]
    fn landmarks_of_repeated_tokens_are_exact_and_the_pseudo_inverse_converges() {
        let (h, m, l, d) = (2, 4, 3, 3);
        let repeat = |t: Tensor| -> Tensor {
            // [h, m, d] -> [h, m * l, d], each token l times in a row.
            t.unsqueeze(2)
                .unwrap()
                .broadcast_as((h, m, l, d))
                .unwrap()
                .reshape((h, m * l, d))
                .unwrap()
        };
        let q = repeat(values(h, m, d, 0.3, 1.2));
        let k = repeat(values(h, m, d, 1.7, 1.0));
        let v = values(h, m * l, d, 2.9, 1.0);
        let (out, _) = nystrom_core(&q, &k, &v, m, 40).unwrap();
        let ex = exact_attention(&q, &k, &v).unwrap();
        let diff = (ex - &out).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-9);
        // Strided groups would not be exact: the test can tell.
        let strided = |t: &Tensor| {
            t.reshape((h, l, m, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((h, m * l, d))
                .unwrap()
        };
        let (shuffled, _) = nystrom_core(&strided(&q), &strided(&k), &v, m, 40).unwrap();
        let ex = exact_attention(&strided(&q), &strided(&k), &v).unwrap();
        let diff = (ex - &shuffled).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() > 1e-3);

        // The pseudo-inverse iteration converges (TransMIL's 6 iterations are only part of
        // the way for a softmax matrix of moderate condition, hence "approximate").
        let x = candle_nn::ops::softmax(&values(3, 4, 4, 0.0, 1.0), D::Minus1).unwrap();
        let error = |iterations: usize| -> f64 {
            let z = moore_penrose_pinv(&x, iterations).unwrap();
            let eye = Tensor::eye(4, DType::F64, &Device::Cpu).unwrap();
            let r = x.matmul(&z).unwrap().broadcast_sub(&eye).unwrap();
            r.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let (e3, e6, e40) = (error(3), error(6), error(40));
        assert!(e6 < e3 && e40 < 1e-10, "{e3} {e6} {e40}");
    }

    /// The value convolution equals PyTorch's grouped `Conv2d(h, h, (k, 1), padding=(k/2, 0))`,
    /// here candle's grouped conv2d (padding both axes, then the width padding cut off), also
    /// with a kernel longer than the sequence.
    #[test]
    fn value_convolution_matches_a_grouped_conv2d() {
        for (n, k) in [(7, 5), (7, 33), (40, 33)] {
            let (h, d) = (3, 2);
            let v = values(h, n, d, 0.5, 1.0).to_dtype(DType::F32).unwrap();
            let w = values(h, 1, k, 1.1, 0.3)
                .to_dtype(DType::F32)
                .unwrap()
                .reshape((h, 1, k, 1))
                .unwrap();
            let got = sequence_depthwise_conv(&v, &w).unwrap();
            let want = v
                .unsqueeze(0)
                .unwrap()
                .conv2d(&w, k / 2, 1, 1, h)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .narrow(2, k / 2, d)
                .unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "n {n} k {k}");
        }
    }

    /// The CPU kernel of the value convolution and its backward pass equal the gemm
    /// formulation (the path off the CPU): outputs and the gradients of values and filters,
    /// in f64, also with a kernel longer than the sequence.
    #[test]
    fn value_convolution_kernel_matches_the_gemm_formulation() {
        for (n, k) in [(1, 3), (7, 5), (7, 33), (40, 33)] {
            let (h, d) = (3, 4);
            let v = candle_core::Var::from_tensor(&values(h, n, d, 0.5, 1.0)).unwrap();
            let w = candle_core::Var::from_tensor(
                &values(h, 1, k, 1.1, 0.3).reshape((h, 1, k, 1)).unwrap(),
            )
            .unwrap();
            let g = values(h, n, d, 2.3, 1.0);
            let run = |f: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| {
                let out = f(v.as_tensor(), w.as_tensor()).unwrap();
                let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
                [
                    out,
                    grads.get(v.as_tensor()).unwrap().clone(),
                    grads.get(w.as_tensor()).unwrap().clone(),
                ]
            };
            let (direct, gemm) = (
                run(sequence_depthwise_conv),
                run(sequence_depthwise_conv_gemm),
            );
            for (a, b) in direct.iter().zip(&gemm) {
                assert_eq!(a.shape(), b.shape());
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                assert!(diff.to_scalar::<f64>().unwrap() < 1e-12, "n {n} k {k}");
            }
        }
    }
}
