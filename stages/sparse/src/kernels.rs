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
//! the row count; each chunk produces a partial `[K, C_in, C_out]` gradient, and the partials
//! are summed in chunk order. Again independent of the thread count.

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
    true
}

/// `out[r] = sum_k x[map[r, k]] * w[k]` with `x: [src_rows, cin]`, `w: [K, cin, cout]`,
/// `out: [rows, cout]`, all row-major.
pub fn gather_conv<T: Float>(map: &NbrMap, x: &[T], cin: usize, w: &[T], cout: usize) -> Vec<T> {
    let n = map.rows;
    let kk = map.k;
    assert_eq!(x.len(), map.src_rows * cin, "gather_conv: input rows");
    assert_eq!(w.len(), kk * cin * cout, "gather_conv: weight shape");
    let mut out = vec![T::default(); n * cout];
    if n == 0 || cout == 0 {
        return out;
    }
    out.par_chunks_mut(BLOCK * cout).enumerate().for_each_init(
        Scratch::<T>::default,
        |scr, (b, ob)| {
            let r0 = b * BLOCK;
            let m = ob.len() / cout;
            if cin > 0 && im2col(map, x, cin, r0, m, &mut scr.lhs) {
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
                        let dst = &mut ob[r * cout..(r + 1) * cout];
                        for (ci, &a) in x[src * cin..(src + 1) * cin].iter().enumerate() {
                            axpy(dst, a, &wk_s[ci * cout..(ci + 1) * cout]);
                        }
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
        },
    );
    out
}

/// Number of chunks of the weight gradient: a function of the row count only.
fn wgrad_chunk(n: usize) -> usize {
    n.div_ceil(64).max(1024).next_multiple_of(BLOCK)
}

/// `gw[k] = sum_r x[map[r, k]]^T * g[r]` with `x: [src_rows, cin]`, `g: [rows, cout]`,
/// result `[K, cin, cout]`.
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
    let partials: Vec<Vec<T>> = (0..nchunks)
        .into_par_iter()
        .map_init(Scratch::<T>::default, |scr, c| {
            let mut acc = vec![T::default(); kk * wsz];
            let c0 = c * chunk;
            let c1 = (c0 + chunk).min(n);
            for r0 in (c0..c1).step_by(BLOCK) {
                let m = BLOCK.min(c1 - r0);
                if im2col(map, x, cin, r0, m, &mut scr.lhs) {
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
                    continue;
                }
                for k in 0..kk {
                    let identity = collect(map, k, r0, m, &mut scr.rows, &mut scr.src);
                    let mk = scr.rows.len();
                    if mk == 0 {
                        continue;
                    }
                    if mk <= SMALL {
                        let acc_k = &mut acc[k * wsz..(k + 1) * wsz];
                        for (&r, &src) in scr.rows.iter().zip(&scr.src) {
                            let gr = &g[(r0 + r) * cout..(r0 + r + 1) * cout];
                            for (ci, &a) in x[src * cin..(src + 1) * cin].iter().enumerate() {
                                axpy(&mut acc_k[ci * cout..(ci + 1) * cout], a, gr);
                            }
                        }
                        continue;
                    }
                    let lhs = if identity {
                        x[r0 * cin..].as_ptr()
                    } else {
                        gather(&mut scr.lhs, x, cin, &scr.src);
                        scr.lhs.as_ptr()
                    };
                    let rhs = if mk == m {
                        g[r0 * cout..].as_ptr()
                    } else {
                        scr.rhs.clear();
                        for &r in &scr.rows {
                            scr.rhs
                                .extend_from_slice(&g[(r0 + r) * cout..(r0 + r + 1) * cout]);
                        }
                        scr.rhs.as_ptr()
                    };
                    let dst = acc[k * wsz..(k + 1) * wsz].as_mut_ptr();
                    // SAFETY: lhs is mk x cin row-major (read transposed as cin x mk), rhs is
                    // mk x cout, dst is cin x cout, all in bounds.
                    unsafe { gemm_rm(cin, cout, mk, dst, true, lhs, cin, true, rhs, cout) };
                }
            }
            acc
        })
        .collect();
    let mut total = vec![T::default(); kk * wsz];
    // Element-wise sum in chunk order: deterministic, parallel over elements.
    total.par_chunks_mut(1024).enumerate().for_each(|(e, t)| {
        let len = t.len();
        for p in &partials {
            for (a, &b) in t.iter_mut().zip(&p[e * 1024..e * 1024 + len]) {
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
