//! The bf16 twin of the [`cpu_gemm`] tile, for `compute: bf16` on CPUs with AVX512-BF16
//! (`vdpbf16ps`: each 32-bit lane adds the products of two bf16 pairs to an f32 accumulator,
//! twice the multiplies per instruction of an f32 FMA). Weights are rounded to bf16 and packed
//! once, at load, in pairs of K rows; a tile's activation rows are rounded to bf16 once per K
//! block and reused for every column panel. Sums, bias, residual and the output stay f32, so
//! the only error is the rounding of both operands to bf16's 8-bit mantissa.
//!
//! Only x86-64 with AVX-512F and AVX512-BF16 runs it ([`Avx512Bf16::detect`]).

use crate::cpu_amx::{Amx, PackedAmx};
use crate::cpu_gemm::{check_out, Avx512, Epilogue, TileOut, MR, NR};

/// What `compute: bf16` on a CPU without the instructions says.
pub(crate) const MISSING: &str = "compute bf16 on the CPU needs AVX512-BF16 (vdpbf16ps: Intel Cooper Lake / Sapphire Rapids or later, AMD Zen 4 or later), which this CPU lacks: use `compute: f32`";

/// Proof that this CPU runs AVX-512F and AVX512-BF16: only [`Avx512Bf16::detect`] makes one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512Bf16(#[allow(dead_code)] Avx512);

impl Avx512Bf16 {
    /// `Some` where the running CPU has AVX-512F, -BW, -VL and AVX512-BF16 (checked at run
    /// time; every CPU with the last has the others).
    pub(crate) fn detect() -> Option<Self> {
        let f32_tile = Avx512::detect()?;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Some(Avx512Bf16(f32_tile));
        }
        let _ = f32_tile;
        None
    }
}

/// The bf16 kernel `compute: bf16` runs on this CPU: AMX tiles where the CPU and the OS offer
/// them (8192 multiply-adds per instruction), else the `vdpbf16ps` tile.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bf16Cpu {
    Amx(Amx),
    Avx512(Avx512Bf16),
}

impl Bf16Cpu {
    /// The fastest bf16 kernel of the running CPU, or the error `compute: bf16` reports.
    pub(crate) fn detect() -> candle_core::Result<Self> {
        let chosen = match (Amx::detect(), Avx512Bf16::detect()) {
            (Some(amx), _) => Bf16Cpu::Amx(amx),
            (None, Some(cpu)) => Bf16Cpu::Avx512(cpu),
            (None, None) => return Err(candle_core::Error::Msg(MISSING.into())),
        };
        // Which kernel runs decides the speed (the vdpbf16ps tile is slower than f32 on
        // some Intel CPUs): say it, so that a user timing `compute: bf16` knows what ran.
        match chosen {
            Bf16Cpu::Amx(_) => tracing::info!("compute bf16 on the CPU: AMX tiles"),
            Bf16Cpu::Avx512(_) => tracing::info!(
                "compute bf16 on the CPU: AVX512-BF16 vdpbf16ps (no AMX here, or TESSERA_CPU_AMX=0)"
            ),
        }
        Ok(chosen)
    }
}

/// A weight rounded to bf16 and packed for the kernel [`Bf16Cpu`] chose.
pub(crate) enum Bf16Weights {
    Amx(Amx, PackedAmx),
    Avx512(Avx512Bf16, PackedBf16),
}

impl Bf16Weights {
    /// Packs row-major `b` (`k * n` values).
    pub(crate) fn new(cpu: Bf16Cpu, k: usize, n: usize, b: &[f32]) -> Self {
        match cpu {
            Bf16Cpu::Amx(amx) => Bf16Weights::Amx(amx, PackedAmx::new(k, n, b)),
            Bf16Cpu::Avx512(cpu) => Bf16Weights::Avx512(cpu, PackedBf16::new(k, n, b)),
        }
    }

    /// Packs `w` stored `n x k` row-major (a linear layer's `[out, in]` weight), i.e. `B = wᵀ`.
    pub(crate) fn from_transposed(cpu: Bf16Cpu, n: usize, k: usize, w: &[f32]) -> Self {
        match cpu {
            Bf16Cpu::Amx(amx) => Bf16Weights::Amx(amx, PackedAmx::from_transposed(n, k, w)),
            Bf16Cpu::Avx512(cpu) => Bf16Weights::Avx512(cpu, PackedBf16::from_transposed(n, k, w)),
        }
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as `vcvtneps2bf16` rounds; NaN stays NaN.
pub(crate) fn to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let bits = x.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 `h`.
#[cfg(test)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A `k x n` matrix in bf16, laid out for the tile: panels of [`NR`] columns, each `k / 2`
/// (rounded up, the last row zero when `k` is odd) pairs of rows stored as `NR` interleaved
/// `(row 2q, row 2q + 1)` pairs, the operand order of `vdpbf16ps`.
pub(crate) struct PackedBf16 {
    k: usize,
    n: usize,
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Rounds and packs the `k x n` matrix whose element `(p, j)` is `at(p, j)`.
    fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let kp = k.div_ceil(2) * 2;
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; panels * kp * NR];
        for (jp, panel) in data.chunks_exact_mut(kp * NR).enumerate() {
            let j0 = jp * NR;
            let w = NR.min(n - j0);
            for (q, pair) in panel.chunks_exact_mut(2 * NR).enumerate() {
                for t in 0..2 {
                    let p = 2 * q + t;
                    if p < k {
                        for j in 0..w {
                            pair[2 * j + t] = to_bf16(at(p, j0 + j));
                        }
                    }
                }
            }
        }
        PackedBf16 { k, n, data }
    }

