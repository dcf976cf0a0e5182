//! TransMIL (Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning
//! for Whole Slide Image Classification", NeurIPS 2021), ported from the authors' code
//! (github.com/szc19990412/TransMIL, `models/TransMIL.py`, read before writing this) with
//! the Nystrom attention of lucidrains' `nystrom-attention` that it imports
//! ([`super::nystrom`]).
//!
//! In tessera terms: the shared instance encoder (applied by `MilNet::prepare`) plays the
//! authors' `_fc1` (`Linear(1024, 512) + ReLU`), the transformer width is the pooled width,
//! and the shared head replaces `_fc2`. Per bag (the authors train with one bag per batch):
//! 1. the `n` tokens are padded to `ceil(sqrt n)^2` by repeating the first ones, and a learned
//!    class token (`[1, 1, dim]`, standard normal init) is put in front;
//! 2. `TransLayer`: `x + NystromAttention(LayerNorm(x))` (8 heads of `dim / 8`, `dim / 2`
//!    landmarks, 6 pseudo-inverse iterations, residual value convolution of kernel 33,
//!    dropout 0.1 in training);
//! 3. PPEG: the patch tokens as a `side x side` image (row-major), `x + dwconv7(x) +
//!    dwconv5(x) + dwconv3(x)` (depthwise, with bias, zero padding `k / 2`); the class token
//!    passes through;
//! 4. a second `TransLayer`, `LayerNorm`, and the class token goes to the head.
//!
//! **`transmil_map`** ([`PpegLayout::Map`]) is the same model with one change: PPEG runs on
//! the instances' real sparse-map cells (`map_i`, `map_j`, as SparseConvMIL reads them)
//! instead of the arbitrary square, so no token is repeated, and each depthwise convolution
//! is a submanifold convolution (outputs only on occupied cells; empty cells read as zero,
//! as the square's zero padding). On the square filled row-major the two are identical. The
//! authors' square places tokens by their order in the feature file, so "neighbours" there
//! are neighbours in that order; on the map they are neighbours on the slide.
//!
//! The three depthwise convolutions share their input, so their sum is one depthwise
//! convolution whose 7x7 kernel is the sum of the three (centred) plus the identity; PPEG
//! computes that one, by gathering each token's 49 neighbours (missing ones as a zero row).

use std::collections::HashMap;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use candle_nn::{Init, VarBuilder};

use super::bag::BagBatch;
use super::head::Head;
use super::nystrom::{NystromAttention, NystromConfig};
use super::MilModel;

/// Where PPEG places the patch tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PpegLayout {
    /// The authors' square: tokens padded to `ceil(sqrt n)^2` by repetition, row-major.
    Square,
    /// The instances' sparse-map cells (needs `map_i`, `map_j`); no padding tokens.
    Map,
}

/// Layer normalisation over the last dimension (PyTorch's `nn.LayerNorm`, eps 1e-5), built from
/// differentiable ops: candle-nn's fused layer-norm kernel has no backward pass.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    /// `weight` (ones) and `bias` (zeros) under `vb`.
    pub fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
        })
    }

    /// Normalised `x` `[.., dim]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, 1e-5)
    }
}

/// `x + NystromAttention(LayerNorm(x))`.
#[derive(Debug, Clone)]
pub struct TransLayer {
    norm: LayerNorm,
    attn: NystromAttention,
}

impl TransLayer {
    /// `norm.*` and `attn.*` under `vb`.
    pub fn new(dim: usize, config: NystromConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(TransLayer {
            norm: LayerNorm::new(dim, vb.pp("norm"))?,
            attn: NystromAttention::new(dim, config, vb.pp("attn"))?,
        })
    }

    /// The layer's output `[n, dim]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        x + self.attn.forward(&self.norm.forward(x)?, train)?
    }

    /// The output and what token `row` attends to (mean over heads), `[n]`.
    pub fn forward_with_attention_row(
        &self,
        x: &Tensor,
        row: usize,
        train: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (out, attn) =
            self.attn
                .forward_with_attention_row(&self.norm.forward(x)?, row, train)?;
        Ok(((x + out)?, attn))
    }
}

/// Kernel sides of PPEG's three depthwise convolutions (`proj`, `proj1`, `proj2`).
const PPEG_KERNELS: [usize; 3] = [7, 5, 3];
/// The side of the combined kernel.
const PPEG_SIDE: usize = 7;

/// Each token's cell, and for every token the rows of its 7x7 neighbours (offset
/// `(di, dj)` at `(di + 3) * 7 + dj + 3`; `n` where the cell is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbours {
    n: usize,
    rows: Vec<u32>,
}

impl Neighbours {
    /// Tokens `0..h*w` filling an `h x w` image row-major (PyTorch's `view(B, C, H, W)`).
    pub fn square(h: usize, w: usize) -> Neighbours {
        let cells: Vec<(i64, i64)> = (0..h * w)
            .map(|t| ((t / w.max(1)) as i64, (t % w.max(1)) as i64))
            .collect();
        Neighbours::of_cells(&cells)
    }

    /// Tokens on the given cells `(i, j)`, one token per cell.
    pub fn cells(cells: &[(i64, i64)]) -> candle_core::Result<Neighbours> {
        let mut seen = std::collections::HashSet::with_capacity(cells.len());
        if let Some(c) = cells.iter().find(|c| !seen.insert(**c)) {
            candle_core::bail!("two tokens on cell {c:?}: PPEG needs one token per cell");
        }
        Ok(Neighbours::of_cells(cells))
    }

