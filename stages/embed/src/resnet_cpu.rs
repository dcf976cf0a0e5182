//! A CPU inference path for batch-norm-folded ResNets, about 5x faster than candle's generic
//! convolution on the same machine: activations stay in NHWC, and bias, residual and ReLU are
//! applied while the output is hot in cache. Chunks of output pixels run in parallel on rayon.
//!
//! On CPUs with AVX-512F each convolution is direct: the [`cpu_gemm`] tile reads every kernel
//! position's input channels in place (no im2col matrix) against weights packed once at load,
//! and applies bias, residual and ReLU in registers. Elsewhere each convolution is one im2col
//! (skipped for 1x1 stride-1 convolutions) and a `gemm` crate call per chunk.

use crate::cpu_amx::{self, Amx, AmxRows, PackedAmx};
use crate::cpu_gemm::{self, Avx512, Epilogue, PackedB, TileOut, MR, NR};
use crate::cpu_gemm_bf16::{self, Bf16Cpu, Bf16Weights, BfRows};
use crate::resnet::{ConvBn, ResNet};
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output pixels per work chunk of the im2col path: large enough for an efficient GEMM, small
/// enough that the im2col buffer of a chunk stays in L2.
const CHUNK_ROWS: usize = 256;

/// Output pixels per work chunk of the direct path (a multiple of the tile's rows; small
/// enough that the last layers of a batch still split into many chunks for two threads).
const TASK_ROWS: usize = 20 * MR;

/// Target reduction length of one K block of the direct path: the block's packed weights for
/// [`N_BLOCK`] outputs (512 x 512 floats, 1 MiB) are read from L2 by every tile of a chunk.
const K_BLOCK: usize = 512;

/// Output channels computed together per K block of the direct path.
const N_BLOCK: usize = 512;

/// Output pixels per chunk of the AMX path, for K (`k`) values per pixel and `rows` in all: a
/// chunk's bf16 rows (at most ~512 KiB) stay in L2 while every column block reads them; whole
/// blocks of 32 rows; at least four chunks per thread where there are rows enough.
fn amx_task_rows(k: usize, rows: usize) -> usize {
    let by_cache = (512 * 1024 / (2 * k.max(1))).clamp(32, 256);
    let per_thread = rows.div_ceil(4 * rayon::current_num_threads());
    by_cache.min(per_thread).max(32).div_ceil(32) * 32
}

/// Where a convolution's output pixels read their input: `src`, to be padded by `pad` on each
/// side, read with `stride` into `ho x wo` outputs per image. Shared by the f32 tile's runs and
/// the AMX path's rows.
#[derive(Clone, Copy)]
struct Window<'a> {
    src: &'a Act,
    pad: usize,
    stride: usize,
    ho: usize,
    wo: usize,
}

impl<'a> Window<'a> {
    /// Output pixel `r` (counted over the batch) as `(image, row, column)`.
    fn pixel(&self, r: usize) -> (usize, usize, usize) {
        let (img, rem) = (r / (self.ho * self.wo), r % (self.ho * self.wo));
        (img, rem / self.wo, rem % self.wo)
    }

    /// The `len` input values from channel `c0` at kernel position `(ky, kx)` that output
    /// pixel `(img, oy, ox)` reads, or `None` where that position is outside the image.
    fn run(
        &self,
        (img, oy, ox): (usize, usize, usize),
        (ky, kx, c0): (usize, usize, usize),
        len: usize,
    ) -> Option<&'a [f32]> {
        let src = self.src;
        let iy = (oy * self.stride + ky).wrapping_sub(self.pad);
        let ix = (ox * self.stride + kx).wrapping_sub(self.pad);
        if iy >= src.h || ix >= src.w {
            return None;
        }
        let at = ((img * src.h + iy) * src.w + ix) * src.c + c0;
        Some(&src.data[at..at + len])
    }
}

