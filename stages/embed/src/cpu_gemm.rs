//! The AVX-512 GEMM tile behind the CPU ResNet and ViT paths. The weights (`B`) are packed
//! once, at load, into panels of [`NR`] columns, so no call re-packs them. The activations
//! (`A`) are not packed at all: a tile of [`MR`] output rows reads each of its rows through its
//! own slice, one per K segment, which lets a convolution read its input in place (each kernel
//! position of each output pixel is a contiguous run of input channels) instead of writing an
//! im2col matrix. Bias, residual and ReLU are applied while the tile is still in registers.
//!
//! Only x86-64 with AVX-512F runs it ([`Avx512::detect`]); callers keep a portable path.

/// Rows of a register tile (output pixels or tokens).
pub(crate) const MR: usize = 6;
/// Columns of a register tile (output channels): four 16-lane vectors, 24 accumulators.
pub(crate) const NR: usize = 64;

/// A `k x n` row-major matrix laid out for the tile: panels of [`NR`] columns (the last one
/// zero-padded), each `k` rows of `NR` contiguous values, so one tile streams its panel.
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs row-major `b` (`k * n` values).
    pub(crate) fn new(k: usize, n: usize, b: &[f32]) -> Self {
        assert_eq!(b.len(), k * n, "a {k} x {n} matrix");
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for (jp, panel) in data.chunks_exact_mut(k * NR).enumerate() {
            let j0 = jp * NR;
            let w = NR.min(n - j0);
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                dst[..w].copy_from_slice(&b[p * n + j0..p * n + j0 + w]);
            }
        }
        PackedB { k, n, data }
    }

    /// Packs `w` stored `n x k` row-major (a linear layer's `[out, in]` weight), i.e. `B = wᵀ`.
    pub(crate) fn from_transposed(n: usize, k: usize, w: &[f32]) -> Self {
        assert_eq!(w.len(), k * n, "a {n} x {k} matrix");
        Self::from_columns(k, n, |j| &w[j * k..(j + 1) * k])
    }

    /// Packs the `k x n` matrix whose column `j` is `col(j)` (`k` values): attention's `Kᵀ`,
    /// read from the rows of the qkv projection without a transposed copy.
    pub(crate) fn from_columns<'a>(k: usize, n: usize, col: impl Fn(usize) -> &'a [f32]) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for j in 0..n {
            let panel = &mut data[(j / NR) * k * NR..];
            for (p, v) in col(j)[..k].iter().enumerate() {
                panel[p * NR + j % NR] = *v;
            }
        }
        PackedB { k, n, data }
    }

    /// Packs the `k x n` matrix whose row `p` is `row(p)` (`n` values): attention's `V`.
    pub(crate) fn from_rows<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [f32]) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for p in 0..k {
            let src = &row(p)[..n];
            for (jp, part) in src.chunks(NR).enumerate() {
                data[jp * k * NR + p * NR..][..part.len()].copy_from_slice(part);
            }
        }
        PackedB { k, n, data }
    }

    /// Rows (the reduction length).
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Columns (outputs).
    pub(crate) fn n(&self) -> usize {
        self.n
    }
}

/// Proof that this CPU runs AVX-512F: only [`Avx512::detect`] makes one, so a function taking
/// it may call the `avx512f` kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// `Some` where the running CPU has AVX-512F (checked at run time).
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(Avx512(()));
        }
        None
    }
}

/// What is applied to a finished tile, in this order: bias (per column), scale (per column,
/// a ViT's LayerScale), residual (same layout as the output), ReLU.
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub scale: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

/// Where one register tile goes: `rows <= MR` rows of `out` starting at `row0` (row stride
/// `ldc`), columns `col0..col0 + min(NR, n - col0)`.
pub(crate) struct TileOut<'a> {
    pub out: &'a mut [f32],
    pub ldc: usize,
    pub row0: usize,
    pub rows: usize,
    pub col0: usize,
    /// Adds to what `out` holds (a later K block) instead of overwriting it.
    pub accumulate: bool,
    /// `Some` on the last K block: the epilogue to apply. `residual` is indexed like `out`.
    pub epilogue: Option<Epilogue<'a>>,
}

/// Checks that the tile at `o` (of a matrix with `n` columns) lies inside `o.out` and its
/// epilogue's vectors, and returns its rows and columns: the bounds the unchecked kernels of
/// both precisions rely on.
pub(crate) fn check_out(o: &TileOut<'_>, n: usize) -> (usize, usize) {
    assert!(o.col0 < n && o.rows >= 1, "empty tile");
    let w = NR.min(n - o.col0);
    let rows = o.rows.min(MR);
    let end = (o.row0 + rows - 1) * o.ldc + o.col0 + w;
    assert!(end <= o.out.len(), "tile outside the output");
    if let Some(ep) = &o.epilogue {
        assert!(ep.bias.is_none_or(|b| b.len() >= o.col0 + w), "short bias");
        assert!(
            ep.scale.is_none_or(|s| s.len() >= o.col0 + w),
            "short scale"
        );
        assert!(ep.residual.is_none_or(|r| r.len() >= end), "short residual");
    }
    (rows, w)
}