    fn of_cells(cells: &[(i64, i64)]) -> Neighbours {
        let n = cells.len();
        let index: HashMap<(i64, i64), u32> = cells
            .iter()
            .enumerate()
            .map(|(r, c)| (*c, r as u32))
            .collect();
        let half = (PPEG_SIDE / 2) as i64;
        let mut rows = Vec::with_capacity(n * PPEG_SIDE * PPEG_SIDE);
        for &(i, j) in cells {
            for di in -half..=half {
                for dj in -half..=half {
                    rows.push(index.get(&(i + di, j + dj)).copied().unwrap_or(n as u32));
                }
            }
        }
        Neighbours { n, rows }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True without tokens.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// PPEG (Pyramid Position Encoding Generator): `x + dwconv7(x) + dwconv5(x) + dwconv3(x)` on
/// the patch tokens placed on a grid, as one combined depthwise convolution.
#[derive(Debug, Clone)]
pub struct Ppeg {
    /// `(weight [dim, 1, k, k], bias [dim])` for k = 7, 5, 3.
    convs: Vec<(Tensor, Tensor)>,
}

impl Ppeg {
    /// `proj`, `proj1`, `proj2` (weight, bias) under `vb`, with PyTorch's `Conv2d` init
    /// (uniform, bound `1 / k`: fan-in `k * k` for a depthwise filter).
    pub fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let names = ["proj", "proj1", "proj2"];
        let convs = PPEG_KERNELS
            .iter()
            .zip(names)
            .map(|(&k, name)| {
                let bound = 1.0 / k as f64;
                let init = Init::Uniform {
                    lo: -bound,
                    up: bound,
                };
                let vb = vb.pp(name);
                Ok((
                    vb.get_with_hints((dim, 1, k, k), "weight", init)?,
                    vb.get_with_hints(dim, "bias", init)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Ppeg { convs })
    }

    /// The combined 7x7 kernel `[dim, 49]` (the identity included) and bias `[dim]`.
    fn combined(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let (w0, b0) = &self.convs[0];
        let dim = w0.dim(0)?;
        let mut center = vec![0f32; PPEG_SIDE * PPEG_SIDE];
        center[PPEG_SIDE * PPEG_SIDE / 2] = 1.0;
        let mut kernel = Tensor::from_vec(center, (1, 1, PPEG_SIDE, PPEG_SIDE), w0.device())?
            .to_dtype(w0.dtype())?
            .broadcast_as((dim, 1, PPEG_SIDE, PPEG_SIDE))?
            .contiguous()?;
        let mut bias = b0.zeros_like()?;
        for (w, b) in &self.convs {
            let margin = (PPEG_SIDE - w.dim(2)?) / 2;
            let w = w
                .pad_with_zeros(2, margin, margin)?
                .pad_with_zeros(3, margin, margin)?;
            kernel = (kernel + w)?;
            bias = (bias + b)?;
        }
        Ok((kernel.reshape((dim, PPEG_SIDE * PPEG_SIDE))?, bias))
    }

    /// PPEG of the patch tokens `x` `[n, dim]` placed by `grid`. On the CPU (f32, f64) a
    /// direct kernel with its own backward pass ([`PpegOp`]); elsewhere [`Ppeg::forward_gemm`].
    pub fn forward(&self, x: &Tensor, grid: &Neighbours) -> candle_core::Result<Tensor> {
        let (n, _) = x.dims2()?;
        if n != grid.len() {
            candle_core::bail!("PPEG: {n} tokens on a grid of {}", grid.len());
        }
        let direct = x.device().is_cpu()
            && x.dtype() == self.convs[0].0.dtype()
            && matches!(x.dtype(), DType::F32 | DType::F64);
        if !direct {
            return self.forward_gemm(x, grid);
        }
        let (kernel, bias) = self.combined()?;
        // Channel-last `[taps + 1, dim]`, the bias as the last row.
        let kernel = Tensor::cat(&[&kernel, &bias.unsqueeze(1)?], 1)?
            .t()?
            .contiguous()?;
        let op = PpegOp {
            rows: std::sync::Arc::new(grid.rows.clone()),
            part: PpegPart::Forward,
        };
        x.contiguous()?.apply_op2(&kernel, op)
    }

    /// [`Ppeg::forward`] as one batched matrix product, for any device.
    pub fn forward_gemm(&self, x: &Tensor, grid: &Neighbours) -> candle_core::Result<Tensor> {
        let (n, dim) = x.dims2()?;
        if n != grid.len() {
            candle_core::bail!("PPEG: {n} tokens on a grid of {}", grid.len());
        }
        let (kernel, bias) = self.combined()?;
        let taps = PPEG_SIDE * PPEG_SIDE;
        // Channel-first, so that the depthwise convolution is one batched matrix product:
        // per channel, the 49 neighbour rows `[49, n]` gathered from `x^T` (a zero column
        // for empty cells) and a row of ones, times the channel's kernel and bias `[1, 50]`.
        let (zero, one) = (n as u32, n as u32 + 1);
        let xt = Tensor::cat(
            &[
                x,
                &Tensor::zeros((1, dim), x.dtype(), x.device())?,
                &Tensor::ones((1, dim), x.dtype(), x.device())?,
            ],
            0,
        )?
        .t()?
        .contiguous()?;
        debug_assert!(grid.rows.iter().all(|&r| r <= zero));
        let index: Vec<u32> = (0..taps)
            .flat_map(|tap| grid.rows.iter().skip(tap).step_by(taps).copied())
            .chain(std::iter::repeat_n(one, n))
            .collect();
        let index = Tensor::from_vec(index, (taps + 1) * n, x.device())?;
        let neighbours = xt.index_select(&index, 1)?.reshape((dim, taps + 1, n))?;
        Tensor::cat(&[&kernel, &bias.reshape((dim, 1))?], 1)?
            .reshape((dim, 1, taps + 1))?
            .matmul(&neighbours)?
            .reshape((dim, n))?
            .t()
    }
}

/// Which computation a [`PpegOp`] runs; all read the first operand as `[n, dim]` and the
/// neighbour rows, `taps = 49` per token (`n`: an empty cell).
#[derive(Debug, Clone, Copy)]
enum PpegPart {
    /// `(x [n, dim], k [taps + 1, dim]) -> [n, dim]`:
    /// `out[t] = k[taps] + sum_tap k[tap] * x[rows[t, tap]]` (the last kernel row is the bias).
    Forward,
    /// `(g [n, dim], k) -> [n, dim]`: the inputs' gradient,
    /// `gx[rows[t, tap]] += k[tap] * g[t]`.
    GradInput,
    /// `(x, g) -> [taps + 1, dim]`: the kernel's gradient,
    /// `gk[tap] = sum_t g[t] * x[rows[t, tap]]`, `gk[taps] = sum_t g[t]`.
    GradKernel,
}

/// The CPU kernel of [`Ppeg::forward`] and its backward pass: a direct depthwise convolution
/// over gathered neighbour rows, channel-last, without materialising the `[dim, 50, n]`
/// gather of the gemm formulation.
struct PpegOp {
    rows: std::sync::Arc<Vec<u32>>,
    part: PpegPart,
}

/// [`PpegOp`]'s computation on contiguous operands `a` (`[n, dim]`) and `b`.
fn ppeg_kernel<T: WithDType>(
    (a, b): (&[T], &[T]),
    rows: &[u32],
    (n, dim): (usize, usize),
    part: PpegPart,
) -> Vec<T> {
    let taps = PPEG_SIDE * PPEG_SIDE;
    let row = |r: usize| r * dim..(r + 1) * dim;
    let fma = |dst: &mut [T], x: &[T], y: &[T]| {
        for ((o, x), y) in dst.iter_mut().zip(x).zip(y) {
            *o += *x * *y;
        }
    };
    match part {
        PpegPart::Forward => {
            let mut out = vec![T::zero(); n * dim];
            for t in 0..n {
                let dst = &mut out[row(t)];
                dst.copy_from_slice(&b[row(taps)]);
                for tap in 0..taps {
                    let r = rows[t * taps + tap] as usize;
                    if r < n {
                        fma(dst, &b[row(tap)], &a[row(r)]);
                    }
                }
            }
            out
        }
        PpegPart::GradInput => {
            let mut out = vec![T::zero(); n * dim];
            for t in 0..n {
                for tap in 0..taps {
                    let r = rows[t * taps + tap] as usize;
                    if r < n {
                        fma(&mut out[row(r)], &b[row(tap)], &a[row(t)]);
                    }
                }
            }
            out
        }
        PpegPart::GradKernel => {
            let mut out = vec![T::zero(); (taps + 1) * dim];
            for t in 0..n {
                let g = &b[row(t)];
                for tap in 0..taps {
                    let r = rows[t * taps + tap] as usize;
                    if r < n {
                        fma(&mut out[row(tap)], g, &a[row(r)]);
                    }
                }
                for (o, g) in out[taps * dim..].iter_mut().zip(g) {
                    *o += *g;
                }
            }
            out
        }
    }
}

impl CustomOp2 for PpegOp {
    fn name(&self) -> &'static str {
        "ppeg"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, dim) = l1.shape().dims2()?;
        if self.rows.len() != n * PPEG_SIDE * PPEG_SIDE {
            candle_core::bail!("PPEG: {n} tokens, {} neighbour rows", self.rows.len());
        }
        let slice = |l: &Layout| match l.contiguous_offsets() {
            Some((a, b)) => Ok(a..b),
            None => Err(candle_core::Error::Msg(
                "PPEG: non-contiguous operand".into(),
            )),
        };
        let (r1, r2) = (slice(l1)?, slice(l2)?);
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(ppeg_kernel(
                (&a[r1], &b[r2]),
                &self.rows,
                (n, dim),
                self.part,
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(ppeg_kernel(
                (&a[r1], &b[r2]),
                &self.rows,
                (n, dim),
                self.part,
            )),
            _ => candle_core::bail!("PPEG: f32 or f64 operands of one dtype"),
        };
        let shape = match self.part {
            PpegPart::GradKernel => Shape::from((PPEG_SIDE * PPEG_SIDE + 1, dim)),
            _ => Shape::from((n, dim)),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = |part| PpegOp {
            rows: self.rows.clone(),
            part,
        };
        let gx = grad.apply_op2_no_bwd(kernel, &op(PpegPart::GradInput))?;
        let gk = x.apply_op2_no_bwd(&grad, &op(PpegPart::GradKernel))?;
        Ok((Some(gx), Some(gk)))
    }
}

/// `ceil(sqrt(n))` without floating-point error.
pub fn ceil_sqrt(n: usize) -> usize {
    let mut s = (n as f64).sqrt() as usize;
    while s * s < n {
        s += 1;
    }
    while s > 0 && (s - 1) * (s - 1) >= n {
        s -= 1;
    }
    s
}

/// TransMIL and its sparse-map variant (see the module documentation).
#[derive(Debug, Clone)]
pub struct TransMil {
    cls_token: Tensor,
    layer1: TransLayer,
    pos_layer: Ppeg,
    layer2: TransLayer,
    norm: LayerNorm,
    head: Head,
    layout: PpegLayout,
}

/// One bag's rows in a batch and, when the batch has them, its cells.
struct BagRows {
    start: usize,
    len: usize,
    cells: Option<Vec<(i64, i64)>>,
}

/// One bag's class token after the last layer norm, and optionally its attention.
struct Encoded {
    cls: Tensor,
    /// What the class token attends to in the last layer, one value per instance.
    attention: Option<Tensor>,
}

impl TransMil {
    /// Parameters under `vb.pp("transmil")` (`cls_token`, `layer1`, `pos_layer`, `layer2`,
    /// `norm`, named as in the authors' module); the head reads `dim`.
    pub fn new(
        dim: usize,
        attention: NystromConfig,
        layout: PpegLayout,
        head: Head,
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let vb = vb.pp("transmil");
        Ok(TransMil {
            cls_token: vb.get_with_hints(
                (1, 1, dim),
                "cls_token",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
            layer1: TransLayer::new(dim, attention, vb.pp("layer1"))?,
            pos_layer: Ppeg::new(dim, vb.pp("pos_layer"))?,
            layer2: TransLayer::new(dim, attention, vb.pp("layer2"))?,
            norm: LayerNorm::new(dim, vb.pp("norm"))?,
            head,
            layout,
        })
    }

    /// Where PPEG places the tokens.
    pub fn layout(&self) -> PpegLayout {
        self.layout
    }

    /// Changes the attention layers' training dropout (the authors' 0.1 by default; 0 makes
    /// a training step deterministic, as the training-step bench's same-function check needs).
    pub fn set_attention_dropout(&mut self, p: f32) {
        self.layer1.attn.set_dropout(p);
        self.layer2.attn.set_dropout(p);
    }

    /// PPEG on the patch tokens `x` (everything but the class token in front) of a sequence.
    fn ppeg(&self, x: &Tensor, grid: &Neighbours) -> candle_core::Result<Tensor> {
        let len = x.dim(0)?;
        let patches = self.pos_layer.forward(&x.narrow(0, 1, len - 1)?, grid)?;
        Tensor::cat(&[&x.narrow(0, 0, 1)?, &patches], 0)
    }

    /// One bag: instances `h` `[n, dim]` and, for the map layout, their cells.
    fn encode(
        &self,
        h: &Tensor,
        cells: Option<Vec<(i64, i64)>>,
        train: bool,
        with_attention: bool,
    ) -> candle_core::Result<Encoded> {
        let (n, dim) = h.dims2()?;
        let (tokens, grid) = match self.layout {
            PpegLayout::Square => {
                let side = ceil_sqrt(n);
                let add = side * side - n;
                let tokens = if add > 0 {
                    Tensor::cat(&[h, &h.narrow(0, 0, add)?], 0)?
                } else {
                    h.clone()
                };
                (tokens, Neighbours::square(side, side))
            }
            PpegLayout::Map => {
                let cells = cells.ok_or_else(|| {
                    candle_core::Error::Msg(
                        "transmil_map needs sparse-map positions (`map_i`, `map_j`) for every bag: add a sparse_map stage upstream"
                            .into(),
                    )
                })?;
                (h.clone(), Neighbours::cells(&cells)?)
            }
        };
        let cls = self.cls_token.reshape((1, dim))?.to_dtype(h.dtype())?;
        let x = Tensor::cat(&[&cls, &tokens], 0)?;
        let x = self.layer1.forward(&x, train)?;
        let x = self.ppeg(&x, &grid)?;
        let (x, attention) = if with_attention {
            let (x, row) = self.layer2.forward_with_attention_row(&x, 0, train)?;
            (x, Some(row.narrow(0, 1, n)?))
        } else {
            (self.layer2.forward(&x, train)?, None)
        };
        // Layer norm is per token: normalising only the class token is `norm(x)[:, 0]`.
        let cls = self.norm.forward(&x.narrow(0, 0, 1)?)?;
        Ok(Encoded { cls, attention })
    }

    /// Each bag's rows of the batch and, when present, their cells.
    fn bags(&self, bags: &BagBatch) -> Vec<BagRows> {
        let mut start = 0;
        bags.lengths()
            .iter()
            .map(|&len| {
                let cells = bags.sites().map(|s| {
                    s[start..start + len]
                        .iter()
                        .map(|c| (c[1] as i64, c[2] as i64))
                        .collect()
                });
                let item = BagRows { start, len, cells };
                start += len;
                item
            })
            .collect()
    }

    /// The bag embeddings `[B, dim]` the head reads (the class tokens after the last norm).
    pub fn embed(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        let rows = self
            .bags(bags)
            .into_iter()
            .map(|b| {
                let h = bags.features().narrow(0, b.start, b.len)?;
                Ok(self.encode(&h, b.cells, train, false)?.cls)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }

    /// Heatmap scores, per bag one per instance (evaluation mode): the class token's
    /// attention to each instance in the last layer, mean over heads (the Nystrom
    /// approximation `softmax(Q K~) pinv(softmax(Q~ K~)) softmax(Q~ K)` of the attention
    /// matrix, as lucidrains' `return_attn`). Tokens added by padding (repeated instances,
    /// zero tokens) are dropped, so the scores need not sum to 1, and the approximation can
    /// make a few slightly negative.
    pub fn cls_attention(&self, bags: &BagBatch) -> candle_core::Result<Vec<Vec<f32>>> {
        self.bags(bags)
            .into_iter()
            .map(|b| {
                let h = bags.features().narrow(0, b.start, b.len)?;
                let a = self.encode(&h, b.cells, false, true)?.attention;
                match a {
                    Some(a) => a.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>(),
                    None => candle_core::bail!("no attention computed"),
                }
            })
            .collect()
    }
}

impl MilModel for TransMil {
    fn forward(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        self.head.forward(&self.embed(bags, train)?, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::bag::{Bag, Split};
    use crate::models::init::{named_vars, seeded_var_builder};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    const DIM: usize = 16;
    const CLASSES: usize = 3;

    fn bag(n: usize, dim: usize, phase: f32, positions: Option<Vec<[i64; 2]>>) -> Bag {
        Bag {
            slide_id: format!("s{n}"),
            label_index: 0,
            split: Split::Test,
            dim,
            embeddings: (0..n * dim)
                .map(|v| ((v as f32) * 0.37 + phase).sin() * 1.5)
                .collect(),
            positions,
            pixels: None,
        }
    }

    /// A TransMIL of width `DIM` with the authors' attention and a head of 4 hidden units.
    fn model(layout: PpegLayout, seed: u64) -> (TransMil, VarMap) {
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, seed, &Device::Cpu);
        (build(&vb, layout, NystromConfig::transmil(DIM)), vars)
    }

    fn build(vb: &VarBuilder, layout: PpegLayout, attention: NystromConfig) -> TransMil {
        let head = Head::new(DIM, 4, CLASSES, 0.0, vb.pp("head")).unwrap();
        TransMil::new(DIM, attention, layout, head, vb).unwrap()
    }

    /// The same model with every parameter copied to f64 (tracked, for gradients).
    fn to_f64(vars: &VarMap, layout: PpegLayout, attention: NystromConfig) -> (TransMil, VarMap) {
        let vars64 = VarMap::new();
        {
            let mut data = vars64.data().lock().unwrap();
            for (name, var) in named_vars(vars) {
                let t = var.as_tensor().to_dtype(DType::F64).unwrap();
                data.insert(name, Var::from_tensor(&t).unwrap());
            }
        }
        let vb = seeded_var_builder(&vars64, 0, &Device::Cpu);
        (build(&vb, layout, attention), vars64)
    }

    /// An independent plain-Rust f64 TransMIL, written from the authors' code and lucidrains'
    /// NystromAttention (no candle, no combined PPEG kernel).
    mod reference {
        use super::*;

        pub type M = Vec<Vec<f64>>;

        pub struct Params<'a>(pub &'a VarMap);

        impl Params<'_> {
            pub fn flat(&self, name: &str) -> Vec<f64> {
                let data = self.0.data().lock().unwrap();
                let t = data.get(name).unwrap_or_else(|| panic!("no {name}"));
                let t = t.as_tensor().to_dtype(DType::F64).unwrap();
                t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
            }

            /// A `[rows, cols]` weight.
            pub fn mat(&self, name: &str, cols: usize) -> M {
                self.flat(name).chunks(cols).map(|c| c.to_vec()).collect()
            }
        }

        pub fn matmul(a: &M, b: &M) -> M {
            a.iter()
                .map(|r| {
                    (0..b[0].len())
                        .map(|j| r.iter().zip(b).map(|(x, br)| x * br[j]).sum())
                        .collect()
                })
                .collect()
        }

        pub fn t(a: &M) -> M {
            (0..a[0].len())
                .map(|j| a.iter().map(|r| r[j]).collect())
                .collect()
        }

        /// `x W^T + b`.
        pub fn linear(x: &M, w: &M, b: Option<&[f64]>) -> M {
            let mut y = matmul(x, &t(w));
            if let Some(b) = b {
                for r in &mut y {
                    for (v, bb) in r.iter_mut().zip(b) {
                        *v += bb;
                    }
                }
            }
            y
        }

        pub fn layer_norm(x: &M, g: &[f64], b: &[f64]) -> M {
            x.iter()
                .map(|r| {
                    let n = r.len() as f64;
                    let mean = r.iter().sum::<f64>() / n;
                    let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                    r.iter()
                        .enumerate()
                        .map(|(c, v)| (v - mean) / (var + 1e-5).sqrt() * g[c] + b[c])
                        .collect()
                })
                .collect()
        }

        pub fn softmax_rows(x: &M) -> M {
            x.iter()
                .map(|r| {
                    let top = r.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = r.iter().map(|v| (v - top).exp()).collect();
                    let z: f64 = e.iter().sum();
                    e.iter().map(|v| v / z).collect()
                })
                .collect()
        }

        fn scaled_identity(m: usize, s: f64) -> M {
            (0..m)
                .map(|i| (0..m).map(|j| if i == j { s } else { 0.0 }).collect())
                .collect()
        }

        fn sub(a: &M, b: &M) -> M {
            a.iter()
                .zip(b)
                .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p - q).collect())
                .collect()
        }

        /// moore_penrose_iter_pinv over all heads (maxima over all of them).
        pub fn pinv(xs: &[M], iters: usize) -> Vec<M> {
            let mut col = f64::MIN;
            let mut row = f64::MIN;
            for x in xs {
                for r in x {
                    col = col.max(r.iter().map(|v| v.abs()).sum());
                }
                for j in 0..x[0].len() {
                    row = row.max(x.iter().map(|r| r[j].abs()).sum());
                }
            }
            xs.iter()
                .map(|x| {
                    let m = x.len();
                    let mut z: M = t(x)
                        .into_iter()
                        .map(|r| r.into_iter().map(|v| v / (col * row)).collect())
                        .collect();
                    for _ in 0..iters {
                        let xz = matmul(x, &z);
                        let a = sub(&scaled_identity(m, 7.0), &xz);
                        let a = sub(&scaled_identity(m, 15.0), &matmul(&xz, &a));
                        let a = sub(&scaled_identity(m, 13.0), &matmul(&xz, &a));
                        z = matmul(&z, &a)
                            .into_iter()
                            .map(|r| r.into_iter().map(|v| 0.25 * v).collect())
                            .collect();
                    }
                    z
                })
                .collect()
        }

        /// lucidrains' NystromAttention.forward (no mask), and the attention row of token
        /// `row` (mean over heads, front padding dropped).
        pub fn nystrom(
            p: &Params,
            prefix: &str,
            x: &M,
            a: NystromConfig,
            row: usize,
        ) -> (M, Vec<f64>) {
            let (h, dh, m) = (a.heads, a.dim_head, a.landmarks);
            let inner = h * dh;
            let n = x.len();
            let dim = x[0].len();
            let pad = if n.is_multiple_of(m) { 0 } else { m - n % m };
            let mut xp = vec![vec![0.0; dim]; pad];
            xp.extend(x.iter().cloned());
            let np = xp.len();
            let l = n.div_ceil(m);
            let qkv = linear(&xp, &p.mat(&format!("{prefix}.to_qkv.weight"), dim), None);
            let res = p.flat(&format!("{prefix}.res_conv.weight"));
            let kernel = a.residual_kernel;
            let mut merged = vec![vec![0.0; inner]; np];
            let mut a2s = Vec::new();
            let mut parts = Vec::new();
            for hh in 0..h {
                let take = |which: usize, scale: f64| -> M {
                    qkv.iter()
                        .map(|r| {
                            (0..dh)
                                .map(|e| r[which * inner + hh * dh + e] * scale)
                                .collect()
                        })
                        .collect()
                };
                let q = take(0, (dh as f64).powf(-0.5));
                let k = take(1, 1.0);
                let v = take(2, 1.0);
                let mean_groups = |t: &M| -> M {
                    (0..np / l)
                        .map(|g| {
                            (0..dh)
                                .map(|e| (0..l).map(|i| t[g * l + i][e]).sum::<f64>() / l as f64)
                                .collect()
                        })
                        .collect()
                };
                let (ql, kl) = (mean_groups(&q), mean_groups(&k));
                let a1 = softmax_rows(&matmul(&q, &t(&kl)));
                let a2 = softmax_rows(&matmul(&ql, &t(&kl)));
                let a3 = softmax_rows(&matmul(&ql, &t(&k)));
                a2s.push(a2);
                parts.push((a1, a3, v));
            }
            let zs = pinv(&a2s, a.pinv_iterations);
            let mut attn_row = vec![0.0; np];
            for (hh, ((a1, a3, v), z)) in parts.iter().zip(&zs).enumerate() {
                let left = matmul(a1, z);
                let out = matmul(&left, &matmul(a3, v));
                let full = matmul(&left, a3);
                for (j, value) in full[pad + row].iter().enumerate() {
                    attn_row[j] += value / h as f64;
                }
                for tt in 0..np {
                    for e in 0..dh {
                        let mut r = 0.0;
                        for o in 0..kernel {
                            let s = tt as i64 + o as i64 - (kernel / 2) as i64;
                            if s >= 0 && (s as usize) < np {
                                r += res[hh * kernel + o] * v[s as usize][e];
                            }
                        }
                        merged[tt][hh * dh + e] = out[tt][e] + r;
                    }
                }
            }
            let y = linear(
                &merged,
                &p.mat(&format!("{prefix}.to_out.weight"), inner),
                Some(&p.flat(&format!("{prefix}.to_out.bias"))),
            );
            (y[pad..].to_vec(), attn_row[pad..].to_vec())
        }

        /// PPEG by three separate depthwise convolutions over the cells (zero where empty).
        pub fn ppeg(p: &Params, x: &M, cells: &[(i64, i64)]) -> M {
            let at: HashMap<(i64, i64), usize> =
                cells.iter().enumerate().map(|(r, c)| (*c, r)).collect();
            let dim = x[0].len();
            let mut y = x.clone();
            for (name, k) in [("proj", 7usize), ("proj1", 5), ("proj2", 3)] {
                let w = p.flat(&format!("transmil.pos_layer.{name}.weight"));
                let b = p.flat(&format!("transmil.pos_layer.{name}.bias"));
                let half = (k / 2) as i64;
                for (r, &(i, j)) in cells.iter().enumerate() {
                    for c in 0..dim {
                        let mut s = b[c];
                        for a in 0..k {
                            for bb in 0..k {
                                let cell = (i + a as i64 - half, j + bb as i64 - half);
                                if let Some(&src) = at.get(&cell) {
                                    s += w[(c * k + a) * k + bb] * x[src][c];
                                }
                            }
                        }
                        y[r][c] += s;
                    }
                }
            }
            y
        }

        fn trans_layer(p: &Params, prefix: &str, x: &M, a: NystromConfig) -> (M, Vec<f64>) {
            let normed = layer_norm(
                x,
                &p.flat(&format!("{prefix}.norm.weight")),
                &p.flat(&format!("{prefix}.norm.bias")),
            );
            let (y, attn) = nystrom(p, &format!("{prefix}.attn"), &normed, a, 0);
            let out = x
                .iter()
                .zip(&y)
                .map(|(r, s)| r.iter().zip(s).map(|(u, v)| u + v).collect())
                .collect();
            (out, attn)
        }

        /// Logits of one bag `h` and the class token's last-layer attention row (class token
        /// first, then the tokens, repeated ones included); `cells: None` is the authors'
        /// square.
        pub fn transmil(
            p: &Params,
            h: &M,
            cells: Option<&[(i64, i64)]>,
            a: NystromConfig,
        ) -> (Vec<f64>, Vec<f64>) {
            let n = h.len();
            let dim = h[0].len();
            let (tokens, grid): (M, Vec<(i64, i64)>) = match cells {
                Some(c) => (h.clone(), c.to_vec()),
                None => {
                    let side = (n as f64).sqrt().ceil() as usize;
                    let mut tokens = h.clone();
                    tokens.extend(h[..side * side - n].iter().cloned());
                    let grid = (0..side * side)
                        .map(|t| ((t / side) as i64, (t % side) as i64))
                        .collect();
                    (tokens, grid)
                }
            };
            let mut x = vec![p.flat("transmil.cls_token")];
            x.extend(tokens);
            let (x, _) = trans_layer(p, "transmil.layer1", &x, a);
            let mut y = vec![x[0].clone()];
            y.extend(ppeg(p, &x[1..].to_vec(), &grid));
            let (x, attn) = trans_layer(p, "transmil.layer2", &y, a);
            let cls = layer_norm(
                &x[..1].to_vec(),
                &p.flat("transmil.norm.weight"),
                &p.flat("transmil.norm.bias"),
            );
            let hidden: M = linear(
                &cls,
                &p.mat("head.hidden.weight", dim),
                Some(&p.flat("head.hidden.bias")),
            )
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.max(0.0)).collect())
            .collect();
            let hw = p.flat("head.hidden.bias").len();
            let logits = linear(
                &hidden,
                &p.mat("head.out.weight", hw),
                Some(&p.flat("head.out.bias")),
            );
            (logits[0].clone(), attn)
        }
    }

    fn rows(b: &Bag) -> reference::M {
        b.embeddings
            .chunks(b.dim)
            .map(|c| c.iter().map(|&v| v as f64).collect())
            .collect()
    }

    fn cells_of(b: &Bag) -> Vec<(i64, i64)> {
        b.positions
            .as_ref()
            .map(|p| p.iter().map(|c| (c[0], c[1])).collect())
            .unwrap_or_default()
    }

    fn scattered(n: usize) -> Vec<[i64; 2]> {
        // Distinct cells, some neighbours and some isolated, not in row-major order.
        (0..n as i64)
            .map(|k| [(k * 7) % 5 + 3 * (k / 5), (k * 3) % 4 + 10])
            .collect()
    }

    /// Oracle (b): the whole forward pass (two bags in one batch, so the per-bag loop is
    /// covered) against the plain-Rust f64 reference, for both layouts, bags of 5 (10 tokens
    /// padded to 16: two tokens per landmark) and 20 instances (26 -> 32, four per landmark).
    #[test]
    fn forward_matches_an_independent_f64_reference() {
        let dev = Device::Cpu;
        for layout in [PpegLayout::Square, PpegLayout::Map] {
            let (m, vars) = model(layout, 7);
            let p = reference::Params(&vars);
            let bags = [
                bag(5, DIM, 0.1, Some(scattered(5))),
                bag(20, DIM, 0.9, Some(scattered(20))),
            ];
            let batch = BagBatch::from_bags(&[&bags[0], &bags[1]], &dev).unwrap();
            assert_eq!(batch.duplicate_sites(), 0);
            let logits = m.forward(&batch, false).unwrap().to_vec2::<f32>().unwrap();
            let attention = m.cls_attention(&batch).unwrap();
            for (b, found) in bags.iter().zip(&logits) {
                let cells = cells_of(b);
                let cells = (layout == PpegLayout::Map).then_some(cells.as_slice());
                let (want, _) =
                    reference::transmil(&p, &rows(b), cells, NystromConfig::transmil(DIM));
                for (f, w) in found.iter().zip(&want) {
                    assert!(
                        (*f as f64 - w).abs() < 1e-4 * w.abs().max(1.0),
                        "{layout:?} n {}: {f} vs {w}",
                        b.len()
                    );
                }
            }
            for (b, found) in bags.iter().zip(&attention) {
                let cells = cells_of(b);
                let cells = (layout == PpegLayout::Map).then_some(cells.as_slice());
                let (_, want) =
                    reference::transmil(&p, &rows(b), cells, NystromConfig::transmil(DIM));
                assert_eq!(found.len(), b.len());
                for (f, w) in found.iter().zip(&want[1..=b.len()]) {
                    assert!((*f as f64 - w).abs() < 1e-5, "{layout:?}: {f} vs {w}");
                }
            }
        }
    }

    /// Oracle (c): gradients of a scalar of the logits with respect to parameters of every
    /// part and to the inputs, candle's backward against central finite differences, all in
    /// f64 (eps 1e-5: truncation ~1e-10, rounding ~1e-11).
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        for layout in [PpegLayout::Square, PpegLayout::Map] {
            let (_, vars) = model(layout, 3);
            let (m, vars64) = to_f64(&vars, layout, NystromConfig::transmil(DIM));
            let b = bag(7, DIM, 0.4, Some(scattered(7)));
            let batch = BagBatch::from_bags(&[&b], &dev).unwrap();
            let x = Var::from_tensor(&batch.features().to_dtype(DType::F64).unwrap()).unwrap();
            let batch = batch.with_instance_features(x.as_tensor().clone()).unwrap();
            let weights = Tensor::new(&[[0.7f64, -1.3, 0.4]], &dev).unwrap();
            let loss = |m: &TransMil, batch: &BagBatch| -> Tensor {
                (m.forward(batch, false).unwrap() * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let grads = loss(&m, &batch).backward().unwrap();
            let mut checked = Vec::new();
            for (name, var) in named_vars(&vars64) {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{layout:?}: no gradient for {name}"));
                let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let values = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                // A few entries of each parameter.
                for e in [0, values.len() / 2, values.len() - 1] {
                    let eps = 1e-5;
                    let shift = |delta: f64| -> f64 {
                        let mut v = values.clone();
                        v[e] += delta;
                        let t = Tensor::from_vec(v, var.shape(), &dev).unwrap();
                        var.set(&t).unwrap();
                        let l = loss(&m, &batch).to_scalar::<f64>().unwrap();
                        let t = Tensor::from_vec(values.clone(), var.shape(), &dev).unwrap();
                        var.set(&t).unwrap();
                        l
                    };
                    let fd = (shift(eps) - shift(-eps)) / (2.0 * eps);
                    assert!(
                        (g[e] - fd).abs() < 1e-6 * (1.0 + fd.abs()),
                        "{layout:?} {name}[{e}]: backward {} vs finite differences {fd}",
                        g[e]
                    );
                }
                checked.push(name);
            }
            assert!(checked.iter().any(|n| n.contains("res_conv")));
            assert!(checked.iter().any(|n| n.contains("pos_layer.proj2")));
            assert!(checked.iter().any(|n| n.contains("cls_token")));
            // And the inputs.
            let gx = grads.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
            let base = x.as_tensor().to_vec2::<f64>().unwrap();
            for (r, c) in [(0, 0), (3, 5), (6, 15)] {
                let eps = 1e-5;
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[r][c] += delta;
                    let t = Tensor::new(v, &dev).unwrap();
                    let shifted = batch.with_instance_features(t).unwrap();
                    loss(&m, &shifted).to_scalar::<f64>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!(
                    (gx[r][c] - fd).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{layout:?} x[{r}][{c}]: {} vs {fd}",
                    gx[r][c]
                );
            }
        }
    }

    /// A PPEG of one channel with chosen weights: 7x7 all 0.01, 5x5 all 0.1, 3x3 = 1..9
    /// row-major with bias 0.5, the others without bias.
    fn hand_ppeg() -> Ppeg {
        let dev = Device::Cpu;
        let w = |k: usize, f: &dyn Fn(usize) -> f32| {
            Tensor::from_vec((0..k * k).map(f).collect::<Vec<f32>>(), (1, 1, k, k), &dev).unwrap()
        };
        let b = |v: f32| Tensor::new(&[v], &dev).unwrap();
        Ppeg {
            convs: vec![
                (w(7, &|_| 0.01), b(0.0)),
                (w(5, &|_| 0.1), b(0.0)),
                (w(3, &|i| (i + 1) as f32), b(0.5)),
            ],
        }
    }

    /// Oracle (d): PPEG worked out by hand on a 2x2 square and on three map cells.
    #[test]
    fn ppeg_matches_hand_computed_cases() {
        let dev = Device::Cpu;
        let ppeg = hand_ppeg();
        let run = |values: &[f32], grid: &Neighbours| -> Vec<f32> {
            let x = Tensor::from_vec(values.to_vec(), (values.len(), 1), &dev).unwrap();
            ppeg.forward(&x, grid)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        // Square [[1, 2], [3, 4]]: identity + 3x3 (+0.5) + 0.1 * 10 + 0.01 * 10.
        // (0,0): 5*1 + 6*2 + 8*3 + 9*4 = 77; (0,1): 4*1 + 5*2 + 7*3 + 8*4 = 67;
        // (1,0): 2*1 + 3*2 + 5*3 + 6*4 = 47; (1,1): 1*1 + 2*2 + 4*3 + 5*4 = 37.
        let got = run(&[1.0, 2.0, 3.0, 4.0], &Neighbours::square(2, 2));
        let want = [
            1.0 + 77.5 + 1.1,
            2.0 + 67.5 + 1.1,
            3.0 + 47.5 + 1.1,
            4.0 + 37.5 + 1.1,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
        }
        // Cells (0,0)=1, (0,2)=2, (5,5)=4: the first two see each other through the 5x5 and
        // 7x7 kernels only; (5,5) sees nobody.
        let grid = Neighbours::cells(&[(0, 0), (0, 2), (5, 5)]).unwrap();
        let got = run(&[1.0, 2.0, 4.0], &grid);
        let want = [
            1.0 + 5.0 + 0.5 + 0.3 + 0.03,
            2.0 + 10.0 + 0.5 + 0.3 + 0.03,
            4.0 + 20.0 + 0.5 + 0.4 + 0.04,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
        }
        assert!(Neighbours::cells(&[(1, 1), (1, 1)]).is_err());
    }

    /// PPEG on the square against the authors' formula with candle's grouped conv2d
    /// (`proj(x) + x + proj1(x) + proj2(x)`, three separate convolutions), on a
    /// non-square `h x w` image as well.
    #[test]
    fn ppeg_on_the_square_matches_grouped_conv2d() {
        let dev = Device::Cpu;
        let (m, _vars) = model(PpegLayout::Square, 5);
        let c = DIM;
        for (h, w) in [(4, 4), (3, 5), (1, 1)] {
            let n = h * w;
            let x: Vec<f32> = (0..n * c).map(|v| ((v as f32) * 0.61).cos()).collect();
            let x = Tensor::from_vec(x, (n, c), &dev).unwrap();
            let got = m.pos_layer.forward(&x, &Neighbours::square(h, w)).unwrap();
            let image = x.t().unwrap().reshape((1, c, h, w)).unwrap();
            let mut want = image.clone();
            for (weight, bias) in &m.pos_layer.convs {
                let k = weight.dim(2).unwrap();
                let y = image
                    .conv2d(weight, k / 2, 1, 1, c)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, c, 1, 1)).unwrap())
                    .unwrap();
                want = (want + y).unwrap();
            }
            let want = want.reshape((c, n)).unwrap().t().unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "{h}x{w}");
        }
    }