/// A dense NHWC activation.
struct Act {
    data: Vec<f32>,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

/// One folded convolution, weights laid out `[ky][kx][c_in][c_out]` for the GEMM.
struct Conv {
    k: usize,
    stride: usize,
    pad: usize,
    c_in: usize,
    c_out: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// The direct path's weights, packed once (where AVX-512 runs).
    direct: Option<Direct>,
}

/// A convolution as a sum of K segments: each is one contiguous run of input values per
/// output pixel (the channels `c0..c0 + len` at kernel position `ky, kx`, or with `merge_kx`
/// all of kernel row `ky`), in the weights' `[ky][kx][c_in]` order.
struct Direct {
    cpu: Avx512,
    packed: PackedB,
    /// Consecutive segments in K blocks of about [`K_BLOCK`], each with its first K row.
    blocks: Vec<KBlock>,
    /// Kernel rows read as one run each, from an input padded first: for few input channels
    /// (the stem's 3), where a run of `c_in` values would be too short to stream.
    merge_kx: bool,
    /// What an out-of-image position (or a row past the chunk) reads.
    zeros: Vec<f32>,
    /// With `compute: bf16`, the weights in bf16 for the bf16 kernel (which then replaces the
    /// f32 tile); on the `vdpbf16ps` tile `None` for segments of odd length (the stem's 21),
    /// which stay f32.
    bf16: Option<Bf16Weights>,
}

struct KBlock {
    /// `(ky, kx, c0)` of each segment.
    segs: Vec<(usize, usize, usize)>,
    /// Values per segment.
    len: usize,
    /// The block's first row of the packed weights.
    k0: usize,
}

impl Direct {
    fn new(
        cpu: Avx512,
        bf16: Option<Bf16Cpu>,
        k: usize,
        c_in: usize,
        c_out: usize,
        weight: &[f32],
    ) -> Self {
        let merge_kx = k > 1 && c_in < 16;
        let (segs, len): (Vec<_>, usize) = if merge_kx {
            ((0..k).map(|ky| (ky, 0, 0)).collect(), k * c_in)
        } else {
            // Channels split in equal parts of at most K_BLOCK.
            let parts = (c_in.div_ceil(K_BLOCK)..=c_in)
                .find(|p| c_in.is_multiple_of(*p))
                .unwrap_or(1);
            let len = c_in / parts;
            let segs = (0..k)
                .flat_map(|ky| (0..k).map(move |kx| (ky, kx)))
                .flat_map(|(ky, kx)| (0..parts).map(move |p| (ky, kx, p * len)))
                .collect();
            (segs, len)
        };
        let per_block = (K_BLOCK / len.max(1)).max(1);
        let blocks = segs
            .chunks(per_block)
            .enumerate()
            .map(|(i, segs)| KBlock {
                segs: segs.to_vec(),
                len,
                k0: i * per_block * len,
            })
            .collect();
        let kdim = k * k * c_in;
        // The vdpbf16ps tile multiplies pairs of K rows, which must not straddle segments;
        // AMX rows are gathered whole, any length.
        let bf16 = bf16
            .filter(|cpu| matches!(cpu, Bf16Cpu::Amx(_)) || len.is_multiple_of(2))
            .map(|cpu| Bf16Weights::new(cpu, kdim, c_out, weight));
        Direct {
            cpu,
            packed: PackedB::new(kdim, c_out, weight),
            blocks,
            merge_kx,
            zeros: vec![0.0; len],
            bf16,
        }
    }
}

impl Conv {
    fn from_folded(unit: &ConvBn, bf16: Option<Bf16Cpu>) -> Result<Self> {
        let ConvBn::Folded(conv) = unit else {
            candle_core::bail!("the CPU path needs batch-norm folded first")
        };
        let cfg = conv.config();
        let (c_out, c_in, kh, kw) = conv.weight().dims4()?;
        if kh != kw || cfg.dilation != 1 || cfg.groups != 1 {
            candle_core::bail!("the CPU path supports square, undilated, ungrouped convolutions");
        }
        // [co, ci, ky, kx] -> [ky, kx, ci, co]
        let weight = conv
            .weight()
            .permute((2, 3, 1, 0))?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bias = match conv.bias() {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0.0; c_out],
        };
        let direct = Avx512::detect().map(|cpu| Direct::new(cpu, bf16, kh, c_in, c_out, &weight));
        Ok(Conv {
            k: kh,
            stride: cfg.stride,
            pad: cfg.padding,
            c_in,
            c_out,
            weight,
            bias,
            direct,
        })
    }

