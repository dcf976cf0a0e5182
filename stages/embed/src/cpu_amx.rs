//! The AMX twin of the [`cpu_gemm_bf16`](crate::cpu_gemm_bf16) tile, for `compute: bf16` on
//! CPUs with Intel AMX (Sapphire Rapids and later). One `tdpbf16ps` multiplies a 16 x 32 bf16
//! tile by a 32 x 16 one into 16 x 16 f32 sums: 8192 multiply-adds per instruction, against
//! 32 for a `vdpbf16ps`. On a 2-core Xeon VM a 2 x 2 block of such tiles ran at ~1 TFLOP/s
//! on one core from L1, against ~130 GFLOP/s for the f32 FMA tile.
//!
//! The layout follows Intel's AMX guide (and oneDNN's brgemm): B is packed once, at load, in
//! panels of 16 columns whose rows are pairs of K rows interleaved (the "VNNI" order
//! `tdpbf16ps` reads), K padded to a multiple of 32 with zeros; A is rounded to bf16 into a
//! row-major buffer of padded rows ([`AmxRows`]), which the tile loads read with their row
//! stride. A block of 32 x 32 outputs keeps its four accumulator tiles in registers over the
//! whole of K, then goes through a 4 KiB scratch where bias, LayerScale, residual and ReLU
//! are applied on the way to the output. Sums are f32, so the error is that of rounding both
//! operands to bf16, as in the `vdpbf16ps` tile.
//!
//! Only Linux on x86-64 runs it: the 8 KiB tile state must be requested from the kernel
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`) before the first tile instruction. `TESSERA_CPU_AMX=0`
//! turns it off (the `vdpbf16ps` tile then runs), to compare the two.

use crate::cpu_gemm::Epilogue;
use crate::cpu_gemm_bf16::Avx512Bf16;
use std::mem::MaybeUninit;

/// Rows and columns of an output block (2 x 2 tiles of 16 x 16).
const BLOCK: usize = 32;
/// K values per tile step (64 bytes of bf16 per tile row).
const KSTEP: usize = 32;
/// Columns of a packed panel of B (one tile's width in f32 outputs).
const PANEL: usize = 16;
/// Bytes of packed B per band of columns, which stays in L2 while the rows pass by.
const L2_BAND_BYTES: usize = 512 * 1024;

/// `k` rounded up to whole tile steps: the row length of both operands.
fn padded_k(k: usize) -> usize {
    k.div_ceil(KSTEP) * KSTEP
}

/// Proof that this CPU runs AMX-BF16 and that the OS granted the tile state (and that
/// AVX512-BF16 rounds the A rows): only [`Amx::detect`] makes one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Amx(Avx512Bf16);

impl Amx {
    /// `Some` where the running CPU has AMX-TILE and AMX-BF16, Linux granted this process the
    /// tile state, and `TESSERA_CPU_AMX` is not `0`. Asks once per process.
    pub(crate) fn detect() -> Option<Self> {
        static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let bf16 = Avx512Bf16::detect()?;
        GRANTED.get_or_init(request_tiles).then_some(Amx(bf16))
    }

    /// Rounds `src` to bf16 into `dst` (as long as `src`; panics when shorter).
    pub(crate) fn round(self, src: &[f32], dst: &mut [u16]) {
        crate::cpu_gemm_bf16::round_row(self.0, src, dst)
    }
}

/// Whether the CPU has AMX-BF16 and the kernel granted the tile state.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tiles() -> bool {
    if std::env::var_os("TESSERA_CPU_AMX").is_some_and(|v| v == "0") {
        return false;
    }
    // CPUID.(EAX=7, ECX=0):EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID leaf 7 exists on every x86-64 CPU with AVX-512 (checked by the caller).
    let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted xsave
    // features; it fails (non-zero) where the kernel or hypervisor does not offer AMX.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tiles() -> bool {
    false
}

/// One cache line of bf16 values: the unit of [`Lines`], so that every tile row is aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// A 64-byte-aligned buffer of bf16 values, in whole cache lines.
#[derive(Default)]
struct Lines(Vec<Line>);

impl Lines {
    /// Zeroes and resizes to at least `len` values.
    fn zeroed(&mut self, len: usize) {
        self.0.clear();
        self.0.resize(len.div_ceil(32), Line([0; 32]));
    }

    fn values(&self) -> &[u16] {
        // SAFETY: `Line` is `repr(C)` around `[u16; 32]`, so the lines are contiguous u16s.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 32) }
    }

    fn values_mut(&mut self) -> &mut [u16] {
        // SAFETY: as in `values`, and the borrow is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 32) }
    }
}

/// A `k x n` matrix in bf16, laid out for the tile loads: panels of [`PANEL`] columns (`n`
/// padded to a whole block of two panels), each `kp / 2` rows of `PANEL` interleaved
/// `(row 2q, row 2q + 1)` pairs, `kp` being `k` rounded up to [`KSTEP`]; padding is zero.
pub(crate) struct PackedAmx {
    k: usize,
    n: usize,
    kp: usize,
    data: Lines,
}

impl PackedAmx {
    /// Rounds and packs the `k x n` matrix whose element `(p, j)` is `at(p, j)`.
    fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let mut b = Self::zeros(k, n);
        let kp = b.kp;
        for (jp, panel) in b.data.values_mut().chunks_exact_mut(kp * PANEL).enumerate() {
            let j0 = jp * PANEL;
            let w = PANEL.min(n.saturating_sub(j0));
            for p in 0..k {
                for j in 0..w {
                    panel[(p / 2) * 2 * PANEL + 2 * j + p % 2] =
                        crate::cpu_gemm_bf16::to_bf16(at(p, j0 + j));
                }
            }
        }
        b
    }

    /// Packs row-major `b` (`k * n` values).
    pub(crate) fn new(k: usize, n: usize, b: &[f32]) -> Self {
        assert_eq!(b.len(), k * n, "a {k} x {n} matrix");
        Self::pack(k, n, |p, j| b[p * n + j])
    }

    /// The `k x n` matrix of zeros, to be filled in place.
    fn zeros(k: usize, n: usize) -> Self {
        let kp = padded_k(k);
        let mut data = Lines::default();
        data.zeroed(n.div_ceil(BLOCK) * 2 * kp * PANEL);
        PackedAmx { k, n, kp, data }
    }

    /// Packs the `k x n` bf16 matrix whose column `j` is `col(j)` (`k` values): attention's
    /// `Kᵀ` from the key rows. A column's pairs of K values are adjacent, so each is one
    /// 32-bit copy.
    pub(crate) fn from_bf16_columns<'a>(
        k: usize,
        n: usize,
        col: impl Fn(usize) -> &'a [u16],
    ) -> Self {
        let mut b = Self::zeros(k, n);
        let kp = b.kp;
        let values = b.data.values_mut();
        for j in 0..n {
            let panel = &mut values[(j / PANEL) * kp * PANEL + 2 * (j % PANEL)..];
            for (q, pair) in col(j)[..k].chunks(2).enumerate() {
                panel[q * 2 * PANEL..][..pair.len()].copy_from_slice(pair);
            }
        }
        b
    }

    /// Packs the `k x n` bf16 matrix whose row `p` is `row(p)` (`n` values): attention's `V`.
    pub(crate) fn from_bf16_rows<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [u16]) -> Self {
        let mut b = Self::zeros(k, n);
        let kp = b.kp;
        let values = b.data.values_mut();
        for p in 0..k {
            let (q, t) = (p / 2, p % 2);
            for (j, v) in row(p)[..n].iter().enumerate() {
                values[(j / PANEL) * kp * PANEL + q * 2 * PANEL + 2 * (j % PANEL) + t] = *v;
            }
        }
        b
    }

    /// Packs `w` stored `n x k` row-major (a linear layer's `[out, in]` weight), i.e. `B = wᵀ`.
    pub(crate) fn from_transposed(n: usize, k: usize, w: &[f32]) -> Self {
        assert_eq!(w.len(), k * n, "a {n} x {k} matrix");
        Self::pack(k, n, |p, j| w[j * k + p])
    }

    /// Rows (the reduction length).
    pub(crate) fn k(&self) -> usize {
        self.k
    }
}

/// The A operand of one [`gemm`] call: `m` rows of `k` values rounded to bf16, row-major with
/// rows of `kp` values (`k` rounded up to [`KSTEP`]) and `m` rounded up to a block. Kept per
/// thread ([`AmxRows::with`]) so that its buffer is neither allocated nor zeroed per call:
/// [`AmxRows::reset`] zeroes only the K padding, and the caller writes every value of `0..k`
/// of every row (rows past `m` keep stale finite values, which only reach outputs never
/// stored: each output row depends on its own A row alone).
#[derive(Default)]
pub(crate) struct AmxRows {
    data: Lines,
    m: usize,
    k: usize,
    kp: usize,
}

thread_local! {
    static ROWS: std::cell::RefCell<AmxRows> = std::cell::RefCell::default();
}

impl AmxRows {
    /// Runs `f` on this thread's buffer.
    pub(crate) fn with<R>(f: impl FnOnce(&mut AmxRows) -> R) -> R {
        ROWS.with(|rows| f(&mut rows.borrow_mut()))
    }

    /// Makes room for `m` rows of `k` values, the padding of each row zero.
    pub(crate) fn reset(&mut self, m: usize, k: usize) {
        let kp = padded_k(k);
        let len = m.div_ceil(BLOCK) * BLOCK * kp;
        if self.data.0.len() * 32 < len {
            self.data.zeroed(len);
        }
        (self.m, self.k, self.kp) = (m, k, kp);
        if kp > k {
            for row in self.data.values_mut().chunks_exact_mut(kp).take(m) {
                row[k..].fill(0);
            }
        }
    }

    /// Writes row `i` from its parts `(at, len, src)`: K positions `at..at + len` get `src`
    /// (`len` values) rounded, or zeros where `src` is `None` (an input pixel outside the
    /// image). The parts must cover `0..k`.
    ///
    /// Panics when `i` or a part are out of range.
    pub(crate) fn fill_row(
        &mut self,
        cpu: Amx,
        i: usize,
        parts: &[(usize, usize, Option<&[f32]>)],
    ) {
        assert!(i < self.m, "outside the A rows");
        let (k, kp) = (self.k, self.kp);
        let row = &mut self.data.values_mut()[i * kp..i * kp + k];
        let _ = cpu;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `cpu` proves AVX512-BF16 (with AVX-512F, -BW and -VL).
        unsafe {
            kernel::fill_row(row, parts)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("Amx is never constructed off x86-64: {row:?}")
    }

    /// Copies bf16 `src` (`k` values) into row `i`.
    ///
    /// Panics when `i` is out of range or `src` is not `k` long.
    pub(crate) fn copy_row(&mut self, i: usize, src: &[u16]) {
        assert!(i < self.m && src.len() == self.k, "outside the A rows");
        let kp = self.kp;
        self.data.values_mut()[i * kp..i * kp + src.len()].copy_from_slice(src);
    }

    /// Rounds `m` rows of `k` values of row-major `a` (row stride `lda`) into this buffer.
    pub(crate) fn fill_matrix(&mut self, cpu: Amx, a: &[f32], lda: usize, m: usize, k: usize) {
        self.reset(m, k);
        for i in 0..m {
            self.fill_row(cpu, i, &[(0, k, Some(&a[i * lda..i * lda + k]))]);
        }
    }
}

/// `c = a · B`, then the epilogue (bias, scale, residual, ReLU), for the `a.m` rows of `a`
/// and every column of `b`; `c` has row stride `ldc`, the residual the same layout.
/// Single-threaded; callers split rows.
///
/// Panics when `a`'s K is not `b`'s, or `c` or the epilogue's vectors are too short.
pub(crate) fn gemm(
    cpu: Amx,
    a: &AmxRows,
    b: &PackedAmx,
    c: &mut [f32],
    ldc: usize,
    ep: Epilogue<'_>,
) {
    // SAFETY: `gemm_uninit` only writes initialised values through this view.
    let c = unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) };
    gemm_uninit(cpu, a, b, c, ldc, ep)
}

/// [`gemm`] into memory not yet initialised (a new activation, which then needs no zeroing
/// pass: ResNet-50's bf16 forward spent ~8% in that `memset`). Writes columns `0..n` of rows
/// `0..m` of `c`, and nothing else.
pub(crate) fn gemm_uninit(
    cpu: Amx,
    a: &AmxRows,
    b: &PackedAmx,
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    ep: Epilogue<'_>,
) {
    let (m, n) = (a.m, b.n);
    assert!(
        a.k == b.k && a.kp == b.kp,
        "A rows and packed B differ in K"
    );
    assert!(a.k > 0, "an empty reduction");
    if m == 0 || n == 0 {
        return;
    }
    let end = (m - 1) * ldc + n;
    assert!(ldc >= n && c.len() >= end, "output too short");
    assert!(ep.bias.is_none_or(|v| v.len() >= n), "short bias");
    assert!(ep.scale.is_none_or(|v| v.len() >= n), "short scale");
    assert!(ep.residual.is_none_or(|v| v.len() >= end), "short residual");
    let _ = cpu;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `cpu` proves AMX-BF16 with the tile state granted, and AVX-512F. `a` holds
    // `m` rounded up to BLOCK rows of `kp` values and `b` `n` rounded up to BLOCK columns of
    // `kp` rows (both by construction, with the same `kp` as their K agree); the asserts above
    // bound every element of `c` and the epilogue that is read or written.
    unsafe {
        kernel::gemm(
            a.data.values().as_ptr(),
            a.kp,
            m,
            b.data.values().as_ptr(),
            n,
            c.as_mut_ptr().cast(),
            ldc,
            &ep,
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("Amx is never constructed off x86-64: {} {ldc}", c.len())
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{Epilogue, MaybeUninit, BLOCK, KSTEP, L2_BAND_BYTES, PANEL};
    use crate::cpu_gemm_bf16::round_row_avx512;
    use std::arch::asm;

    /// [`super::AmxRows::fill_row`]'s loop, with the rounding inlined: each part `(at, len,
    /// src)` writes `len` values from `at`, `src` rounded or zeros.
    ///
    /// SAFETY (caller): AVX-512F, -BW, -VL and AVX512-BF16 are available.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub(super) unsafe fn fill_row(row: &mut [u16], parts: &[(usize, usize, Option<&[f32]>)]) {
        for &(at, len, src) in parts {
            let dst = &mut row[at..at + len];
            match src {
                Some(src) => {
                    assert_eq!(src.len(), len, "a part shorter than it says");
                    round_row_avx512(src, dst)
                }
                None => dst.fill(0),
            }
        }
    }

    /// The tile configuration (palette 1): eight tiles of 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    /// A block's four accumulator tiles, stored for the epilogue.
    #[repr(C, align(64))]
    struct Scratch([f32; BLOCK * BLOCK]);

    /// SAFETY (caller): AMX-BF16 and AVX-512F are available and the tile state is granted;
    /// `a` points to `m` rounded up to BLOCK rows of `kp` values (`kp` a multiple of KSTEP);
    /// `b` to `n` rounded up to BLOCK columns packed in panels of `kp * PANEL` values; `c`
    /// (and the residual) hold `(m - 1) * ldc + n` values; bias and scale `n`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm(
        a: *const u16,
        kp: usize,
        m: usize,
        b: *const u16,
        n: usize,
        c: *mut f32,
        ldc: usize,
        ep: &Epilogue<'_>,
    ) {
        let config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
            rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
        let mut scratch = Scratch([0.0; BLOCK * BLOCK]);
        let s = scratch.0.as_mut_ptr();
        // Bands of columns whose packed B (`kp` x `band` bf16) stays in L2 while every row
        // block of A passes by; within a band, row blocks outside and column blocks inside, so
        // that a row block's A tiles stay in L1 and its outputs are written row by row.
        let band = (L2_BAND_BYTES / (kp * 2)).max(BLOCK) / BLOCK * BLOCK;
        for j0 in (0..n).step_by(band) {
            for ib in 0..m.div_ceil(BLOCK) {
                let a0 = a.add(ib * BLOCK * kp);
                for jb in j0 / BLOCK..n.min(j0 + band).div_ceil(BLOCK) {
                    block(a0, kp, b.add(2 * jb * kp * PANEL), s);
                    let (r0, c0) = (ib * BLOCK, jb * BLOCK);
                    let (rows, w) = (BLOCK.min(m - r0), BLOCK.min(n - c0));
                    for i in 0..rows {
                        let at = (r0 + i) * ldc + c0;
                        let out = std::slice::from_raw_parts_mut(c.add(at).cast(), w);
                        let sums = &scratch.0[i * BLOCK..i * BLOCK + w];
                        let residual = ep.residual.map(|r| &r[at..at + w]);
                        finish_row(sums, out, c0, residual, ep);
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    /// One 32 x 32 block of sums into `s` (row stride [`BLOCK`]): rows `a0..` (two tiles of
    /// 16 rows of `kp` values) times the two panels from `b0`, over the whole of K. The K loop
    /// is written in assembly: the compiler's loop around per-step `asm!` blocks ran ~3x
    /// slower on a Xeon VM (2 x 2 blocks, K 384), and the tile registers are not renamed, so
    /// the order of loads and products is what the hardware gets. Each step asks for the next
    /// step's B tiles in L1 (B comes from L2; a stalled tile load stalls the block).
    ///
    /// SAFETY (caller): as [`gemm`]'s, for one block.
    #[inline(always)]
    unsafe fn block(a0: *const u16, kp: usize, b0: *const u16, s: *mut f32) {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "prefetcht0 [{b0} + 1024]",
            "prefetcht0 [{b0} + 1088]",
            "prefetcht0 [{b0} + 1152]",
            "prefetcht0 [{b0} + 1216]",
            "prefetcht0 [{b0} + 1280]",
            "prefetcht0 [{b0} + 1344]",
            "prefetcht0 [{b0} + 1408]",
            "prefetcht0 [{b0} + 1472]",
            "prefetcht0 [{b0} + 1536]",
            "prefetcht0 [{b0} + 1600]",
            "prefetcht0 [{b0} + 1664]",
            "prefetcht0 [{b0} + 1728]",
            "prefetcht0 [{b0} + 1792]",
            "prefetcht0 [{b0} + 1856]",
            "prefetcht0 [{b0} + 1920]",
            "prefetcht0 [{b0} + 1984]",
            "prefetcht0 [{b1} + 1024]",
            "prefetcht0 [{b1} + 1088]",
            "prefetcht0 [{b1} + 1152]",
            "prefetcht0 [{b1} + 1216]",
            "prefetcht0 [{b1} + 1280]",
            "prefetcht0 [{b1} + 1344]",
            "prefetcht0 [{b1} + 1408]",
            "prefetcht0 [{b1} + 1472]",
            "prefetcht0 [{b1} + 1536]",
            "prefetcht0 [{b1} + 1600]",
            "prefetcht0 [{b1} + 1664]",
            "prefetcht0 [{b1} + 1728]",
            "prefetcht0 [{b1} + 1792]",
            "prefetcht0 [{b1} + 1856]",
            "prefetcht0 [{b1} + 1920]",
            "prefetcht0 [{b1} + 1984]",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{s} + {ss}*1], tmm0",
            "tilestored [{s} + {ss}*1 + 64], tmm1",
            "tilestored [{s} + {ss}*1 + 2048], tmm2",
            "tilestored [{s} + {ss}*1 + 2112], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a0.add(PANEL * kp) => _,
            sa = in(reg) kp * 2,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b0.add(kp * PANEL) => _,
            sb = in(reg) 2 * PANEL * 2,
            steps = inout(reg) kp / KSTEP => _,
            s = in(reg) s,
            ss = in(reg) BLOCK * 4,
            options(nostack)
        );
    }

    /// One row of a block's outputs: `sums` plus bias, times scale, plus residual, ReLU.
    #[inline(always)]
    fn finish_row(
        sums: &[f32],
        out: &mut [MaybeUninit<f32>],
        c0: usize,
        residual: Option<&[f32]>,
        ep: &Epilogue<'_>,
    ) {
        let w = out.len();
        match ep.bias {
            Some(bias) => out
                .iter_mut()
                .zip(sums.iter().zip(&bias[c0..c0 + w]))
                .for_each(|(o, (s, b))| _ = o.write(s + b)),
            None => out.iter_mut().zip(sums).for_each(|(o, s)| _ = o.write(*s)),
        };
        // SAFETY: every value of `out` was written just above.
        let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
        if let Some(scale) = ep.scale {
            out.iter_mut()
                .zip(&scale[c0..c0 + w])
                .for_each(|(o, s)| *o *= s);
        }
        if let Some(res) = residual {
            out.iter_mut().zip(res).for_each(|(o, r)| *o += r);
        }
        if ep.relu {
            out.iter_mut().for_each(|o| *o = o.max(0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_gemm_bf16::tests::values;
    use crate::cpu_gemm_bf16::{from_bf16, to_bf16};

    /// Rounded operands, exact products, f64 sums: against that, only the f32 sums of the
    /// tiles differ, so the bound is a few f32 roundings of `Σ |a_p b_p|`. The same inputs
    /// through the f64 product of the unrounded operands must differ by bf16's rounding: the
    /// tile really multiplies bf16.
    #[test]
    fn amx_gemm_equals_the_bf16_rounded_product_on_odd_sizes() {
        let Some(cpu) = Amx::detect() else {
            eprintln!("note: no AMX on this CPU (or not granted): the AMX tile is not tested here");
            return;
        };
        for (m, n, k) in [
            (1, 1, 1),
            (5, 17, 3),
            (33, 65, 129),
            (31, 130, 301),
            (64, 64, 512),
            (70, 200, 1001),
        ] {
            let a = values(m * k, m + n);
            let b = values(k * n, k);
            let bias = values(n, 7);
            let scale = values(n, 8);
            let ldc = n + 3;
            let residual = values(m * ldc, 9);
            let packed = PackedAmx::new(k, n, &b);
            let mut rows = AmxRows::default();
            rows.fill_matrix(cpu, &a, k, m, k);
            let mut c = vec![f32::NAN; m * ldc];
            let ep = Epilogue {
                bias: Some(&bias),
                scale: Some(&scale),
                residual: Some(&residual),
                relu: true,
            };
            gemm(cpu, &rows, &packed, &mut c, ldc, ep);
            let mut worst_unrounded = 0f64;
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut mag, mut unrounded) = (0f64, 0f64, 0f64);
                    for p in 0..k {
                        let (x, y) = (a[i * k + p], b[p * n + j]);
                        let prod = from_bf16(to_bf16(x)) as f64 * from_bf16(to_bf16(y)) as f64;
                        exact += prod;
                        mag += prod.abs();
                        unrounded += x as f64 * y as f64;
                    }
                    let finish = |s: f64| {
                        ((s + bias[j] as f64) * scale[j] as f64 + residual[i * ldc + j] as f64)
                            .max(0.0)
                    };
                    let want = finish(exact);
                    let bound = (k as f64 * 2f64.powi(-23)) * mag * (scale[j].abs() as f64)
                        + 4.0 * f32::EPSILON as f64 * want.abs().max(1.0);
                    let got = c[i * ldc + j] as f64;
                    assert!(
                        (got - want).abs() <= bound,
                        "{m}x{n}x{k} at ({i}, {j}): {got} vs {want} (bound {bound})"
                    );
                    worst_unrounded = worst_unrounded.max((got - finish(unrounded)).abs());
                }
                // The gaps between rows of `c` are never written.
                for j in n..ldc {
                    if i + 1 < m {
                        assert!(c[i * ldc + j].is_nan(), "wrote past column {n}");
                    }
                }
            }
            if k > 100 {
                assert!(
                    worst_unrounded > 1e-4,
                    "{m}x{n}x{k}: the result is f32-exact, not bf16"
                );
            }
        }
    }

    /// Rows filled segment by segment (as a convolution does), in a buffer that held other
    /// values before, equal rows filled whole; zero parts are zeros.
    #[test]
    fn rows_filled_in_segments_equal_a_whole_fill() {
        let Some(cpu) = Amx::detect() else {
            eprintln!("note: no AMX on this CPU (or not granted): the AMX tile is not tested here");
            return;
        };
        let (m, k, n) = (3, 70, 40);
        let a = values(m * k, 3);
        let b = values(k * n, 4);
        let packed = PackedAmx::new(k, n, &b);
        let mut whole = AmxRows::default();
        whole.fill_matrix(cpu, &a, k, m, k);
        let mut parts = AmxRows::default();
        parts.fill_matrix(cpu, &values(m * 96, 5), 96, m, 96);
        parts.reset(m, k);
        for i in 0..m {
            let segs = a[i * k..(i + 1) * k].chunks(21).enumerate();
            let segs: Vec<_> = segs
                .map(|(s, seg)| (s * 21, seg.len(), Some(seg)))
                .collect();
            parts.fill_row(cpu, i, &segs);
        }
        let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
        gemm(cpu, &whole, &packed, &mut c1, n, Epilogue::default());
        gemm(cpu, &parts, &packed, &mut c2, n, Epilogue::default());
        assert_eq!(c1, c2);
        parts.reset(m, k);
        for i in 0..m {
            parts.fill_row(cpu, i, &[(0, k, None)]);
        }
        gemm(cpu, &parts, &packed, &mut c2, n, Epilogue::default());
        assert!(c2.iter().all(|v| *v == 0.0), "zero parts are not zero");
    }
}
