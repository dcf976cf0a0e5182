//! Rulebooks: for every kernel offset, which input row feeds which output row.
//!
//! A rulebook is stored as two dense neighbour maps, `[n_out, K]` (output row -> input row per
//! offset, the forward direction) and `[n_in, K]` (input row -> output row, the transposed
//! direction used by the input gradient and by transposed convolutions), with [`NONE`] where
//! the neighbour is inactive. Offset `k = di * kernel + dj` is row `di`, column `dj` of the
//! kernel, exactly as `weight[.., .., di, dj]` of a dense `conv2d` (a cross-correlation).
//!
//! Construction is O(N * kernel) after the coordinate set's sort: for every output image row
//! and every kernel row `di`, the sorted input row is walked once with a merge pointer. No
//! hash of the whole grid, no dense grid, no quadratic search.

use std::sync::{Arc, Mutex};

use candle_core::{Device, DeviceLocation, Tensor};
use rayon::prelude::*;

use crate::coords::{key_j, key_row, pack, row_i, row_shift, CoordSet, SortedIndex};
use crate::error::{Result, SparseError};

/// Marks an inactive neighbour in a [`NbrMap`].
pub const NONE: u32 = u32::MAX;

/// Which geometry a rulebook describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleKind {
    /// Output sites are the input sites; the kernel is centred (padding `kernel / 2`).
    Submanifold,
    /// Output site `o` covers inputs `[o * stride, o * stride + kernel)` per axis (no padding,
    /// like a dense `conv2d`/`max_pool2d` on the zero-filled grid); it is active when any of
    /// them is.
    Strided,
}

/// Cache key of a rulebook inside a [`CoordSet`]: convolutions and poolings with the same
/// geometry share one rulebook (and one output coordinate set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
    /// Geometry.
    pub kind: RuleKind,
    /// Kernel side.
    pub kernel: usize,
    /// Stride (1 for submanifold).
    pub stride: usize,
}

impl RuleKey {
    /// Submanifold geometry with an odd `kernel`.
    pub fn submanifold(kernel: usize) -> Self {
        RuleKey {
            kind: RuleKind::Submanifold,
            kernel,
            stride: 1,
        }
    }

    /// Strided (downsampling) geometry.
    pub fn strided(kernel: usize, stride: usize) -> Self {
        RuleKey {
            kind: RuleKind::Strided,
            kernel,
            stride,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.kernel == 0 || self.kernel > 15 {
            return Err(SparseError::InvalidConfig(format!(
                "kernel {} must lie in 1..=15",
                self.kernel
            )));
        }
        match self.kind {
            RuleKind::Submanifold if self.kernel.is_multiple_of(2) => {
                Err(SparseError::InvalidConfig(format!(
                    "submanifold kernel {} must be odd",
                    self.kernel
                )))
            }
            RuleKind::Strided if self.stride == 0 => {
                Err(SparseError::InvalidConfig("stride must be positive".into()))
            }
            _ => Ok(()),
        }
    }
}

/// A dense `[rows, k]` neighbour table: `idx[r * k + o]` is the source row feeding row `r`
/// through offset `o`, or [`NONE`].
#[derive(Debug, Clone)]
pub struct NbrMap {
    /// Number of destination rows.
    pub rows: usize,
    /// Number of source rows (for bounds checks of the features given to a kernel).
    pub src_rows: usize,
    /// Number of kernel offsets.
    pub k: usize,
    /// Row-major `[rows, k]` table.
    pub idx: Vec<u32>,
}

impl NbrMap {
    /// Number of (source, destination) pairs, i.e. of `C_in x C_out` products a convolution
    /// through this map performs.
    pub fn num_pairs(&self) -> usize {
        self.idx.par_iter().filter(|&&s| s != NONE).count()
    }