    /// `relu(conv(x) + bias + residual)` (ReLU and residual optional).
    fn forward(&self, x: &Act, residual: Option<&Act>, relu: bool) -> Act {
        match &self.direct {
            Some(d) => self.forward_direct(d, x, residual, relu),
            None => self.forward_im2col(x, residual, relu),
        }
    }

    /// The direct convolution on the AVX-512 tile.
    fn forward_direct(&self, d: &Direct, x: &Act, residual: Option<&Act>, relu: bool) -> Act {
        let ho = (x.h + 2 * self.pad - self.k) / self.stride + 1;
        let wo = (x.w + 2 * self.pad - self.k) / self.stride + 1;
        let padded;
        let (src, pad) = if d.merge_kx && self.pad > 0 {
            padded = pad_nhwc(x, self.pad);
            (&padded, 0)
        } else {
            (x, self.pad)
        };
        let win = Window {
            src,
            pad,
            stride: self.stride,
            ho,
            wo,
        };
        let n = self.c_out;
        let rows = x.n * ho * wo;
        if let Some(Bf16Weights::Amx(cpu, packed)) = &d.bf16 {
            let mut out = Vec::with_capacity(rows * n);
            self.direct_amx(
                (*cpu, packed),
                d,
                win,
                &mut out.spare_capacity_mut()[..rows * n],
                residual,
                relu,
            );
            // SAFETY: `direct_amx` wrote all `rows * n` values (each chunk's `gemm_uninit`
            // writes every column of every row of its chunk).
            unsafe { out.set_len(rows * n) };
            return Act {
                data: out,
                n: x.n,
                h: ho,
                w: wo,
                c: n,
            };
        }
        let mut out = vec![0f32; rows * n];
        let last = d.blocks.len() - 1;
        // One run of `len` input values, or zeros outside the image (or past the chunk).
        let run = |r: Option<usize>, seg: (usize, usize, usize), len: usize| {
            r.and_then(|r| win.run(win.pixel(r), seg, len))
                .unwrap_or(&d.zeros[..len])
        };
        out.par_chunks_mut(TASK_ROWS * n)
            .enumerate()
            .for_each(|(chunk, dst)| {
                let r0 = chunk * TASK_ROWS;
                let m = dst.len() / n;
                let res = residual.map(|r| &r.data[r0 * n..(r0 + m) * n]);
                let mut a: Vec<[&[f32]; MR]> = Vec::new();
                let mut a_bf16 = BfRows::default();
                for j0 in (0..n).step_by(N_BLOCK) {
                    for (bi, block) in d.blocks.iter().enumerate() {
                        for i0 in (0..m).step_by(MR) {
                            a.clear();
                            a.extend(block.segs.iter().map(|&seg| {
                                std::array::from_fn(|i| {
                                    let r = (i0 + i < m).then_some(r0 + i0 + i);
                                    run(r, seg, block.len)
                                })
                            }));
                            if let Some(Bf16Weights::Avx512(cpu, _)) = &d.bf16 {
                                a_bf16.fill(*cpu, &a, block.len);
                            }
                            for col0 in (j0..n.min(j0 + N_BLOCK)).step_by(NR) {
                                let epilogue = (bi == last).then_some(Epilogue {
                                    bias: Some(&self.bias),
                                    scale: None,
                                    residual: res,
                                    relu,
                                });
                                let o = TileOut {
                                    out: &mut *dst,
                                    ldc: n,
                                    row0: i0,
                                    rows: m - i0,
                                    col0,
                                    accumulate: bi > 0,
                                    epilogue,
                                };
                                match &d.bf16 {
                                    Some(Bf16Weights::Avx512(cpu, packed)) => {
                                        cpu_gemm_bf16::tile(*cpu, &a_bf16, packed, block.k0, o)
                                    }
                                    _ => {
                                        cpu_gemm::tile(d.cpu, &a, block.len, &d.packed, block.k0, o)
                                    }
                                }
                            }
                        }
                    }
                }
            });
        Act {
            data: out,
            n: x.n,
            h: ho,
            w: wo,
            c: n,
        }
    }