/// `out[tile] (+)= Σ_s Σ_p a[s][i][p] * B[k0 + s * len + p][cols]` for the tile's rows `i`:
/// `a` holds, per K segment `s`, one slice per tile row (at least `len` long; rows past
/// `rows` are read but not stored, so any slice will do there).
///
/// Panics when a slice is shorter than it says, the segments overrun `B`, or the tile does
/// not fit `out` — the checks that make the unchecked kernel sound.
pub(crate) fn tile(
    _cpu: Avx512,
    a: &[[&[f32]; MR]],
    len: usize,
    b: &PackedB,
    k0: usize,
    mut o: TileOut<'_>,
) {
    assert!(k0 + a.len() * len <= b.k, "K segments overrun B");
    assert!(
        a.iter().flatten().all(|row| row.len() >= len),
        "short A row"
    );
    let (rows, w) = check_out(&o, b.n);
    let panel = &b.data[(o.col0 / NR) * b.k * NR + k0 * NR..];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `Avx512` exists only where AVX-512F was detected. The asserts above bound every
    // access: the kernel reads `len` values of each A slice, `a.len() * len` rows of NR values
    // of `panel` (within B's panel, as k0 + a.len() * len <= k), and reads/writes `w` columns
    // of `rows` rows of `out` (and of the residual, as long as `out`) ending at `end`.
    unsafe {
        avx512::tile(a, len, panel.as_ptr(), &mut o, rows, w)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("Avx512 is never constructed off x86-64: {panel:?} {rows} {w}")
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{TileOut, MR, NR};
    use std::arch::x86_64::*;

    /// The lanes of vector `q` (0..4) that fall inside `w` columns.
    fn mask(w: usize, q: usize) -> __mmask16 {
        let lo = q * 16;
        if w >= lo + 16 {
            0xffff
        } else if w > lo {
            ((1u32 << (w - lo)) - 1) as u16
        } else {
            0
        }
    }

    /// SAFETY (caller): AVX-512F is available; each A slice holds `len` values; `b` points to
    /// `a.len() * len * NR` readable values; rows `0..rows` (<= MR), columns `0..w` (<= NR) of
    /// the tile at (`o.row0`, `o.col0`) lie inside `o.out` and the residual.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        a: &[[&[f32]; MR]],
        len: usize,
        b: *const f32,
        o: &mut TileOut<'_>,
        rows: usize,
        w: usize,
    ) {
        // Twenty-four named accumulators: an array here is kept in memory by LLVM (every FMA
        // then stores), which halves the speed.
        let z = _mm512_setzero_ps();
        let (mut c00, mut c01, mut c02, mut c03) = (z, z, z, z);
        let (mut c10, mut c11, mut c12, mut c13) = (z, z, z, z);
        let (mut c20, mut c21, mut c22, mut c23) = (z, z, z, z);
        let (mut c30, mut c31, mut c32, mut c33) = (z, z, z, z);
        let (mut c40, mut c41, mut c42, mut c43) = (z, z, z, z);
        let (mut c50, mut c51, mut c52, mut c53) = (z, z, z, z);
        let mut b = b;
        for seg in a {
            let [a0, a1, a2, a3, a4, a5] = seg.map(<[f32]>::as_ptr);
            for p in 0..len {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                let b2 = _mm512_loadu_ps(b.add(32));
                let b3 = _mm512_loadu_ps(b.add(48));
                macro_rules! row {
                    ($a:ident, $x0:ident, $x1:ident, $x2:ident, $x3:ident) => {
                        let av = _mm512_set1_ps(*$a.add(p));
                        $x0 = _mm512_fmadd_ps(av, b0, $x0);
                        $x1 = _mm512_fmadd_ps(av, b1, $x1);
                        $x2 = _mm512_fmadd_ps(av, b2, $x2);
                        $x3 = _mm512_fmadd_ps(av, b3, $x3);
                    };
                }
                row!(a0, c00, c01, c02, c03);
                row!(a1, c10, c11, c12, c13);
                row!(a2, c20, c21, c22, c23);
                row!(a3, c30, c31, c32, c33);
                row!(a4, c40, c41, c42, c43);
                row!(a5, c50, c51, c52, c53);
                b = b.add(NR);
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

    /// Adds the epilogue to the accumulators and writes them (kept out of line: indexing the
    /// accumulators by a run-time row count inside `tile` would spill them).
    ///
    /// SAFETY (caller): AVX-512F is available; [`super::check_out`] accepted `o` with these
    /// `rows` and `w`.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn store(
        acc: &[[__m512; 4]; MR],
        o: &mut TileOut<'_>,
        rows: usize,
        w: usize,
    ) {
        let masks = [mask(w, 0), mask(w, 1), mask(w, 2), mask(w, 3)];
        let base = o.out.as_mut_ptr();
        for (i, row) in acc.iter().enumerate().take(rows) {
            let at = (o.row0 + i) * o.ldc + o.col0;
            let cp = base.add(at);
            for (q, &v) in row.iter().enumerate() {
                let m = masks[q];
                let mut v = v;
                if o.accumulate {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, cp.add(16 * q)));
                }
                if let Some(ep) = &o.epilogue {
                    if let Some(bias) = ep.bias {
                        let bp = bias.as_ptr().add(o.col0 + 16 * q);
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bp));
                    }
                    if let Some(scale) = ep.scale {
                        let sp = scale.as_ptr().add(o.col0 + 16 * q);
                        v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, sp));
                    }
                    if let Some(res) = ep.residual {
                        let rp = res.as_ptr().add(at + 16 * q);
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, rp));
                    }
                    if ep.relu {
                        v = _mm512_max_ps(v, _mm512_setzero_ps());
                    }
                }
                _mm512_mask_storeu_ps(cp.add(16 * q), m, v);
            }
        }
    }
}