    /// The pairs of offset `k` as `(destination rows, source rows)`.
    pub fn pairs(&self, k: usize) -> (Vec<u32>, Vec<u32>) {
        let mut dst = Vec::new();
        let mut src = Vec::new();
        for r in 0..self.rows {
            let s = self.idx[r * self.k + k];
            if s != NONE {
                dst.push(r as u32);
                src.push(s);
            }
        }
        (dst, src)
    }
}

/// Per-device copies of index tensors, so that GPU layers upload a rulebook once.
pub(crate) type DeviceCache<T> = Mutex<Vec<(DeviceLocation, T)>>;

pub(crate) fn cached<T: Clone>(
    cache: &DeviceCache<T>,
    device: &Device,
    make: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    let loc = device.location();
    let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, v)) = guard.iter().find(|(l, _)| *l == loc) {
        return Ok(v.clone());
    }
    let v = make()?;
    guard.push((loc, v.clone()));
    Ok(v)
}

/// The input/output correspondence of one geometry on one coordinate set.
pub struct Rulebook {
    key: RuleKey,
    out_coords: Option<Arc<CoordSet>>,
    fwd: NbrMap,
    bwd: NbrMap,
    /// Neighbour gathers per direction and device (the device-generic convolution, pooling).
    pub(crate) gather_cache: [DeviceCache<Arc<crate::gather::RowGather>>; 2],
    pub(crate) count_cache: DeviceCache<Tensor>,
}

impl std::fmt::Debug for Rulebook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rulebook")
            .field("key", &self.key)
            .field("n_in", &self.fwd.src_rows)
            .field("n_out", &self.fwd.rows)
            .finish()
    }
}

impl Rulebook {
    /// Builds the rulebook of `key` over `input` (prefer [`CoordSet::rulebook`], which caches).
    pub fn build(input: &CoordSet, key: RuleKey) -> Result<Self> {
        key.validate()?;
        let (out_coords, fwd, bwd) = match key.kind {
            RuleKind::Submanifold => {
                let pad = (key.kernel / 2) as i64;
                let fwd = neighbour_map(input.index(), input.index(), key.kernel, 1, pad);
                let bwd = mirror(&fwd);
                (None, fwd, bwd)
            }
            RuleKind::Strided => {
                let out = downsample(input, key.kernel, key.stride);
                let fwd = neighbour_map(input.index(), out.index(), key.kernel, key.stride, 0);
                let bwd = transpose(&fwd);
                (Some(out), fwd, bwd)
            }
        };
        Ok(Rulebook {
            key,
            out_coords,
            fwd,
            bwd,
            gather_cache: Default::default(),
            count_cache: Default::default(),
        })
    }

    /// Geometry of this rulebook.
    pub fn key(&self) -> RuleKey {
        self.key
    }

    /// Output coordinate set of a strided rulebook (`None` for submanifold: same as input).
    pub fn out_coords(&self) -> Option<&Arc<CoordSet>> {
        self.out_coords.as_ref()
    }

    /// `[n_out, K]`: input row per output row and offset.
    pub fn forward_map(&self) -> &NbrMap {
        &self.fwd
    }

    /// `[n_in, K]`: output row per input row and offset.
    pub fn backward_map(&self) -> &NbrMap {
        &self.bwd
    }

    /// Number of active sites of the input.
    pub fn n_in(&self) -> usize {
        self.fwd.src_rows
    }

    /// Number of active sites of the output.
    pub fn n_out(&self) -> usize {
        self.fwd.rows
    }

    /// Number of (input, output) pairs over all offsets.
    pub fn num_pairs(&self) -> usize {
        self.fwd.num_pairs()
    }
}

/// Sorted positions per parallel work item of the neighbour search.
const SEARCH_CHUNK: usize = 2048;