    /// The direct convolution on AMX tiles: each chunk of output pixels gathers its K segments
    /// (one run of input values per pixel and segment, as the f32 tile reads them through
    /// `win`) into bf16 rows, zeros outside the image, and multiplies them in one call.
    fn direct_amx(
        &self,
        (cpu, packed): (Amx, &PackedAmx),
        d: &Direct,
        win: Window<'_>,
        out: &mut [MaybeUninit<f32>],
        residual: Option<&Act>,
        relu: bool,
    ) {
        let n = self.c_out;
        let task_rows = amx_task_rows(packed.k(), out.len() / n);
        let segs = d.blocks.iter().map(|b| b.segs.len()).sum();
        out.par_chunks_mut(task_rows * n)
            .enumerate()
            .for_each(|(chunk, dst)| {
                let r0 = chunk * task_rows;
                let m = dst.len() / n;
                let ep = Epilogue {
                    bias: Some(&self.bias),
                    scale: None,
                    residual: residual.map(|r| &r.data[r0 * n..(r0 + m) * n]),
                    relu,
                };
                let mut parts: Vec<(usize, usize, Option<&[f32]>)> = Vec::with_capacity(segs);
                AmxRows::with(|rows| {
                    rows.reset(m, packed.k());
                    for i in 0..m {
                        let px = win.pixel(r0 + i);
                        parts.clear();
                        for block in &d.blocks {
                            for (s, &seg) in block.segs.iter().enumerate() {
                                let at = block.k0 + s * block.len;
                                parts.push((at, block.len, win.run(px, seg, block.len)));
                            }
                        }
                        rows.fill_row(cpu, i, &parts);
                    }
                    cpu_amx::gemm_uninit(cpu, rows, packed, dst, n, ep);
                });
            });
    }