    /// Packs row-major `b` (`k * n` values).
    pub(crate) fn new(k: usize, n: usize, b: &[f32]) -> Self {
        assert_eq!(b.len(), k * n, "a {k} x {n} matrix");
        Self::pack(k, n, |p, j| b[p * n + j])
    }

    /// Packs `w` stored `n x k` row-major (a linear layer's `[out, in]` weight), i.e. `B = wᵀ`.
    pub(crate) fn from_transposed(n: usize, k: usize, w: &[f32]) -> Self {
        assert_eq!(w.len(), k * n, "a {n} x {k} matrix");
        Self::pack(k, n, |p, j| w[j * k + p])
    }
}

/// The activation rows of one tile rounded to bf16: per K segment, [`MR`] rows of `lenp`
/// (`len` rounded up to even, zero-padded) values. Filled once per K block, read by every
/// column panel.
#[derive(Default)]
pub(crate) struct BfRows {
    data: Vec<u16>,
    segs: usize,
    len: usize,
    lenp: usize,
}

impl BfRows {
    /// Rounds `len` values of each row of each segment of `a` (as [`crate::cpu_gemm::tile`]
    /// takes them) into this buffer.
    pub(crate) fn fill(&mut self, cpu: Avx512Bf16, a: &[[&[f32]; MR]], len: usize) {
        assert!(
            a.iter().flatten().all(|row| row.len() >= len),
            "short A row"
        );
        let lenp = len.div_ceil(2) * 2;
        self.data.clear();
        self.data.resize(a.len() * MR * lenp, 0);
        (self.segs, self.len, self.lenp) = (a.len(), len, lenp);
        for (dst, src) in self.data.chunks_exact_mut(lenp).zip(a.iter().flatten()) {
            round_row(cpu, &src[..len], dst);
        }
    }
}

