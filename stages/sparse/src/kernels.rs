//! CPU kernels: blocked gather -> GEMM -> accumulate, deterministic for any thread count.
//!
//! Forward (`gather_conv`): output rows are cut into fixed blocks of [`BLOCK`] rows; each block
//! is owned by exactly one rayon task, which for every offset gathers the input rows feeding
//! it, multiplies them by that offset's `C_in x C_out` weight with a single-threaded GEMM and
//! adds the products into its own rows. No two tasks ever write the same row (so there is no
//! scatter race, unlike spconv 2.3.8's CPU scatter-add), and a row's sum is always taken in
//! offset order: results are bit-identical with 1 or N threads.
//!
//! Weight gradient (`weight_grad`): rows are cut into a number of chunks that depends only on
//! the row count; a dense chunk of a narrow input is one work item (im2col + GEMM), any other
//! chunk one item per offset. Each item produces a partial gradient and the partials are summed
//! in chunk order. Again independent of the thread count.
//!
//! On x86-64 CPUs with AVX2 the block and item bodies run compiled for AVX2 (runtime
//! detection). They perform the same operations in the same order as the portable build (no
//! fused multiply-add), so the choice changes speed only, never bits.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::rulebook::{NbrMap, NONE};

/// Output rows per forward work item (fixed: the partition must not depend on threads).
pub const BLOCK: usize = 256;

/// Element types the CPU kernels handle.
pub trait Float:
    Copy + Send + Sync + Default + std::ops::AddAssign + std::ops::Mul<Output = Self> + 'static
{
    /// Multiplicative identity, for GEMM's scale factors.
    const ONE: Self;
}

impl Float for f32 {
    const ONE: Self = 1.0;
}

impl Float for f64 {
    const ONE: Self = 1.0;
}

#[derive(Default)]
struct Scratch<T> {
    rows: Vec<usize>,
    src: Vec<usize>,
    lhs: Vec<T>,
    rhs: Vec<T>,
    tmp: Vec<T>,
}