/// For every destination site `(b, oi, oj)` (in `dst`'s feature-row order) and offset
/// `(di, dj)`, the source site `(b, oi * stride + di - pad, oj * stride + dj - pad)`.
fn neighbour_map(
    src: &SortedIndex,
    dst: &SortedIndex,
    kernel: usize,
    stride: usize,
    pad: i64,
) -> NbrMap {
    let k = kernel * kernel;
    let n = dst.keys.len();
    let (kernel_i, stride_i) = (kernel as i64, stride as i64);
    // Rows are written straight to their feature row (`dst.feature_row`), each exactly once
    // (the map from sorted position to feature row is a bijection), so there is no sorted
    // intermediate table to permute afterwards.
    let mut idx: Vec<u32> = Vec::with_capacity(n * k);
    let base_ptr = SendPtr(idx.as_mut_ptr());
    (0..n.div_ceil(SEARCH_CHUNK)).into_par_iter().for_each(|c| {
        let base_ptr = &base_ptr;
        let s0 = c * SEARCH_CHUNK;
        let s1 = (s0 + SEARCH_CHUNK).min(n);
        let row_of = |t: usize| -> &mut [u32] {
            // SAFETY: `feature_row` is a bijection onto 0..n, so row `t`'s k entries are
            // inside the allocation and touched by this task only; they are initialised
            // (to NONE) before the slice is formed.
            unsafe {
                let p = base_ptr.0.add(dst.feature_row(t) as usize * k);
                std::slice::from_raw_parts_mut(p, k)
            }
        };
        for t in s0..s1 {
            // SAFETY: as above; writes k u32s of this task's own row (all bits set = NONE).
            unsafe {
                std::ptr::write_bytes(base_ptr.0.add(dst.feature_row(t) as usize * k), 0xFF, k)
            };
        }
        let mut s = s0;
        while s < s1 {
            let r = dst.row_of(s);
            let row = dst.rows[r];
            let row_end = (dst.row_start[r + 1] as usize).min(s1);
            let base = row_i(row) * stride_i - pad - row_i(row);
            for di in 0..kernel_i {
                let Some(seg) = row_shift(row, base + di).and_then(|sr| src.row_range(sr)) else {
                    continue;
                };
                let mut p = seg.start;
                for t in s..row_end {
                    let lo = key_j(dst.keys[t]) * stride_i - pad;
                    while p < seg.end && key_j(src.keys[p]) < lo {
                        p += 1;
                    }
                    let mut q = p;
                    if q < seg.end && key_j(src.keys[q]) - lo < kernel_i {
                        let out = row_of(t);
                        while q < seg.end {
                            let dj = key_j(src.keys[q]) - lo;
                            if dj >= kernel_i {
                                break;
                            }
                            out[(di * kernel_i + dj) as usize] = src.feature_row(q);
                            q += 1;
                        }
                    }
                }
            }
            s = row_end;
        }
    });
    // SAFETY: every one of the n rows (k entries each) was initialised above.
    unsafe { idx.set_len(n * k) };
    NbrMap {
        rows: n,
        src_rows: src.keys.len(),
        k,
        idx,
    }
}

/// A raw pointer shared by tasks that write disjoint rows.
struct SendPtr(*mut u32);

// SAFETY: only used for disjoint writes, see `neighbour_map`.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Transposed map of a submanifold rulebook: offset `k` backwards is offset `K - 1 - k`.
fn mirror(fwd: &NbrMap) -> NbrMap {
    let k = fwd.k;
    let mut idx = vec![NONE; fwd.idx.len()];
    idx.par_chunks_mut(k)
        .zip(fwd.idx.par_chunks(k))
        .for_each(|(b, f)| {
            for o in 0..k {
                b[o] = f[k - 1 - o];
            }
        });
    NbrMap {
        rows: fwd.src_rows,
        src_rows: fwd.rows,
        k,
        idx,
    }
}

/// Transposed map of any rulebook (each offset is a partial bijection).
fn transpose(fwd: &NbrMap) -> NbrMap {
    let k = fwd.k;
    let mut idx = vec![NONE; fwd.src_rows * k];
    for (o, row) in fwd.idx.chunks(k).enumerate() {
        for (off, &s) in row.iter().enumerate() {
            if s != NONE {
                idx[s as usize * k + off] = o as u32;
            }
        }
    }
    NbrMap {
        rows: fwd.src_rows,
        src_rows: fwd.rows,
        k,
        idx,
    }
}