    /// Oracle (e): on a full square filled row-major, transmil_map's PPEG is transmil's, and
    /// with a perfect-square bag (nothing repeated) the two models give the same logits; the
    /// map variant ignores a translation of the map, and on scattered cells it differs.
    #[test]
    fn map_ppeg_equals_square_ppeg_on_a_full_square() {
        let dev = Device::Cpu;
        let (square, vars) = model(PpegLayout::Square, 9);
        let vb = seeded_var_builder(&vars, 9, &dev);
        let map = build(&vb, PpegLayout::Map, NystromConfig::transmil(DIM));
        let x: Vec<f32> = (0..9 * DIM).map(|v| ((v as f32) * 0.29).sin()).collect();
        let x = Tensor::from_vec(x, (9, DIM), &dev).unwrap();
        let cells: Vec<(i64, i64)> = (0..9).map(|t| (t / 3, t % 3)).collect();
        let a = square
            .pos_layer
            .forward(&x, &Neighbours::square(3, 3))
            .unwrap();
        let b = map
            .pos_layer
            .forward(&x, &Neighbours::cells(&cells).unwrap())
            .unwrap();
        assert_eq!(
            a.to_vec2::<f32>().unwrap(),
            b.to_vec2::<f32>().unwrap(),
            "same gather, same kernel"
        );
        let logits = |m: &TransMil, positions: Vec<[i64; 2]>| {
            let b = bag(9, DIM, 0.2, Some(positions));
            let batch = BagBatch::from_bags(&[&b], &dev).unwrap();
            m.forward(&batch, false).unwrap().to_vec2::<f32>().unwrap()[0].clone()
        };
        let row_major: Vec<[i64; 2]> = (0..9).map(|t| [t / 3, t % 3]).collect();
        let shifted: Vec<[i64; 2]> = row_major.iter().map(|c| [c[0] + 40, c[1] - 7]).collect();
        let from_square = logits(&square, row_major.clone());
        let from_map = logits(&map, row_major);
        for (s, m) in from_square.iter().zip(&from_map) {
            assert!((s - m).abs() < 1e-5, "{from_square:?} vs {from_map:?}");
        }
        for (s, m) in from_map.iter().zip(&logits(&map, shifted)) {
            assert!((s - m).abs() < 1e-5);
        }
        let scattered = logits(&map, scattered(9));
        assert!(from_map
            .iter()
            .zip(&scattered)
            .any(|(a, b)| (a - b).abs() > 1e-4));
        // The square ignores positions altogether.
        assert_eq!(from_square, logits(&square, scattered_positions()));
    }