/// Rounds `src` to bf16 into `dst` (as long as `src`; panics when shorter).
pub(crate) fn round_row(cpu: Avx512Bf16, src: &[f32], dst: &mut [u16]) {
    let dst = &mut dst[..src.len()];
    let _ = cpu;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `cpu` proves AVX512-BF16; `dst` is as long as `src`.
    unsafe {
        kernel::round_row_avx512(src, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("Avx512Bf16 is never constructed off x86-64: {src:?} {dst:?}")
}

/// `out[tile] (+)= Σ_s Σ_p a[s][i][p] * B[k0 + s * len + p][cols]` in bf16 products and f32
/// sums, for the rows `a` holds ([`BfRows::fill`]). K pairs must not straddle segments: `k0`
/// is even, and `len` is even unless `a` is one segment that ends `B`.
///
/// Panics when these, or the bounds of `out` and the epilogue, do not hold.
pub(crate) fn tile(cpu: Avx512Bf16, a: &BfRows, b: &PackedBf16, k0: usize, mut o: TileOut<'_>) {
    assert!(k0.is_multiple_of(2), "K block starts mid-pair");
    assert!(
        a.len.is_multiple_of(2) || (a.segs == 1 && k0 + a.len == b.k),
        "odd K segments other than the last of B"
    );
    assert!(k0 + a.segs * a.len <= b.k, "K segments overrun B");
    let (rows, w) = check_out(&o, b.n);
    let kp = b.k.div_ceil(2) * 2;
    let panel = &b.data[(o.col0 / NR) * kp * NR + k0 * NR..];
    assert!(panel.len() >= a.segs * a.lenp * NR, "K segments overrun B");
    let _ = cpu;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `cpu` proves AVX-512F and AVX512-BF16. `a.data` holds `segs * MR * lenp` values;
    // the kernel reads `segs * lenp / 2` pairs of `NR` pairs from `panel` (asserted above);
    // `check_out` bounds the rows and columns written.
    unsafe {
        kernel::tile(&a.data, a.segs, a.lenp, panel.as_ptr(), &mut o, rows, w)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("Avx512Bf16 is never constructed off x86-64: {cpu:?} {panel:?} {rows} {w}")
}

#[cfg(target_arch = "x86_64")]
pub(crate) use kernel::round_row_avx512;

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{TileOut, MR, NR};
    use crate::cpu_gemm::avx512::store;
    use std::arch::x86_64::*;

    /// Rounds `src` to bf16 into `dst` (same length), 16 values per instruction.
    ///
    /// SAFETY (caller): AVX-512F, -BW, -VL and AVX512-BF16 are available.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub(crate) unsafe fn round_row_avx512(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i < n {
            let m: __mmask16 = if n - i >= 16 {
                0xffff
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            let v = _mm512_maskz_loadu_ps(m, src.as_ptr().add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, m, h);
            i += 16;
        }
    }

    /// SAFETY (caller): AVX-512F and AVX512-BF16 are available; `a` holds `segs * MR * lenp`
    /// values (`lenp` even); `b` points to `segs * lenp / 2 * 2 * NR` readable values; rows
    /// `0..rows`, columns `0..w` of the tile at (`o.row0`, `o.col0`) passed `check_out`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(
        a: &[u16],
        segs: usize,
        lenp: usize,
        b: *const u16,
        o: &mut TileOut<'_>,
        rows: usize,
        w: usize,
    ) {
        // Named accumulators, as in the f32 tile (an array would live in memory).
        let z = _mm512_setzero_ps();
        let (mut c00, mut c01, mut c02, mut c03) = (z, z, z, z);
        let (mut c10, mut c11, mut c12, mut c13) = (z, z, z, z);
        let (mut c20, mut c21, mut c22, mut c23) = (z, z, z, z);
        let (mut c30, mut c31, mut c32, mut c33) = (z, z, z, z);
        let (mut c40, mut c41, mut c42, mut c43) = (z, z, z, z);
        let (mut c50, mut c51, mut c52, mut c53) = (z, z, z, z);
        let mut b = b;
        for s in 0..segs {
            let base = a.as_ptr().add(s * MR * lenp);
            let [a0, a1, a2, a3, a4, a5]: [*const u32; MR] =
                std::array::from_fn(|i| base.add(i * lenp) as *const u32);
            for q in 0..lenp / 2 {
                let load = |at: usize| -> __m512bh {
                    std::mem::transmute(_mm512_loadu_ps(b.add(at) as *const f32))
                };
                let (b0, b1, b2, b3) = (load(0), load(32), load(64), load(96));
                macro_rules! row {
                    ($a:ident, $x0:ident, $x1:ident, $x2:ident, $x3:ident) => {
                        let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                            $a.add(q).read_unaligned() as i32,
                        ));
                        $x0 = _mm512_dpbf16_ps($x0, av, b0);
                        $x1 = _mm512_dpbf16_ps($x1, av, b1);
                        $x2 = _mm512_dpbf16_ps($x2, av, b2);
                        $x3 = _mm512_dpbf16_ps($x3, av, b3);
                    };
                }
                row!(a0, c00, c01, c02, c03);
                row!(a1, c10, c11, c12, c13);
                row!(a2, c20, c21, c22, c23);
                row!(a3, c30, c31, c32, c33);
                row!(a4, c40, c41, c42, c43);
                row!(a5, c50, c51, c52, c53);
                b = b.add(2 * NR);
            }
        }
        let acc = [
            [c00, c01, c02, c03],
            [c10, c11, c12, c13],
            [c20, c21, c22, c23],
            [c30, c31, c32, c33],
            [c40, c41, c42, c43],
            [c50, c51, c52, c53],
        ];
        store(&acc, o, rows, w);
    }
}

/// Output columns computed together per K block by [`gemm`] (as the f32 GEMM).
const N_BLOCK: usize = 256;