/// Output sites of a strided geometry: every `o >= 0` whose window
/// `[o * stride, o * stride + kernel)` holds an active site, per axis.
fn downsample(input: &CoordSet, kernel: usize, stride: usize) -> Arc<CoordSet> {
    let (f, s) = (kernel as i64, stride as i64);
    // Outputs covering input coordinate x: ceil((x - f + 1) / s) ..= floor(x / s), and >= 0.
    let range = move |x: i64| {
        let lo = (-(-(x - f + 1)).div_euclid(s)).max(0);
        lo..=x.div_euclid(s)
    };
    let keys = &input.index().keys;
    let mut out: Vec<u64> = keys
        .par_iter()
        .flat_map_iter(|&key| {
            let row = key_row(key);
            let b = (row >> 24) as i32;
            let (i, j) = (row_i(row), key_j(key));
            range(i).flat_map(move |oi| range(j).map(move |oj| pack(b, oi as i32, oj as i32)))
        })
        .collect();
    if !out.windows(2).all(|w| w[0] <= w[1]) {
        out.par_sort_unstable();
    }
    out.dedup();
    CoordSet::from_sorted_keys(out, input.batch_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(
        coords: &[[i32; 3]],
        out: &[[i32; 3]],
        kernel: i32,
        stride: i32,
        pad: i32,
    ) -> Vec<u32> {
        let k = (kernel * kernel) as usize;
        let mut idx = vec![NONE; out.len() * k];
        for (o, &[b, oi, oj]) in out.iter().enumerate() {
            for di in 0..kernel {
                for dj in 0..kernel {
                    let t = [b, oi * stride + di - pad, oj * stride + dj - pad];
                    if let Some(r) = coords.iter().position(|c| *c == t) {
                        idx[o * k + (di * kernel + dj) as usize] = r as u32;
                    }
                }
            }
        }
        idx
    }

    fn sample() -> Vec<[i32; 3]> {
        // Deterministic scatter with clusters, two batch entries, unsorted.
        let mut v = Vec::new();
        let mut x: u64 = 12345;
        while v.len() < 300 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let b = ((x >> 60) & 1) as i32;
            let i = ((x >> 33) % 20) as i32;
            let j = ((x >> 13) % 23) as i32;
            if !v.contains(&[b, i, j]) {
                v.push([b, i, j]);
            }
        }
        v
    }

    #[test]
    fn submanifold_matches_brute_force() {
        let coords = sample();
        let cs = CoordSet::new(coords.clone(), 2).unwrap();
        for kernel in [1, 3, 5] {
            let rb = cs.rulebook(RuleKey::submanifold(kernel)).unwrap();
            let want = brute(&coords, &coords, kernel as i32, 1, kernel as i32 / 2);
            assert_eq!(rb.forward_map().idx, want, "kernel {kernel}");
            assert_eq!(rb.backward_map().idx, transpose(rb.forward_map()).idx);
        }
        // Cached: the same Arc comes back.
        let a = cs.rulebook(RuleKey::submanifold(3)).unwrap();
        let b = cs.rulebook(RuleKey::submanifold(3)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn strided_matches_brute_force() {
        let coords = sample();
        let cs = CoordSet::new(coords.clone(), 2).unwrap();
        for (kernel, stride) in [(2, 2), (3, 2), (3, 3), (1, 2), (4, 2)] {
            let rb = cs.rulebook(RuleKey::strided(kernel, stride)).unwrap();
            let out = rb.out_coords().unwrap().coords().to_vec();
            // Expected output sites: every o >= 0 whose window holds an input.
            let mut want_out = Vec::new();
            for b in 0..2 {
                for oi in 0..30 {
                    for oj in 0..30 {
                        let hit = coords.iter().any(|&[cb, i, j]| {
                            cb == b
                                && (oi * stride as i32..oi * stride as i32 + kernel as i32)
                                    .contains(&i)
                                && (oj * stride as i32..oj * stride as i32 + kernel as i32)
                                    .contains(&j)
                        });
                        if hit {
                            want_out.push([b, oi, oj]);
                        }
                    }
                }
            }
            assert_eq!(out, want_out, "kernel {kernel} stride {stride}");
            let want = brute(&coords, &out, kernel as i32, stride as i32, 0);
            assert_eq!(rb.forward_map().idx, want);
            assert_eq!(rb.backward_map().idx, transpose(rb.forward_map()).idx);
        }
    }

    #[test]
    fn rejects_bad_geometry() {
        let cs = CoordSet::new(vec![[0, 0, 0]], 1).unwrap();
        assert!(cs.rulebook(RuleKey::submanifold(2)).is_err());
        assert!(cs.rulebook(RuleKey::strided(2, 0)).is_err());
        assert!(cs.rulebook(RuleKey::strided(0, 1)).is_err());
    }
}