    fn scattered_positions() -> Vec<[i64; 2]> {
        scattered(9)
    }

    /// Oracle (f), exact case: with one landmark per token and a converged pseudo-inverse the
    /// class token's scores are its softmax attention row: positive, and with the class
    /// token's attention to itself they sum to 1 (a 9-instance bag: no repeated token).
    #[test]
    fn cls_attention_is_the_softmax_row_when_attention_is_exact() {
        let dev = Device::Cpu;
        let exact = NystromConfig {
            landmarks: 10,
            pinv_iterations: 60,
            ..NystromConfig::transmil(DIM)
        };
        let (_, vars) = model(PpegLayout::Square, 4);
        let (m, vars64) = to_f64(&vars, PpegLayout::Square, exact);
        let b = bag(9, DIM, 0.6, None);
        let batch = BagBatch::from_bags(&[&b], &dev).unwrap();
        let batch = batch
            .with_instance_features(batch.features().to_dtype(DType::F64).unwrap())
            .unwrap();
        let scores = m.cls_attention(&batch).unwrap().remove(0);
        let p = reference::Params(&vars64);
        let (_, row) = reference::transmil(&p, &rows(&b), None, exact);
        assert_eq!(scores.len(), 9);
        assert_eq!(row.len(), 10, "class token and nine instances, no padding");
        for (s, w) in scores.iter().zip(&row[1..]) {
            assert!((*s as f64 - w).abs() < 1e-6, "{s} vs {w}");
        }
        assert!(scores.iter().all(|s| *s > 0.0), "{scores:?}");
        // The row sums to 1 (class token's self-attention included), as exact softmax
        // attention does; the reference computes its Nystrom form, so this also checks that
        // the reference itself is exact here.
        let total: f64 = row.iter().sum();
        assert!((total - 1.0).abs() < 1e-9, "row sums to {total}");
        let instances: f64 = scores.iter().map(|&s| s as f64).sum();
        assert!((instances + row[0] - 1.0).abs() < 1e-6);
    }