    /// im2col and the `gemm` crate, where AVX-512 does not run.
    fn forward_im2col(&self, x: &Act, residual: Option<&Act>, relu: bool) -> Act {
        let ho = (x.h + 2 * self.pad - self.k) / self.stride + 1;
        let wo = (x.w + 2 * self.pad - self.k) / self.stride + 1;
        let rows = x.n * ho * wo;
        let kdim = self.k * self.k * self.c_in;
        let direct = self.k == 1 && self.stride == 1 && self.pad == 0;
        let mut out = vec![0f32; rows * self.c_out];
        out.par_chunks_mut(CHUNK_ROWS * self.c_out)
            .enumerate()
            .for_each(|(chunk, dst)| {
                let r0 = chunk * CHUNK_ROWS;
                let m = dst.len() / self.c_out;
                let gemm_into = |lhs: &[f32], dst: &mut [f32]| {
                    // SAFETY: row-major m x kdim, kdim x c_out and m x c_out buffers of exactly
                    // those sizes; dst is exclusively this chunk's.
                    unsafe {
                        gemm::gemm(
                            m,
                            self.c_out,
                            kdim,
                            dst.as_mut_ptr(),
                            1,
                            self.c_out as isize,
                            false,
                            lhs.as_ptr(),
                            1,
                            kdim as isize,
                            self.weight.as_ptr(),
                            1,
                            self.c_out as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                };
                if direct {
                    gemm_into(&x.data[r0 * self.c_in..(r0 + m) * self.c_in], dst);
                } else {
                    PATCHES.with(|cell| {
                        let mut patches = cell.borrow_mut();
                        self.im2col_into(&mut patches, x, ho, wo, r0, m);
                        gemm_into(&patches[..m * kdim], dst);
                    });
                }
                let res = residual.map(|r| &r.data[r0 * self.c_out..(r0 + m) * self.c_out]);
                for (i, row) in dst.chunks_exact_mut(self.c_out).enumerate() {
                    for (v, b) in row.iter_mut().zip(&self.bias) {
                        *v += b;
                    }
                    if let Some(res) = res {
                        for (v, r) in row
                            .iter_mut()
                            .zip(&res[i * self.c_out..(i + 1) * self.c_out])
                        {
                            *v += r;
                        }
                    }
                    if relu {
                        for v in row.iter_mut() {
                            *v = v.max(0.0);
                        }
                    }
                }
            });
        Act {
            data: out,
            n: x.n,
            h: ho,
            w: wo,
            c: self.c_out,
        }
    }

    /// Writes the `m x (k*k*c_in)` patch matrix of output rows `r0..r0+m` into `buf` (zeros
    /// outside the image). Every element is written, so `buf` is reused without clearing.
    fn im2col_into(&self, buf: &mut Vec<f32>, x: &Act, ho: usize, wo: usize, r0: usize, m: usize) {
        let kdim = self.k * self.k * self.c_in;
        if buf.len() < m * kdim {
            buf.resize(m * kdim, 0.0);
        }
        let run = self.k * self.c_in;
        for (i, row) in buf[..m * kdim].chunks_exact_mut(kdim).enumerate() {
            let r = r0 + i;
            let (img, rem) = (r / (ho * wo), r % (ho * wo));
            let (oy, ox) = (rem / wo, rem % wo);
            // Input columns ix = ox*stride + kx - pad for kx in 0..k are consecutive pixels,
            // so each kernel row is one contiguous copy of its in-image part.
            let x0 = (ox * self.stride) as isize - self.pad as isize;
            let kx_lo = ((-x0).max(0) as usize).min(self.k);
            let kx_hi = ((x.w as isize - x0).min(self.k as isize)).max(kx_lo as isize) as usize;
            for (ky, dst) in row.chunks_exact_mut(run).enumerate() {
                let iy = (oy * self.stride + ky) as isize - self.pad as isize;
                if iy < 0 || iy >= x.h as isize || kx_lo == kx_hi {
                    dst.fill(0.0);
                    continue;
                }
                let ix = (x0 + kx_lo as isize) as usize;
                let src = ((img * x.h + iy as usize) * x.w + ix) * x.c;
                let (lo, hi) = (kx_lo * self.c_in, kx_hi * self.c_in);
                dst[..lo].fill(0.0);
                dst[lo..hi].copy_from_slice(&x.data[src..src + hi - lo]);
                dst[hi..].fill(0.0);
            }
        }
    }
}

/// NCHW values as an NHWC activation, rows in parallel (candle's permute copies on one thread).
fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Act {
    let mut data = vec![0f32; n * h * w * c];
    data.par_chunks_mut((w * c).max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            let (img, y) = (r / h, r % h);
            for ch in 0..c {
                let plane = &x[((img * c + ch) * h + y) * w..][..w];
                for (px, v) in plane.iter().enumerate() {
                    dst[px * c + ch] = *v;
                }
            }
        });
    Act { data, n, h, w, c }
}

/// `x` with `pad` zero pixels around each image.
fn pad_nhwc(x: &Act, pad: usize) -> Act {
    let (h, w) = (x.h + 2 * pad, x.w + 2 * pad);
    let mut data = vec![0f32; x.n * h * w * x.c];
    let row = x.w * x.c;
    data.par_chunks_mut((w * x.c).max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            let (img, y) = (r / h, r % h);
            if (pad..pad + x.h).contains(&y) {
                let src = (img * x.h + y - pad) * row;
                dst[pad * x.c..pad * x.c + row].copy_from_slice(&x.data[src..src + row]);
            }
        });
    Act {
        data,
        n: x.n,
        h,
        w,
        c: x.c,
    }
}