/// Output columns computed together per K block by [`gemm`]: their packed weights (`kc` x 256
/// floats, 512 KiB at `kc` 512) stay in L2 while every row tile of the call reads them.
const N_BLOCK: usize = 256;

/// `c = a · B (+ epilogue)` for row-major `a` (`m x k`, row stride `lda`) and `c` (`m x n`, row
/// stride `ldc`; the residual indexed like `c`), K (>= 1) in blocks of at most `kc`: the plain
/// GEMM of a linear layer or of attention. Single-threaded; callers split rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    cpu: Avx512,
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue<'_>,
    kc: usize,
) {
    let (k, n) = (b.k, b.n);
    let kc = kc.max(1);
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
                for col0 in (j0..n.min(j0 + N_BLOCK)).step_by(NR) {
                    tile(
                        cpu,
                        &[seg],
                        len,
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
mod tests {
    use super::*;

    /// The independent oracle: a triple loop in f64.
    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        c
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 2654435761 + seed * 97) % 2001) as f32 - 1000.0) / 1000.0)
            .collect()
    }

    #[test]
    fn gemm_matches_a_triple_loop_on_odd_sizes() {
        let Some(cpu) = Avx512::detect() else {
            eprintln!("no AVX-512F here: the kernel is not used on this CPU");
            return;
        };
        // M, N, K remainders of every kind: below one tile, one over, K not a multiple of
        // the block, N across several panels with a ragged last one.
        for (m, n, k, kc) in [
            (1, 1, 1, 512),
            (5, 17, 3, 512),
            (7, 65, 129, 64),
            (13, 130, 300, 128),
            (6, 64, 512, 512),
            (19, 200, 1000, 256),
        ] {
            let a = values(m * k, m + n);
            let b = values(k * n, k);
            let bias = values(n, 7);
            let scale = values(n, 8);
            let residual = values(m * n, 9);
            let want = naive(m, n, k, &a, &b);
            let packed = PackedB::new(k, n, &b);
            for relu in [false, true] {
                let mut c = vec![f32::NAN; m * n];
                let ep = Epilogue {
                    bias: Some(&bias),
                    scale: Some(&scale),
                    residual: Some(&residual),
                    relu,
                };
                gemm(cpu, &a, k, m, &packed, &mut c, n, ep, kc);
                for (idx, (got, want)) in c.iter().zip(&want).enumerate() {
                    let j = idx % n;
                    let mut want = (want + bias[j] as f64) * scale[j] as f64 + residual[idx] as f64;
                    if relu {
                        want = want.max(0.0);
                    }
                    let tol = 1e-5 * (k as f64).sqrt().max(1.0) * want.abs().max(1.0);
                    assert!(
                        (*got as f64 - want).abs() <= tol,
                        "{m}x{n}x{k} kc {kc} relu {relu} at {idx}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn transposed_packing_equals_packing_the_transpose() {
        let (n, k) = (70, 9);
        let w = values(n * k, 3);
        let mut t = vec![0f32; k * n];
        for j in 0..n {
            for p in 0..k {
                t[p * n + j] = w[j * k + p];
            }
        }
        let want = PackedB::new(k, n, &t).data;
        assert_eq!(PackedB::from_transposed(n, k, &w).data, want);
        assert_eq!(PackedB::from_rows(k, n, |p| &t[p * n..]).data, want);
    }
}