    /// The strongest oracle: the TransMIL authors' own PyTorch model (their `TransMIL.py`
    /// with lucidrains' NystromAttention, width 16, fixed weights) and its logits on three
    /// bags (5, 20 and 70 instances: 1, 3 and 11 tokens per landmark), written by
    /// `scripts/transmil-fixture.py`; tessera's transmil with those weights must agree.
    #[test]
    fn authors_pytorch_fixture() {
        let dev = Device::Cpu;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/transmil.safetensors"
        );
        let tensors = candle_core::safetensors::load(path, &dev).unwrap();
        let vars = VarMap::new();
        {
            let mut data = vars.data().lock().unwrap();
            for (name, t) in &tensors {
                if name.starts_with("transmil.") || name.starts_with("head.") {
                    data.insert(name.clone(), Var::from_tensor(t).unwrap());
                }
            }
        }
        let n_params = vars.all_vars().len();
        let vb = seeded_var_builder(&vars, 0, &dev);
        let head = Head::new(DIM, 0, CLASSES, 0.0, vb.pp("head")).unwrap();
        let m = TransMil::new(
            DIM,
            NystromConfig::transmil(DIM),
            PpegLayout::Square,
            head,
            &vb,
        )
        .unwrap();
        assert_eq!(
            vars.all_vars().len(),
            n_params,
            "every parameter came from the fixture"
        );
        for k in 0..3 {
            let x = &tensors[&format!("bag{k}.x")];
            let (n, d) = x.dims2().unwrap();
            let b = Bag {
                slide_id: format!("bag{k}"),
                label_index: 0,
                split: Split::Test,
                dim: d,
                embeddings: x.flatten_all().unwrap().to_vec1::<f32>().unwrap().into(),
                positions: None,
                pixels: None,
            };
            let batch = BagBatch::from_bags(&[&b], &dev).unwrap();
            let got = m.forward(&batch, false).unwrap().to_vec2::<f32>().unwrap();
            let want = tensors[&format!("bag{k}.logits")].to_vec2::<f32>().unwrap();
            for (g, w) in got[0].iter().zip(&want[0]) {
                assert!(
                    (g - w).abs() < 1e-4 * w.abs().max(1.0),
                    "bag {k} ({n} instances): {:?} vs PyTorch {:?}",
                    got[0],
                    want[0]
                );
            }
        }
    }

    /// PPEG's CPU kernel and its backward pass equal the gemm formulation (the path off the
    /// CPU): outputs and the gradients of the tokens and of every weight and bias, in f64, on
    /// a square and on scattered cells.
    #[test]
    fn ppeg_kernel_matches_the_gemm_formulation() {
        let dev = Device::Cpu;
        let (_, vars) = model(PpegLayout::Map, 6);
        let (m, vars64) = to_f64(&vars, PpegLayout::Map, NystromConfig::transmil(DIM));
        let cells: Vec<(i64, i64)> = scattered(7).iter().map(|c| (c[0], c[1])).collect();
        for grid in [Neighbours::square(3, 4), Neighbours::cells(&cells).unwrap()] {
            let n = grid.len();
            let x: Vec<f64> = (0..n * DIM).map(|v| ((v as f64) * 0.43).sin()).collect();
            let x = Var::from_tensor(&Tensor::from_vec(x, (n, DIM), &dev).unwrap()).unwrap();
            let g: Vec<f64> = (0..n * DIM).map(|v| ((v as f64) * 0.71).cos()).collect();
            let g = Tensor::from_vec(g, (n, DIM), &dev).unwrap();
            let run = |out: Tensor| {
                let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let mut all = vec![out, grads.get(x.as_tensor()).unwrap().clone()];
                for (name, var) in named_vars(&vars64) {
                    if name.contains("pos_layer") {
                        all.push(grads.get(var.as_tensor()).unwrap().clone());
                    }
                }
                all
            };
            let direct = run(m.pos_layer.forward(x.as_tensor(), &grid).unwrap());
            let gemm = run(m.pos_layer.forward_gemm(x.as_tensor(), &grid).unwrap());
            assert_eq!(direct.len(), 8, "output, input and six parameters");
            for (a, b) in direct.iter().zip(&gemm) {
                assert_eq!(a.shape(), b.shape());
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
            }
        }
    }
}
