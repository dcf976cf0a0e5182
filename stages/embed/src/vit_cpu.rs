//! The transformer blocks of a [`Vit`] on the CPU, for inference, where AVX-512 runs: every
//! linear layer on the [`cpu_gemm`] tile with its weights packed once at load, bias and
//! LayerScale and the residual add applied in the tile's epilogue, GELU / SwiGLU applied to
//! each chunk of rows while it is hot in cache, and attention computed per image (scores,
//! softmax, weighted sum) on the same tile. Everything runs in parallel on rayon; candle's CPU
//! element-wise ops (GELU among them) run on one thread, which cost a quarter of ViT-S's time.
//!
//! The patch embedding, the token assembly, the final norm and the pooling stay candle's
//! ([`Vit::input_tokens`], [`Vit::pool`]).

use crate::cpu_amx::{self, Amx, AmxRows, PackedAmx};
use crate::cpu_gemm::{self, Avx512, Epilogue, PackedB};
use crate::cpu_gemm_bf16::{self, Bf16Cpu, Bf16Weights};
use crate::vit::{Block, Mlp, Vit};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{LayerNorm, Linear};
use rayon::prelude::*;

/// Defines `$name(cpu, args)`, which runs the safe scalar loops of `$scalar` compiled with
/// AVX-512F enabled (in `$inner`, so that LLVM vectorises them 16 lanes wide) where the
/// `Avx512` token proves the CPU has it, and as plain code off x86-64.
macro_rules! avx512_loops {
    ($(#[$doc:meta])* fn $name:ident / $inner:ident ($($arg:ident: $ty:ty),*) => $scalar:ident) => {
        $(#[$doc])*
        fn $name(cpu: Avx512, $($arg: $ty),*) {
            let _ = cpu;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `cpu` proves AVX-512F is available; the body is safe scalar code.
            unsafe {
                $inner($($arg),*)
            }
            #[cfg(not(target_arch = "x86_64"))]
            $scalar($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $inner($($arg: $ty),*) {
            $scalar($($arg),*)
        }
    };
}

/// Rows (tokens) per parallel chunk of a linear layer.
const ROWS: usize = 16 * cpu_gemm::MR;

/// Reduction block of the GEMM (see `cpu_gemm::gemm`).
const K_BLOCK: usize = 512;

/// Rows per parallel chunk of a linear layer with `weights` f32 weights, of `rows` in all.
/// Every chunk streams the whole packed weight through the caches once, so a large weight
/// (ViT-L's 4 MiB qkv, its 16 MiB MLP matrices) gets more rows per chunk to spread that
/// traffic over: one tile row (6 rows) per 256 KiB of weights, between [`ROWS`] and four times
/// that (on one core, ViT-L's MLP GEMMs ran ~10-15% faster at 384 rows than at 96). Never so
/// many that the threads run out of chunks: at most an even share of half a chunk per thread.
fn chunk_rows(rows: usize, weights: usize) -> usize {
    let by_weight = (weights * 4 / (256 * 1024)).clamp(16, 64) * cpu_gemm::MR;
    let per_thread = rows
        .div_ceil(2 * rayon::current_num_threads())
        .div_ceil(cpu_gemm::MR)
        * cpu_gemm::MR;
    by_weight.min(per_thread.max(ROWS)).max(cpu_gemm::MR)
}

/// A linear layer's weight packed for the tile, and its bias.
struct Lin {
    w: PackedB,
    /// With `compute: bf16`, the weight in bf16 for the bf16 kernel, used instead of `w`.
    w_bf16: Option<Bf16Weights>,
    bias: Option<Vec<f32>>,
}

impl Lin {
    fn new(l: &Linear, bf16: Option<Bf16Cpu>) -> Result<Self> {
        let (n, k) = l.weight().dims2()?;
        let w = l.weight().flatten_all()?.to_vec1::<f32>()?;
        Ok(Lin {
            w: PackedB::from_transposed(n, k, &w),
            w_bf16: bf16.map(|cpu| Bf16Weights::from_transposed(cpu, n, k, &w)),
            bias: l.bias().map(|b| b.to_vec1::<f32>()).transpose()?,
        })
    }
}

/// A LayerNorm's parameters.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn new(n: &LayerNorm) -> Result<Self> {
        let d = n.weight().dim(0)?;
        Ok(Norm {
            gamma: n.weight().to_vec1::<f32>()?,
            beta: match n.bias() {
                Some(b) => b.to_vec1::<f32>()?,
                None => vec![0.0; d],
            },
            eps: n.eps() as f32,
        })
    }

    /// Row-wise LayerNorm of `x` (rows of `gamma.len()` values) into `out`, two-pass mean and
    /// variance.
    fn forward(&self, cpu: Avx512, x: &[f32], out: &mut Vec<f32>) {
        let d = self.gamma.len();
        out.resize(x.len(), 0.0);
        out.par_chunks_mut(d * ROWS)
            .zip(x.par_chunks(d * ROWS))
            .for_each(|(dst, src)| {
                for (o, v) in dst.chunks_exact_mut(d).zip(src.chunks_exact(d)) {
                    layer_norm_row(cpu, v, o, self);
                }
            });
    }
}

avx512_loops! {
/// One row of [`Norm::forward`] (sums over 16 lanes, so it vectorises: a sequential sum is
/// latency-bound on one add at a time).
fn layer_norm_row / layer_norm_avx512(v: &[f32], o: &mut [f32], norm: &Norm) => layer_norm_scalar
}

/// The loops [`layer_norm_avx512`] compiles with AVX-512.
#[inline(always)]
fn layer_norm_scalar(v: &[f32], o: &mut [f32], norm: &Norm) {
    let d = v.len() as f32;
    let mean = lane_sum(v, |a| a) / d;
    let var = lane_sum(v, |a| (a - mean) * (a - mean)) / d;
    let inv = (var + norm.eps).sqrt().recip();
    for (((o, a), g), b) in o.iter_mut().zip(v).zip(&norm.gamma).zip(&norm.beta) {
        *o = (a - mean) * inv * g + b;
    }
}

/// `Σ f(v[i])` over 16 independent lanes (then across them), so the loop vectorises.
#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const L: usize = 16;
    let mut lanes = [0f32; L];
    let mut chunks = v.chunks_exact(L);
    for c in &mut chunks {
        for (s, a) in lanes.iter_mut().zip(c) {
            *s += f(*a);
        }
    }
    chunks.remainder().iter().map(|a| f(*a)).sum::<f32>() + lanes.iter().sum::<f32>()
}

enum CpuMlp {
    Gelu { fc1: Lin, fc2: Lin },
    Packed { fc1: Lin, fc2: Lin },
    Split { fc1_g: Lin, fc1_x: Lin, fc2: Lin },
}

struct CpuBlock {
    norm1: Norm,
    qkv: Lin,
    proj: Lin,
    ls1: Option<Vec<f32>>,
    norm2: Norm,
    mlp: CpuMlp,
    ls2: Option<Vec<f32>>,
    heads: usize,
}

/// The CPU block stack of one [`Vit`], weights copied and packed at load (so it serves a
/// frozen encoder: weights trained later are not seen).
pub struct CpuVit {
    cpu: Avx512,
    blocks: Vec<CpuBlock>,
}

impl CpuVit {
    /// `None` where AVX-512 does not run or the model is not f32 on the CPU.
    pub fn new(vit: &Vit) -> Result<Option<Self>> {
        Self::with_bf16(vit, false)
    }

    /// As [`CpuVit::new`], with `bf16` products (f32 sums) in every linear layer
    /// (`compute: bf16`), on AMX tiles where the CPU has them, and there attention's two
    /// products too (on the `vdpbf16ps` tile they stay f32). An error where the CPU lacks
    /// AVX512-BF16.
    pub fn with_bf16(vit: &Vit, bf16: bool) -> Result<Option<Self>> {
        let bf16 = bf16.then(Bf16Cpu::detect).transpose()?;
        let Some(cpu) = Avx512::detect() else {
            return Ok(None);
        };
        let on_cpu_f32 = vit.blocks.first().is_none_or(|b| {
            b.qkv.weight().device().is_cpu() && b.qkv.weight().dtype() == DType::F32
        });
        if !on_cpu_f32 {
            return Ok(None);
        }
        let blocks = vit
            .blocks
            .iter()
            .map(|b| CpuBlock::new(b, bf16))
            .collect::<Result<_>>()?;
        Ok(Some(CpuVit { cpu, blocks }))
    }

    /// `[B, 3, S, S]` normalised images to `[B, dim]` embeddings, as [`Vit::features`] (which
    /// `vit` must be the model this was built from).
    pub fn forward(&self, vit: &Vit, xs: &Tensor) -> Result<Tensor> {
        let tokens = vit.input_tokens(&xs.to_device(&Device::Cpu)?)?;
        let (b, n, d) = tokens.dims3()?;
        let mut x = tokens.flatten_all()?.to_vec1::<f32>()?;
        let mut scratch = Scratch::default();
        for block in &self.blocks {
            block.forward(self.cpu, &mut x, &mut scratch, b, n, d);
        }
        let tokens = Tensor::from_vec(x, (b, n, d), &Device::Cpu)?;
        vit.pool(&tokens)?.to_device(xs.device())
    }
}

impl CpuBlock {
    fn new(b: &Block, bf16: Option<Bf16Cpu>) -> Result<Self> {
        let gamma = |g: &Option<Tensor>| g.as_ref().map(|g| g.to_vec1::<f32>()).transpose();
        Ok(CpuBlock {
            norm1: Norm::new(&b.norm1)?,
            qkv: Lin::new(&b.qkv, bf16)?,
            proj: Lin::new(&b.proj, bf16)?,
            ls1: gamma(&b.ls1)?,
            norm2: Norm::new(&b.norm2)?,
            mlp: match &b.mlp {
                Mlp::Gelu { fc1, fc2 } => CpuMlp::Gelu {
                    fc1: Lin::new(fc1, bf16)?,
                    fc2: Lin::new(fc2, bf16)?,
                },
                Mlp::Packed { fc1, fc2 } => CpuMlp::Packed {
                    fc1: Lin::new(fc1, bf16)?,
                    fc2: Lin::new(fc2, bf16)?,
                },
                Mlp::Split { fc1_g, fc1_x, fc2 } => CpuMlp::Split {
                    fc1_g: Lin::new(fc1_g, bf16)?,
                    fc1_x: Lin::new(fc1_x, bf16)?,
                    fc2: Lin::new(fc2, bf16)?,
                },
            },
            ls2: gamma(&b.ls2)?,
            heads: b.heads,
        })
    }

    /// `x` (`b * n` tokens of `d`) through attention and MLP, residuals included, in place.
    fn forward(
        &self,
        cpu: Avx512,
        x: &mut Vec<f32>,
        s: &mut Scratch,
        b: usize,
        n: usize,
        d: usize,
    ) {
        self.norm1.forward(cpu, x, &mut s.h);
        linear(cpu, &s.h, &self.qkv, None, None, None, &mut s.qkv);
        let amx = match &self.qkv.w_bf16 {
            Some(Bf16Weights::Amx(amx, _)) => Some(*amx),
            _ => None,
        };
        attention(cpu, amx, &s.qkv, b, n, d, self.heads, &mut s.attn);
        let ls1 = self.ls1.as_deref();
        linear(
            cpu,
            &s.attn,
            &self.proj,
            ls1,
            Some(x.as_slice()),
            None,
            &mut s.next,
        );
        std::mem::swap(x, &mut s.next);
        self.norm2.forward(cpu, x, &mut s.h);
        let ls2 = self.ls2.as_deref();
        // The MLP up to its second layer, which every variant ends with.
        let (fc2, act) = match &self.mlp {
            CpuMlp::Gelu { fc1, fc2 } => {
                let gelu = |xs: &mut [f32]| gelu_erf(cpu, xs);
                linear(cpu, &s.h, fc1, None, None, Some(&gelu), &mut s.hidden);
                (fc2, &s.hidden)
            }
            CpuMlp::Packed { fc1, fc2 } => {
                linear(cpu, &s.h, fc1, None, None, None, &mut s.hidden);
                let half = fc1.w.n() / 2;
                s.gated.resize(s.hidden.len() / 2, 0.0);
                s.gated
                    .par_chunks_mut(half * ROWS)
                    .zip(s.hidden.par_chunks(2 * half * ROWS))
                    .for_each(|(g, hd)| {
                        for (g, row) in g.chunks_exact_mut(half).zip(hd.chunks_exact(2 * half)) {
                            let (gate, val) = row.split_at(half);
                            silu_times(cpu, gate, val, g);
                        }
                    });
                (fc2, &s.gated)
            }
            CpuMlp::Split { fc1_g, fc1_x, fc2 } => {
                linear(cpu, &s.h, fc1_g, None, None, None, &mut s.hidden);
                linear(cpu, &s.h, fc1_x, None, None, None, &mut s.gated);
                s.hidden
                    .par_chunks_mut(4096)
                    .zip(s.gated.par_chunks(4096))
                    .for_each(|(g, v)| silu_times_in_place(cpu, g, v));
                (fc2, &s.hidden)
            }
        };
        linear(cpu, act, fc2, ls2, Some(x.as_slice()), None, &mut s.next);
        std::mem::swap(x, &mut s.next);
    }
}

/// The activations between the layers of a block, reused by every block of a forward pass:
/// a fresh zeroed vector per layer cost ViT-S ~5% in `memset` and page faults. Each buffer
/// keeps one size across blocks, so after the first block nothing is zeroed again (every
/// layer overwrites all of its output).
#[derive(Default)]
struct Scratch {
    /// LayerNorm output (both norms).
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    /// The block's next residual stream, swapped with `x`.
    next: Vec<f32>,
    /// MLP hidden layer (SwiGLU: the packed gate and value, or the split gate).
    hidden: Vec<f32>,
    /// SwiGLU: the gated half (packed) or the value (split).
    gated: Vec<f32>,
}

avx512_loops! {
/// `out = silu(gate) * val` (SwiGLU's product), vectorised.
fn silu_times / silu_times_avx512(gate: &[f32], val: &[f32], out: &mut [f32]) => silu_times_scalar
}

avx512_loops! {
/// `gate = silu(gate) * val` in place, vectorised.
fn silu_times_in_place / silu_times_in_place_avx512(gate: &mut [f32], val: &[f32])
    => silu_times_in_place_scalar
}

#[inline(always)]
fn silu_times_scalar(gate: &[f32], val: &[f32], out: &mut [f32]) {
    for ((o, g), v) in out.iter_mut().zip(gate).zip(val) {
        *o = silu(*g) * v;
    }
}

#[inline(always)]
fn silu_times_in_place_scalar(gate: &mut [f32], val: &[f32]) {
    for (g, v) in gate.iter_mut().zip(val) {
        *g = silu(*g) * v;
    }
}

/// candle's `silu`, `x / (1 + e^-x)`, as `x · σ(x)` with `σ` from [`exp_le0`]`(-|x|)`
/// (branch-free, so it vectorises; libm's `expf` per element did not).
#[inline(always)]
fn silu(v: f32) -> f32 {
    let e = exp_le0(-v.abs());
    let sigmoid = if v >= 0.0 { 1.0 } else { e } / (1.0 + e);
    v * sigmoid
}

avx512_loops! {
/// Row-wise `softmax(scale * row)` in place (rows of `n`), 16 lanes at a time: scalar `expf`
/// and the loops around it were a tenth of ViT-S's time.
fn softmax_rows / softmax_avx512(xs: &mut [f32], n: usize, scale: f32) => softmax_scalar
}

/// The loops [`softmax_avx512`] compiles with AVX-512: reductions over 16 independent lanes
/// (so they vectorise), [`exp_le0`] branch-free.
#[inline(always)]
fn softmax_scalar(xs: &mut [f32], n: usize, scale: f32) {
    const L: usize = 16;
    for row in xs.chunks_exact_mut(n.max(1)) {
        let mut lanes = [f32::NEG_INFINITY; L];
        let mut chunks = row.chunks_exact(L);
        for c in &mut chunks {
            for (m, v) in lanes.iter_mut().zip(c) {
                *m = m.max(*v);
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let mut sums = [0f32; L];
        let mut chunks = row.chunks_exact_mut(L);
        for c in &mut chunks {
            for (s, v) in sums.iter_mut().zip(c) {
                *v = exp_le0((*v - max) * scale);
                *s += *v;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_le0((*v - max) * scale);
            sum += *v;
        }
        let inv = sum.recip();
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// `e^x` for `x <= 0` (Cephes' expf: `x = k ln 2 + r`, a degree-6 polynomial in `r`, `2^k`
/// from the exponent bits), within 2 ulp; below -87 it flushes to `e^-87`, which is 0 next
/// to the row's maximum term of 1.
#[inline(always)]
fn exp_le0(x: f32) -> f32 {
    let x = x.clamp(-87.0, 0.0);
    let k = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - k * 0.693_359_4 + k * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    // 2^k from k's bits: k + 2^23 + 127 holds the integer k + 127 (in 1..=127) in its low
    // mantissa bits, which the shift moves into the exponent field. A float-to-int cast
    // (saturating in Rust) does not vectorise: it cost ViT-S ~7% in softmax.
    e * f32::from_bits((k + 8_388_735.0).to_bits() << 23)
}

avx512_loops! {
/// Exact (erf) GELU in place, `x / 2 * (1 + erf(x / √2))`, 16 lanes at a time: a scalar
/// libm erf per element cost a sixth of ViT-S's time.
fn gelu_erf / gelu_avx512(xs: &mut [f32]) => gelu_scalar
}

/// The loop [`gelu_avx512`] compiles with AVX-512 (branch-free, so it vectorises).
#[inline(always)]
fn gelu_scalar(xs: &mut [f32]) {
    for v in xs {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// erf in f32 as Eigen and XLA compute it: a rational function of degree 13/8 on [-4, 4]
/// (outside, erf is ±1 in f32); within a few ulp of the exact value.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    for c in [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.9546e-3,
        -1.609_603_3e-2,
    ] {
        p = p * x2 + c;
    }
    let mut q = -1.456_607_2e-5_f32;
    for c in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2] {
        q = q * x2 + c;
    }
    x * p / q
}

/// An in-place function on a chunk of rows (an activation).
type RowsFn<'a> = &'a (dyn Fn(&mut [f32]) + Sync);

/// `out = ((a · W + bias) * scale + residual)` for the rows of `a`, then `post` on each chunk
/// of rows; chunks of rows in parallel. `out` is resized, never cleared: every value is written.
fn linear(
    cpu: Avx512,
    a: &[f32],
    lin: &Lin,
    scale: Option<&[f32]>,
    residual: Option<&[f32]>,
    post: Option<RowsFn<'_>>,
    out: &mut Vec<f32>,
) {
    let (k, n) = (lin.w.k(), lin.w.n());
    let rows = a.len() / k;
    out.resize(rows * n, 0.0);
    let chunk_rows = match lin.w_bf16 {
        // Whole blocks of AMX tile rows.
        Some(Bf16Weights::Amx(..)) => chunk_rows(rows, k * n).div_ceil(32) * 32,
        _ => chunk_rows(rows, k * n),
    };
    out.par_chunks_mut(chunk_rows * n)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let r0 = chunk * chunk_rows;
            let m = dst.len() / n;
            let ep = Epilogue {
                bias: lin.bias.as_deref(),
                scale,
                residual: residual.map(|r| &r[r0 * n..(r0 + m) * n]),
                relu: false,
            };
            let a = &a[r0 * k..(r0 + m) * k];
            match &lin.w_bf16 {
                Some(Bf16Weights::Amx(cpu, w)) => AmxRows::with(|rows| {
                    rows.fill_matrix(*cpu, a, k, m, k);
                    cpu_amx::gemm(*cpu, rows, w, dst, n, ep)
                }),
                Some(Bf16Weights::Avx512(cpu, w)) => {
                    cpu_gemm_bf16::gemm(*cpu, a, k, m, w, dst, n, ep, K_BLOCK)
                }
                None => cpu_gemm::gemm(cpu, a, k, m, &lin.w, dst, n, ep, K_BLOCK),
            }
            if let Some(post) = post {
                post(dst);
            }
        });
}

/// Multi-head self-attention of `b` images of `n` tokens from their `[b * n, 3 * d]` qkv
/// projection (timm's `[3, heads, head_dim]` order in each row) to `[b * n, d]`, heads
/// concatenated. One image per parallel task. With `amx` (`compute: bf16` on a CPU with AMX)
/// both products run on AMX tiles in bf16 products and f32 sums, softmax in f32, as PyTorch's
/// bf16 autocast computes it: each image's qkv rows are rounded to bf16 once; per head, `Kᵀ`
/// and `V` are packed from them and the softmaxed scores rounded for the second product.
#[allow(clippy::too_many_arguments)]
fn attention(
    cpu: Avx512,
    amx: Option<Amx>,
    qkv: &[f32],
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
    out: &mut Vec<f32>,
) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    out.resize(b * n * d, 0.0);
    out.par_chunks_mut(n * d)
        .enumerate()
        .for_each(|(img, dst)| {
            let rows = &qkv[img * n * 3 * d..(img + 1) * n * 3 * d];
            let mut scores = vec![0f32; n * n];
            let none = Epilogue::default();
            let Some(amx) = amx else {
                for h in 0..heads {
                    let (q, k, v) = (h * hd, d + h * hd, 2 * d + h * hd);
                    let kt = PackedB::from_columns(hd, n, |j| &rows[j * 3 * d + k..][..hd]);
                    let vs = PackedB::from_rows(n, hd, |j| &rows[j * 3 * d + v..][..hd]);
                    let qs = &rows[q..];
                    cpu_gemm::gemm(cpu, qs, 3 * d, n, &kt, &mut scores, n, none, K_BLOCK);
                    softmax_rows(cpu, &mut scores, n, scale);
                    cpu_gemm::gemm(cpu, &scores, n, n, &vs, &mut dst[q..], d, none, K_BLOCK);
                }
                return;
            };
            let mut half = vec![0u16; rows.len()];
            amx.round(rows, &mut half);
            let token = |j: usize, at: usize| &half[j * 3 * d + at..][..hd];
            AmxRows::with(|a| {
                for h in 0..heads {
                    let (q, k, v) = (h * hd, d + h * hd, 2 * d + h * hd);
                    let kt = PackedAmx::from_bf16_columns(hd, n, |j| token(j, k));
                    let vs = PackedAmx::from_bf16_rows(n, hd, |j| token(j, v));
                    a.reset(n, hd);
                    for i in 0..n {
                        a.copy_row(i, token(i, q));
                    }
                    cpu_amx::gemm(amx, a, &kt, &mut scores, n, none);
                    softmax_rows(cpu, &mut scores, n, scale);
                    a.fill_matrix(amx, &scores, n, n, n);
                    cpu_amx::gemm(amx, a, &vs, &mut dst[q..], d, none);
                }
            });
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention written out in f64 loops: the oracle.
    fn naive_attention(qkv: &[f32], b: usize, n: usize, d: usize, heads: usize) -> Vec<f64> {
        let hd = d / heads;
        let mut out = vec![0f64; b * n * d];
        let at = |img: usize, t: usize, part: usize, h: usize, i: usize| {
            qkv[(img * n + t) * 3 * d + part * d + h * hd + i] as f64
        };
        for img in 0..b {
            for h in 0..heads {
                for i in 0..n {
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            (0..hd)
                                .map(|c| at(img, i, 0, h, c) * at(img, j, 1, h, c))
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..hd {
                        out[(img * n + i) * d + h * hd + c] =
                            (0..n).map(|j| e[j] / total * at(img, j, 2, h, c)).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_loops_in_f64() {
        let Some(cpu) = Avx512::detect() else {
            eprintln!("no AVX-512F here: the CPU ViT path is not used on this CPU");
            return;
        };
        // Odd token counts (tile and panel remainders) and two head widths.
        for (b, n, d, heads) in [(2, 7, 16, 2), (1, 67, 128, 2), (3, 13, 96, 3)] {
            let qkv: Vec<f32> = (0..b * n * 3 * d)
                .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0)
                .collect();
            let mut got = Vec::new();
            attention(cpu, None, &qkv, b, n, d, heads, &mut got);
            let want = naive_attention(&qkv, b, n, d, heads);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{b}x{n}x{d}/{heads} at {i}: {g} vs {w}"
                );
            }
        }
    }

    /// The AMX attention against the f64 loops on bf16-rounded q, k and v: what is left is
    /// the rounding of the softmaxed scores to bf16 (at most 2^-9 of each weight, so 2^-8 of
    /// the largest |v| after the sum; the bound allows 2^-7) and f32 sums. It must also differ
    /// from the f64 loops on the unrounded inputs: the products really are bf16.
    #[test]
    fn amx_attention_matches_loops_on_rounded_inputs() {
        let (Some(cpu), Some(amx)) = (Avx512::detect(), Amx::detect()) else {
            eprintln!("note: no AMX on this CPU (or not granted): AMX attention is not tested");
            return;
        };
        let round = |x: f32| {
            let mut h = [0u16];
            amx.round(&[x], &mut h);
            f32::from_bits((h[0] as u32) << 16)
        };
        // Head widths 8 (K padded to a tile), 64, 32 and 80 (ViT-H's: padded to 96).
        for (b, n, d, heads) in [
            (2, 7, 16, 2),
            (1, 67, 128, 2),
            (3, 13, 96, 3),
            (1, 40, 160, 2),
        ] {
            let qkv: Vec<f32> = (0..b * n * 3 * d)
                .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0)
                .collect();
            let mut got = Vec::new();
            attention(cpu, Some(amx), &qkv, b, n, d, heads, &mut got);
            let rounded: Vec<f32> = qkv.iter().map(|v| round(*v)).collect();
            let want = naive_attention(&rounded, b, n, d, heads);
            let exact = naive_attention(&qkv, b, n, d, heads);
            let vmax = rounded.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let mut off_exact = 0f64;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 2f64.powi(-7) * vmax,
                    "{b}x{n}x{d}/{heads} at {i}: {g} vs {w}"
                );
                off_exact = off_exact.max((*g as f64 - exact[i]).abs());
            }
            assert!(off_exact > 1e-5, "{b}x{n}x{d}/{heads}: f32-exact, not bf16");
        }
    }

    #[test]
    fn exp_and_softmax_match_f64() {
        for i in 0..=870_000 {
            let x = -(i as f32) / 10_000.0;
            let want = (x as f64).exp();
            let got = exp_le0(x) as f64;
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}): {got} vs {want}"
            );
        }
        let n = 37;
        let mut xs: Vec<f32> = (0..2 * n)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
            .collect();
        let want: Vec<f64> = xs
            .chunks(n)
            .flat_map(|row| {
                let e: Vec<f64> = row.iter().map(|v| (*v as f64 * 0.125).exp()).collect();
                let total: f64 = e.iter().sum();
                e.into_iter().map(move |v| v / total)
            })
            .collect();
        softmax_scalar(&mut xs, n, 0.125);
        for (g, w) in xs.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-6 * w.max(1e-3), "{g} vs {w}");
        }
    }

    #[test]
    fn erf_is_within_a_few_ulp_of_f64() {
        let mut worst = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.0;
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - want).abs());
        }
        assert!(worst < 5e-7, "max abs error {worst}");
        let mut xs = vec![-3.0f32, -0.5, 0.0, 0.7, 2.5];
        let want: Vec<f64> = xs
            .iter()
            .map(|&x| {
                0.5 * x as f64 * (1.0 + candle_core::cpu::erf::erf_f64(x as f64 / 2f64.sqrt()))
            })
            .collect();
        gelu_scalar(&mut xs);
        for (g, w) in xs.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn silu_matches_f64() {
        let Some(cpu) = Avx512::detect() else {
            return;
        };
        let gate: Vec<f32> = (-2000..=2000).map(|i| i as f32 / 20.0).collect();
        let val: Vec<f32> = gate.iter().map(|g| 1.5 - g * 0.01).collect();
        let mut out = vec![f32::NAN; gate.len()];
        silu_times(cpu, &gate, &val, &mut out);
        let mut in_place = gate.clone();
        silu_times_in_place(cpu, &mut in_place, &val);
        for ((g, v), (o, p)) in gate.iter().zip(&val).zip(out.iter().zip(&in_place)) {
            let (g64, v64) = (*g as f64, *v as f64);
            let want = g64 / (1.0 + (-g64).exp()) * v64;
            assert!(
                (*o as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "silu({g}): {o} vs {want}"
            );
            assert_eq!(o.to_bits(), p.to_bits());
        }
    }

    #[test]
    fn layer_norm_matches_candle() {
        let dev = Device::Cpu;
        let d = 48;
        let x = Tensor::rand(-2f32, 3.0, (10, d), &dev).unwrap();
        let g = Tensor::rand(0.5f32, 1.5, d, &dev).unwrap();
        let beta = Tensor::rand(-0.5f32, 0.5, d, &dev).unwrap();
        let ln = LayerNorm::new(g, beta, 1e-6);
        let want = candle_core::Module::forward(&ln, &x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let Some(cpu) = Avx512::detect() else {
            return;
        };
        let mut got = Vec::new();
        Norm::new(&ln).unwrap().forward(
            cpu,
            &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &mut got,
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
}