/// Row-major `dst[m, n] (+)= lhs[m, k] * rhs[k, n]` with explicit row strides.
///
/// # Safety
/// The pointers must address `m x k`, `k x n` and `m x n` matrices with the given row strides
/// (column stride 1 unless `lhs_t`, where `lhs` is read as the transpose of a row-major
/// `k x m` matrix with row stride `lhs_rs`).
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn gemm_rm<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    accumulate: bool,
    lhs: *const T,
    lhs_rs: usize,
    lhs_t: bool,
    rhs: *const T,
    rhs_rs: usize,
) {
    let (l_cs, l_rs) = if lhs_t {
        (lhs_rs as isize, 1)
    } else {
        (1, lhs_rs as isize)
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        lhs,
        l_cs,
        l_rs,
        rhs,
        1,
        rhs_rs as isize,
        T::ONE,
        T::ONE,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Collects, for offset `k` and destination rows `r0..r0 + m`, the local rows that have a
/// source and the sources. Returns whether the sources are exactly `r0..r0 + m` (the centre
/// offset of a submanifold map, which needs no gather).
fn collect(
    map: &NbrMap,
    k: usize,
    r0: usize,
    m: usize,
    scr_rows: &mut Vec<usize>,
    scr_src: &mut Vec<usize>,
) -> bool {
    scr_rows.clear();
    scr_src.clear();
    let kk = map.k;
    let mut identity = true;
    for r in 0..m {
        let s = map.idx[(r0 + r) * kk + k];
        if s != NONE {
            identity &= s as usize == r0 + r;
            scr_rows.push(r);
            scr_src.push(s as usize);
        }
    }
    identity && scr_rows.len() == m
}

fn gather<T: Float>(buf: &mut Vec<T>, x: &[T], c: usize, rows: &[usize]) {
    buf.clear();
    buf.reserve(rows.len() * c);
    for &s in rows {
        buf.extend_from_slice(&x[s * c..(s + 1) * c]);
    }
}

/// Below this many rows an offset's product is done by a plain loop: a GEMM call's fixed
/// cost dominates such tiny products (typical of scattered sites).
const SMALL: usize = 8;

/// `dst[0..n] += a * row[0..n]`, vectorised by the compiler.
#[inline]
fn axpy<T: Float>(dst: &mut [T], a: T, row: &[T]) {
    for (d, &v) in dst.iter_mut().zip(row) {
        *d += a * v;
    }
}

/// Fill ratio of a block's neighbour table above which a full im2col (zeros for inactive
/// neighbours) and one GEMM with inner dimension `K * C_in` beat per-offset GEMMs.
const DENSE_FILL: f64 = 0.5;

/// Widest input for which the forward uses an im2col: with wide inputs the per-offset GEMMs
/// are already efficient (inner dimension `C_in`) and the im2col's zeros would be wasted work.
const IM2COL_MAX_CIN: usize = 64;

/// If rows `r0..r0 + m` of `map` are dense enough, writes their im2col `[m, K * cin]` into
/// `buf` and returns true.
fn im2col<T: Float>(
    map: &NbrMap,
    x: &[T],
    cin: usize,
    r0: usize,
    m: usize,
    buf: &mut Vec<T>,
) -> bool {
    let kk = map.k;
    let tab = &map.idx[r0 * kk..(r0 + m) * kk];
    let pairs = tab.iter().filter(|&&s| s != NONE).count();
    if (pairs as f64) < DENSE_FILL * tab.len() as f64 {
        return false;
    }
    im2col_all(map, x, cin, r0, m, buf);
    true
}

/// Writes the im2col `[m, K * cin]` of rows `r0..r0 + m` of `map` into `buf` (zeros for
/// inactive neighbours).
fn im2col_all<T: Float>(map: &NbrMap, x: &[T], cin: usize, r0: usize, m: usize, buf: &mut Vec<T>) {
    let kk = map.k;
    let tab = &map.idx[r0 * kk..(r0 + m) * kk];
    buf.clear();
    buf.reserve(m * kk * cin);
    for &s in tab {
        if s == NONE {
            buf.extend(std::iter::repeat_n(T::default(), cin));
        } else {
            let s = s as usize;
            buf.extend_from_slice(&x[s * cin..(s + 1) * cin]);
        }
    }
}

/// `out[r] = sum_k x[map[r, k]] * w[k]` with `x: [src_rows, cin]`, `w: [K, cin, cout]`,
/// `out: [rows, cout]`, all row-major.
pub fn gather_conv<T: Float>(map: &NbrMap, x: &[T], cin: usize, w: &[T], cout: usize) -> Vec<T> {
    let n = map.rows;
    let kk = map.k;
    assert_eq!(x.len(), map.src_rows * cin, "gather_conv: input rows");
    assert_eq!(w.len(), kk * cin * cout, "gather_conv: weight shape");
    if n == 0 || cout == 0 {
        return vec![T::default(); n * cout];
    }
    // Not `vec![0; ..]`: calloc'd pages would be faulted in twice (zero page on the first
    // read, copy on the first write) by one thread; each block zeroes its own rows instead,
    // in parallel and while they are hot in cache.
    let mut out: Vec<T> = alloc_big(n * cout);
    out.spare_capacity_mut()[..n * cout]
        .par_chunks_mut(BLOCK * cout)
        .enumerate()
        .for_each_init(Scratch::<T>::default, |scr, (b, ob)| {
            let ob = init_zero(ob);
            #[cfg(target_arch = "x86_64")]
            if fma_available() {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                unsafe { conv_block_avx2(map, x, cin, w, cout, b, ob, scr) };
                return;
            }
            conv_block(map, x, cin, w, cout, b, ob, scr);
        });
    // SAFETY: the blocks cover all `n * cout` elements and each was initialised.
    unsafe { out.set_len(n * cout) };
    out
}

/// An empty vector with room for `len` elements. Large buffers are advised to use
/// transparent huge pages (Linux): a fresh 12.8 MB output otherwise costs ~3000 page faults,
/// which took as long as the convolution itself on scattered sites.
fn alloc_big<T>(len: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = len * std::mem::size_of::<T>();
        if bytes >= 2 * HUGE {
            let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
            let end = (v.as_ptr() as usize + bytes) / HUGE * HUGE;
            if end > start {
                // SAFETY: advice only, on whole pages inside this allocation; no memory is
                // read, written or unmapped. Failure (e.g. THP disabled) is harmless.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
    v
}

/// Zero-initialises `buf` and returns it as an initialised slice.
fn init_zero<T: Float>(buf: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    for e in buf.iter_mut() {
        e.write(T::default());
    }
    // SAFETY: every element was just written; MaybeUninit<T> has T's layout.
    unsafe { &mut *(buf as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// Whether the CPU has AVX2 and FMA (cached by std).
#[cfg(target_arch = "x86_64")]
#[inline]
fn fma_available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// [`conv_block`] compiled for AVX2: the same operations in the same order (so the same
/// bits), on 256-bit vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_block_avx2<T: Float>(
    map: &NbrMap,
    x: &[T],
    cin: usize,
    w: &[T],
    cout: usize,
    b: usize,
    ob: &mut [T],
    scr: &mut Scratch<T>,
) {
    conv_block(map, x, cin, w, cout, b, ob, scr)
}

/// Forward of output block `b` (rows `b * BLOCK..`, already zeroed in `ob`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn conv_block<T: Float>(
    map: &NbrMap,
    x: &[T],
    cin: usize,
    w: &[T],
    cout: usize,
    b: usize,
    ob: &mut [T],
    scr: &mut Scratch<T>,
) {
    let kk = map.k;
    let r0 = b * BLOCK;
    let m = ob.len() / cout;
    if cin > 0 && cin <= IM2COL_MAX_CIN && im2col(map, x, cin, r0, m, &mut scr.lhs) {
        // SAFETY: lhs is m x (kk * cin), w is (kk * cin) x cout, ob is m x cout.
        unsafe {
            gemm_rm(
                m,
                cout,
                kk * cin,
                ob.as_mut_ptr(),
                false,
                scr.lhs.as_ptr(),
                kk * cin,
                false,
                w.as_ptr(),
                cout,
            )
        };
        return;
    }
    for k in 0..kk {
        let identity = collect(map, k, r0, m, &mut scr.rows, &mut scr.src);
        let mk = scr.rows.len();
        if mk == 0 || cin == 0 {
            continue;
        }
        let wk_s = &w[k * cin * cout..(k + 1) * cin * cout];
        if mk <= SMALL {
            for (&r, &src) in scr.rows.iter().zip(&scr.src) {
                row_times(
                    &mut ob[r * cout..(r + 1) * cout],
                    &x[src * cin..(src + 1) * cin],
                    wk_s,
                );
            }
            continue;
        }
        let wk = wk_s.as_ptr();
        let lhs = if identity {
            x[r0 * cin..].as_ptr()
        } else {
            gather(&mut scr.lhs, x, cin, &scr.src);
            scr.lhs.as_ptr()
        };
        if mk == m {
            // SAFETY: lhs is mk x cin (gathered or a contiguous slice of x), wk is
            // cin x cout, ob is m x cout, all row-major and in bounds.
            unsafe {
                gemm_rm(
                    m,
                    cout,
                    cin,
                    ob.as_mut_ptr(),
                    true,
                    lhs,
                    cin,
                    false,
                    wk,
                    cout,
                )
            };
        } else {
            scr.tmp.clear();
            scr.tmp.resize(mk * cout, T::default());
            // SAFETY: as above with tmp of mk x cout.
            unsafe {
                gemm_rm(
                    mk,
                    cout,
                    cin,
                    scr.tmp.as_mut_ptr(),
                    false,
                    lhs,
                    cin,
                    false,
                    wk,
                    cout,
                )
            };
            for (t, &r) in scr.rows.iter().enumerate() {
                let dst = &mut ob[r * cout..(r + 1) * cout];
                for (d, &v) in dst.iter_mut().zip(&scr.tmp[t * cout..(t + 1) * cout]) {
                    *d += v;
                }
            }
        }
    }
}

/// `dst += xrow * w` for one row (`w: [cin, cout]`), summing over `ci` in order. The common
/// `cout == 32` keeps the accumulator in registers.
#[inline(always)]
fn row_times<T: Float>(dst: &mut [T], xrow: &[T], w: &[T]) {
    const C: usize = 32;
    if dst.len() == C {
        let mut acc = [T::default(); C];
        acc.copy_from_slice(dst);
        for (ci, &a) in xrow.iter().enumerate() {
            let wr = &w[ci * C..(ci + 1) * C];
            for (d, &v) in acc.iter_mut().zip(wr) {
                *d += a * v;
            }
        }
        dst.copy_from_slice(&acc);
    } else {
        let cout = dst.len();
        for (ci, &a) in xrow.iter().enumerate() {
            axpy(dst, a, &w[ci * cout..(ci + 1) * cout]);
        }
    }
}

/// One weight-gradient work item: chunk `c`, offset `ko` (all offsets, im2col, if `None`).
struct WgradItem<'a, T> {
    map: &'a NbrMap,
    x: &'a [T],
    cin: usize,
    g: &'a [T],
    cout: usize,
    chunk: usize,
    batch: usize,
    c: usize,
    ko: Option<usize>,
}

/// [`wgrad_item`] compiled for AVX2 (same operations, same order, same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wgrad_item_avx2<T: Float>(job: &WgradItem<'_, T>, scr: &mut Scratch<T>) -> Vec<T> {
    wgrad_item(job, scr)
}

/// The partial gradient of one work item: `[K, cin, cout]` for a dense chunk, `[cin, cout]`
/// for one offset.
#[inline(always)]
fn wgrad_item<T: Float>(job: &WgradItem<'_, T>, scr: &mut Scratch<T>) -> Vec<T> {
    let WgradItem {
        map,
        x,
        cin,
        g,
        cout,
        chunk,
        batch,
        c,
        ko,
    } = *job;
    let n = map.rows;
    let kk = map.k;
    let wsz = cin * cout;
    let c0 = c * chunk;
    let c1 = (c0 + chunk).min(n);
    let Some(k) = ko else {
        let mut acc = vec![T::default(); kk * wsz];
        for r0 in (c0..c1).step_by(BLOCK) {
            let m = BLOCK.min(c1 - r0);
            im2col_all(map, x, cin, r0, m, &mut scr.lhs);
            // SAFETY: lhs is m x (kk * cin) row-major (read transposed), g rows
            // r0..r0 + m are m x cout, acc is (kk * cin) x cout.
            unsafe {
                gemm_rm(
                    kk * cin,
                    cout,
                    m,
                    acc.as_mut_ptr(),
                    true,
                    scr.lhs.as_ptr(),
                    kk * cin,
                    true,
                    g[r0 * cout..].as_ptr(),
                    cout,
                )
            };
        }
        return acc;
    };
    let mut acc = vec![T::default(); wsz];
    let mut r0 = c0;
    while r0 < c1 {
        let m = batch.min(c1 - r0);
        let identity = collect(map, k, r0, m, &mut scr.rows, &mut scr.src);
        let mk = scr.rows.len();
        let b0 = r0;
        r0 += m;
        if mk == 0 {
            continue;
        }
        if mk <= SMALL {
            for (&r, &src) in scr.rows.iter().zip(&scr.src) {
                let gr = &g[(b0 + r) * cout..(b0 + r + 1) * cout];
                for (ci, &a) in x[src * cin..(src + 1) * cin].iter().enumerate() {
                    axpy(&mut acc[ci * cout..(ci + 1) * cout], a, gr);
                }
            }
            continue;
        }
        let lhs = if identity {
            x[b0 * cin..].as_ptr()
        } else {
            gather(&mut scr.lhs, x, cin, &scr.src);
            scr.lhs.as_ptr()
        };
        let rhs = if mk == m {
            g[b0 * cout..].as_ptr()
        } else {
            scr.rhs.clear();
            scr.rhs.reserve(mk * cout);
            for &r in &scr.rows {
                scr.rhs
                    .extend_from_slice(&g[(b0 + r) * cout..(b0 + r + 1) * cout]);
            }
            scr.rhs.as_ptr()
        };
        // SAFETY: lhs is mk x cin row-major (read transposed as cin x mk), rhs is
        // mk x cout, acc is cin x cout, all in bounds.
        unsafe {
            gemm_rm(
                cin,
                cout,
                mk,
                acc.as_mut_ptr(),
                true,
                lhs,
                cin,
                true,
                rhs,
                cout,
            )
        };
    }
    acc
}

/// Rows of a weight-gradient chunk: a function of the row count only.
fn wgrad_chunk(n: usize) -> usize {
    n.div_ceil(64).max(BLOCK).next_multiple_of(BLOCK)
}

/// Elements of a gathered operand per weight-gradient GEMM (rows x channels), so that the two
/// gathered operands stay in L2.
const WGRAD_BATCH_ELEMS: usize = 32 * 1024;

/// `gw[k] = sum_r x[map[r, k]]^T * g[r]` with `x: [src_rows, cin]`, `g: [rows, cout]`,
/// result `[K, cin, cout]`.
///
/// Work items are (row chunk, offset) pairs, so that even a small map (one chunk) keeps all
/// threads busy; each item gathers the pairs of its offset in batches and runs one GEMM per
/// batch with the long pair dimension as the inner one (no zero padding, unlike an im2col).
/// The per-item partials are summed in chunk order: the result does not depend on the thread
/// count.
pub fn weight_grad<T: Float>(map: &NbrMap, x: &[T], cin: usize, g: &[T], cout: usize) -> Vec<T> {
    let n = map.rows;
    let kk = map.k;
    let wsz = cin * cout;
    assert_eq!(x.len(), map.src_rows * cin, "weight_grad: input rows");
    assert_eq!(g.len(), n * cout, "weight_grad: gradient rows");
    if n == 0 || wsz == 0 {
        return vec![T::default(); kk * wsz];
    }
    let chunk = wgrad_chunk(n);
    let nchunks = n.div_ceil(chunk);
    let batch = (WGRAD_BATCH_ELEMS / cin.max(cout)).clamp(16, chunk);
    // A dense chunk of a narrow input is one item (im2col + one GEMM per block, inner
    // dimension = block rows); any other chunk is split into one item per offset.
    let dense: Vec<bool> = (0..nchunks)
        .map(|c| {
            let (c0, c1) = (c * chunk, ((c + 1) * chunk).min(n));
            let tab = &map.idx[c0 * kk..c1 * kk];
            cin <= IM2COL_MAX_CIN
                && tab.iter().filter(|&&s| s != NONE).count() as f64
                    >= DENSE_FILL * tab.len() as f64
        })
        .collect();
    // Items in chunk order: (chunk, None) for a dense chunk, (chunk, Some(k)) otherwise.
    let items: Vec<(usize, Option<usize>)> = (0..nchunks)
        .flat_map(|c| {
            let ks: Vec<Option<usize>> = if dense[c] {
                vec![None]
            } else {
                (0..kk).map(Some).collect()
            };
            ks.into_iter().map(move |k| (c, k))
        })
        .collect();
    let partials: Vec<Vec<T>> = items
        .par_iter()
        .map_init(Scratch::<T>::default, |scr, &(c, ko)| {
            let job = WgradItem {
                map,
                x,
                cin,
                g,
                cout,
                chunk,
                batch,
                c,
                ko,
            };
            #[cfg(target_arch = "x86_64")]
            if fma_available() {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                return unsafe { wgrad_item_avx2(&job, scr) };
            }
            wgrad_item(&job, scr)
        })
        .collect();
    // Start of each chunk's items in `partials`.
    let first: Vec<usize> = dense
        .iter()
        .scan(0, |acc, &d| {
            let f = *acc;
            *acc += if d { 1 } else { kk };
            Some(f)
        })
        .collect();
    let mut total = vec![T::default(); kk * wsz];
    // Sum in chunk order: deterministic, parallel over offsets.
    total.par_chunks_mut(wsz).enumerate().for_each(|(k, t)| {
        for c in 0..nchunks {
            let p = if dense[c] {
                &partials[first[c]][k * wsz..(k + 1) * wsz]
            } else {
                &partials[first[c] + k][..]
            };
            for (a, &b) in t.iter_mut().zip(p) {
                *a += b;
            }
        }
    });
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(map: &NbrMap, x: &[f64], cin: usize, w: &[f64], cout: usize) -> Vec<f64> {
        let mut out = vec![0.0; map.rows * cout];
        for r in 0..map.rows {
            for k in 0..map.k {
                let s = map.idx[r * map.k + k];
                if s == NONE {
                    continue;
                }
                for ci in 0..cin {
                    for co in 0..cout {
                        out[r * cout + co] +=
                            x[s as usize * cin + ci] * w[(k * cin + ci) * cout + co];
                    }
                }
            }
        }
        out
    }

    fn naive_wgrad(map: &NbrMap, x: &[f64], cin: usize, g: &[f64], cout: usize) -> Vec<f64> {
        let mut out = vec![0.0; map.k * cin * cout];
        for r in 0..map.rows {
            for k in 0..map.k {
                let s = map.idx[r * map.k + k];
                if s == NONE {
                    continue;
                }
                for ci in 0..cin {
                    for co in 0..cout {
                        out[(k * cin + ci) * cout + co] +=
                            x[s as usize * cin + ci] * g[r * cout + co];
                    }
                }
            }
        }
        out
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    #[test]
    fn kernels_match_naive_and_are_thread_independent() {
        // A map with identity centre, random other offsets and NONEs, over several blocks.
        for fill in [0.8, 0.1, 0.02] {
            check_map(fill);
        }
    }

    fn check_map(fill: f64) {
        let (rows, src_rows, k, cin, cout) = (2100, 2100, 9, 5, 3);
        let mut seed = 7;
        let mut idx = vec![NONE; rows * k];
        for r in 0..rows {
            idx[r * k + 4] = r as u32;
            for o in [0, 1, 2, 3, 5, 6, 7, 8] {
                if lcg(&mut seed) + 0.5 < fill {
                    idx[r * k + o] =
                        ((lcg(&mut seed) + 0.5) * src_rows as f64) as u32 % src_rows as u32;
                }
            }
        }
        let map = NbrMap {
            rows,
            src_rows,
            k,
            idx,
        };
        let x: Vec<f64> = (0..src_rows * cin).map(|_| lcg(&mut seed)).collect();
        let w: Vec<f64> = (0..k * cin * cout).map(|_| lcg(&mut seed)).collect();
        let g: Vec<f64> = (0..rows * cout).map(|_| lcg(&mut seed)).collect();
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                (
                    gather_conv(&map, &x, cin, &w, cout),
                    weight_grad(&map, &x, cin, &g, cout),
                )
            })
        };
        let (y1, gw1) = run(1);
        let (y2, gw2) = run(2);
        let (y3, gw3) = run(3);
        assert_eq!(y1, y2);
        assert_eq!(y1, y3);
        assert_eq!(gw1, gw2);
        assert_eq!(gw1, gw3);
        let yn = naive(&map, &x, cin, &w, cout);
        let gn = naive_wgrad(&map, &x, cin, &g, cout);
        for (a, b) in y1.iter().zip(&yn) {
            assert!((a - b).abs() < 1e-12);
        }
        for (a, b) in gw1.iter().zip(&gn) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