thread_local! {
    /// Each worker thread's patch matrix, reused across chunks and layers (allocating and
    /// zeroing one per chunk cost more than the copy itself).
    static PATCHES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Block {
    convs: Vec<Conv>,
    downsample: Option<Conv>,
}

/// A folded ResNet ready for fast CPU inference.
pub struct CpuResNet {
    stem: Conv,
    blocks: Vec<Block>,
    dim: usize,
}

impl CpuResNet {
    /// Takes the weights of a ResNet whose batch-norm is folded ([`ResNet::fold_batch_norm`]),
    /// to compute in f32.
    pub fn new(folded: &ResNet) -> Result<Self> {
        Self::with_bf16(folded, false)
    }

    /// As [`CpuResNet::new`], with `bf16` products (f32 sums): `compute: bf16`. On AMX tiles
    /// every convolution; on the `vdpbf16ps` tile those whose K segments have even length (all
    /// but the stem). An error where the CPU lacks AVX512-BF16 (or AVX-512F).
    pub fn with_bf16(folded: &ResNet, bf16: bool) -> Result<Self> {
        let bf16 = bf16.then(Bf16Cpu::detect).transpose()?;
        let conv = |c: &ConvBn| Conv::from_folded(c, bf16);
        let blocks = folded
            .layers
            .iter()
            .flatten()
            .map(|b| {
                Ok(Block {
                    convs: b.convs.iter().map(conv).collect::<Result<_>>()?,
                    downsample: b.downsample.as_ref().map(conv).transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(CpuResNet {
            stem: conv(&folded.stem)?,
            blocks,
            dim: folded.dim(),
        })
    }

    /// `[B, 3, H, W]` normalised images (any device; computed on CPU) to `[B, dim]` features.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        let nchw = xs
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let x = nchw_to_nhwc(&nchw, n, c, h, w);
        let x = self.stem.forward(&x, None, true);
        let mut x = max_pool_3x3_s2(&x);
        for block in &self.blocks {
            let last = block.convs.len() - 1;
            let shortcut = block
                .downsample
                .as_ref()
                .map(|d| d.forward(&x, None, false));
            let mut y = block.convs[0].forward(&x, None, true);
            for conv in &block.convs[1..last] {
                y = conv.forward(&y, None, true);
            }
            y = block.convs[last].forward(&y, Some(shortcut.as_ref().unwrap_or(&x)), true);
            x = y;
        }
        let pooled = global_average(&x);
        Tensor::from_vec(pooled, (n, self.dim), xs.device())
    }
}

/// MaxPool2d(3, stride 2, padding 1) in NHWC; padding never wins (inputs follow a ReLU... and
/// every window holds at least one real pixel, which is all that is compared).
fn max_pool_3x3_s2(x: &Act) -> Act {
    let ho = (x.h + 2 - 3) / 2 + 1;
    let wo = (x.w + 2 - 3) / 2 + 1;
    let mut out = vec![f32::NEG_INFINITY; x.n * ho * wo * x.c];
    out.par_chunks_mut(wo * x.c)
        .enumerate()
        .for_each(|(r, dst)| {
            let (img, oy) = (r / ho, r % ho);
            for ox in 0..wo {
                let o = &mut dst[ox * x.c..(ox + 1) * x.c];
                for ky in 0..3 {
                    let iy = (oy * 2 + ky) as isize - 1;
                    if iy < 0 || iy >= x.h as isize {
                        continue;
                    }
                    for kx in 0..3 {
                        let ix = (ox * 2 + kx) as isize - 1;
                        if ix < 0 || ix >= x.w as isize {
                            continue;
                        }
                        let src = ((img * x.h + iy as usize) * x.w + ix as usize) * x.c;
                        for (v, s) in o.iter_mut().zip(&x.data[src..src + x.c]) {
                            *v = v.max(*s);
                        }
                    }
                }
            }
        });
    Act {
        data: out,
        n: x.n,
        h: ho,
        w: wo,
        c: x.c,
    }
}

fn global_average(x: &Act) -> Vec<f32> {
    let per = x.h * x.w;
    let mut out = vec![0f32; x.n * x.c];
    for (img, o) in out.chunks_exact_mut(x.c).enumerate() {
        for px in x.data[img * per * x.c..(img + 1) * per * x.c].chunks_exact(x.c) {
            for (v, s) in o.iter_mut().zip(px) {
                *v += s;
            }
        }
        for v in o.iter_mut() {
            *v /= per as f32;
        }
    }
    out
}