/// [`crate::cpu_gemm::gemm`] in bf16 products: `c = a · B (+ epilogue)`, K in blocks of at
/// most `kc` (rounded up to even). Single-threaded; callers split rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    cpu: Avx512Bf16,
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedBf16,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue<'_>,
    kc: usize,
) {
    let (k, n) = (b.k, b.n);
    let kc = kc.max(2).div_ceil(2) * 2;
    let mut rows_bf = BfRows::default();
    for j0 in (0..n).step_by(N_BLOCK) {
        for k0 in (0..k).step_by(kc) {
            let len = kc.min(k - k0);
            let last = k0 + len >= k;
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                let seg: [&[f32]; MR] = std::array::from_fn(|i| {
                    let r = i0 + i.min(rows - 1);
                    &a[r * lda + k0..r * lda + k0 + len]
                });
                rows_bf.fill(cpu, &[seg], len);
                for col0 in (j0..n.min(j0 + N_BLOCK)).step_by(NR) {
                    tile(
                        cpu,
                        &rows_bf,
                        b,
                        k0,
                        TileOut {
                            out: c,
                            ldc,
                            row0: i0,
                            rows,
                            col0,
                            accumulate: k0 > 0,
                            epilogue: last.then_some(epilogue),
                        },
                    );
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1], a different sequence per seed.
    pub(crate) fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 2654435761 + seed * 97) % 2001) as f32 - 1000.0) / 1000.0)
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa, 1.
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to 1 + 2^-6.
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    }

    /// The oracle is an f64 triple loop on the exact (unrounded) inputs. Rounding each operand
    /// to bf16 (8 significant bits, round to nearest: unit roundoff 2^-8) changes it by at most
    /// 2^-8 of itself, so each product by at most (2^-7 + 2^-16) of `|a| |b|`; the f32 sums add
    /// at most ~k 2^-24 of the same. The bound is that, over `Σ |a_p| |b_p|`, plus the
    /// epilogue's f32 rounding.
    #[test]
    fn bf16_gemm_is_within_bf16_rounding_of_f64_on_odd_sizes() {
        let Some(cpu) = Avx512Bf16::detect() else {
            eprintln!("note: no AVX512-BF16 on this CPU: the bf16 tile is not tested here");
            return;
        };
        for (m, n, k, kc) in [
            (1, 1, 1, 512),
            (5, 17, 3, 512),
            (7, 65, 129, 64),
            (13, 130, 301, 128),
            (6, 64, 512, 512),
            (19, 200, 1001, 255),
        ] {
            let a = values(m * k, m + n);
            let b = values(k * n, k);
            let bias = values(n, 7);
            let residual = values(m * n, 9);
            let packed = PackedBf16::new(k, n, &b);
            let ep = Epilogue {
                bias: Some(&bias),
                scale: None,
                residual: Some(&residual),
                relu: false,
            };
            let mut c = vec![f32::NAN; m * n];
            gemm(cpu, &a, k, m, &packed, &mut c, n, ep, kc);
            let mut worst = 0f64;
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut mag) = (0f64, 0f64);
                    for p in 0..k {
                        let prod = a[i * k + p] as f64 * b[p * n + j] as f64;
                        exact += prod;
                        mag += prod.abs();
                    }
                    let want = exact + bias[j] as f64 + residual[i * n + j] as f64;
                    let bound = (2f64.powi(-7) + 2f64.powi(-16) + k as f64 * 2f64.powi(-23)) * mag
                        + 4.0 * f32::EPSILON as f64 * want.abs().max(1.0);
                    let err = (c[i * n + j] as f64 - want).abs();
                    assert!(
                        err <= bound,
                        "{m}x{n}x{k} kc {kc} at ({i}, {j}): {} vs {want} (bound {bound})",
                        c[i * n + j]
                    );
                    worst = worst.max(err / mag.max(1e-30));
                }
            }
            // The products were rounded at all: bf16 is not secretly f32.
            if k > 100 {
                assert!(
                    worst > 1e-6,
                    "{m}x{n}x{k}: error {worst} is f32's, not bf16's"
                );
            }
        }
    }

    /// Segments of a convolution's K blocks, as the ResNet path passes them: several segments
    /// of even length, the A rows read through their own slices.
    #[test]
    fn bf16_tile_with_segments_equals_the_rounded_product() {
        let Some(cpu) = Avx512Bf16::detect() else {
            eprintln!("note: no AVX512-BF16 on this CPU: the bf16 tile is not tested here");
            return;
        };
        let (segs, len, n, rows) = (3, 10, 70, 5);
        let k = segs * len + 4;
        let a = values(MR * k, 1);
        let b = values(k * n, 2);
        let packed = PackedBf16::new(k, n, &b);
        let k0 = 4;
        let a_segs: Vec<[&[f32]; MR]> = (0..segs)
            .map(|s| std::array::from_fn(|i| &a[i * k + k0 + s * len..][..len]))
            .collect();
        let mut bf = BfRows::default();
        bf.fill(cpu, &a_segs, len);
        let mut out = vec![0f32; rows * n];
        for col0 in (0..n).step_by(NR) {
            let o = TileOut {
                out: &mut out,
                ldc: n,
                row0: 0,
                rows,
                col0,
                accumulate: false,
                epilogue: None,
            };
            tile(cpu, &bf, &packed, k0, o);
        }
        for i in 0..rows {
            for j in 0..n {
                // Rounded operands, exact products, f64 sums: only the f32 sums differ.
                let want: f64 = (k0..k0 + segs * len)
                    .map(|p| {
                        from_bf16(to_bf16(a[i * k + p])) as f64
                            * from_bf16(to_bf16(b[p * n + j])) as f64
                    })
                    .sum();
                let got = out[i * n + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "({i}, {j}): {got} vs {want}"
                );
            }
        }
    }
}
