//! The coordinate set of a sparse tensor: active sites, a sorted index over them, and the
//! cache of rulebooks built from them.
//!
//! Sites are packed into one `u64` key, `batch << 48 | i << 24 | j`, and sorted once (O(N log
//! N) with a parallel sort, skipped when the sites already come sorted). Every neighbourhood
//! query afterwards is a linear merge of sorted rows, so no dense grid of the slide's size and
//! no O(N^2) search is ever made.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::error::{Result, SparseError};
use crate::rulebook::{RuleKey, Rulebook};

/// Exclusive upper bound of `i` and `j` (24-bit key fields).
pub const MAX_SPATIAL: i32 = 1 << 24;
/// Largest batch size (16-bit key field).
pub const MAX_BATCH: usize = 1 << 16;

const SPATIAL_BITS: u32 = 24;
const SPATIAL_MASK: u64 = (1 << SPATIAL_BITS) - 1;

/// Packs a validated site into its sort key.
#[inline]
pub(crate) fn pack(b: i32, i: i32, j: i32) -> u64 {
    ((b as u64) << (2 * SPATIAL_BITS)) | ((i as u64) << SPATIAL_BITS) | (j as u64)
}

/// `j` of a packed key.
#[inline]
pub(crate) fn key_j(key: u64) -> i64 {
    (key & SPATIAL_MASK) as i64
}

/// `(batch, i)` of a packed key, itself a sortable "row key".
#[inline]
pub(crate) fn key_row(key: u64) -> u64 {
    key >> SPATIAL_BITS
}

/// `i` of a row key.
#[inline]
pub(crate) fn row_i(row: u64) -> i64 {
    (row & SPATIAL_MASK) as i64
}

/// A row key moved by `di` rows, or `None` if it leaves `[0, MAX_SPATIAL)`.
#[inline]
pub(crate) fn row_shift(row: u64, di: i64) -> Option<u64> {
    let i = row_i(row) + di;
    if (0..MAX_SPATIAL as i64).contains(&i) {
        Some((row & !SPATIAL_MASK) | i as u64)
    } else {
        None
    }
}

/// Sorted view of the sites: the keys in increasing order, which row of the feature matrix
/// each sorted key is, and where each image row `(batch, i)` starts.
#[derive(Debug)]
pub(crate) struct SortedIndex {
    /// Packed keys, increasing.
    pub keys: Vec<u64>,
    /// `perm[s]`: the feature row of the `s`-th smallest key; `None` when the identity.
    pub perm: Option<Vec<u32>>,
    /// Distinct row keys `(batch, i)`, increasing.
    pub rows: Vec<u64>,
    /// `row_start[r]..row_start[r + 1]`: sorted positions of row `rows[r]`.
    pub row_start: Vec<u32>,
}

impl SortedIndex {
    /// Feature row of sorted position `s`.
    #[inline]
    pub fn feature_row(&self, s: usize) -> u32 {
        match &self.perm {
            Some(p) => p[s],
            None => s as u32,
        }
    }

    /// Sorted positions of the image row `row`, if it has any site.
    #[inline]
    pub fn row_range(&self, row: u64) -> Option<Range<usize>> {
        let r = self.rows.binary_search(&row).ok()?;
        Some(self.row_start[r] as usize..self.row_start[r + 1] as usize)
    }

    /// Index into `rows` of the row holding sorted position `s`.
    #[inline]
    pub fn row_of(&self, s: usize) -> usize {
        self.row_start.partition_point(|&st| st as usize <= s) - 1
    }

    fn from_sorted_keys(keys: Vec<u64>, perm: Option<Vec<u32>>) -> Self {
        let mut rows = Vec::new();
        let mut row_start = Vec::new();
        for (s, &k) in keys.iter().enumerate() {
            let r = key_row(k);
            if rows.last() != Some(&r) {
                rows.push(r);
                row_start.push(s as u32);
            }
        }
        row_start.push(keys.len() as u32);
        SortedIndex {
            keys,
            perm,
            rows,
            row_start,
        }
    }
}

/// The active sites shared by every tensor at one resolution, with its rulebook cache.
///
/// Built once per coordinate set (`O(N log N)`), immutable afterwards, shared through an
/// `Arc`: a layer's output at the same resolution (submanifold conv, activation, batch-norm)
/// keeps the very same `Arc<CoordSet>`, so its rulebooks are built once and reused by every
/// layer at that resolution.
pub struct CoordSet {
    coords: Vec<[i32; 3]>,
    batch_size: usize,
    index: SortedIndex,
    rulebooks: Mutex<HashMap<RuleKey, Arc<Rulebook>>>,
}

impl std::fmt::Debug for CoordSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordSet")
            .field("sites", &self.coords.len())
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl CoordSet {
    /// Validates and indexes `(batch, i, j)` sites.
    ///
    /// Errors on a batch index outside `[0, batch_size)`, on `i` or `j` outside
    /// `[0, 2^24)` (negative coordinates must be shifted by the caller: strided layers
    /// downsample with `floor(i / stride)`), and on duplicate sites.
    pub fn new(coords: Vec<[i32; 3]>, batch_size: usize) -> Result<Arc<Self>> {
        if batch_size > MAX_BATCH {
            return Err(SparseError::BatchTooLarge(batch_size));
        }
        if coords.len() >= u32::MAX as usize {
            return Err(SparseError::ShapeMismatch(format!(
                "{} sites exceed the u32 row index",
                coords.len()
            )));
        }
        for &[b, i, j] in &coords {
            if b < 0 || b as usize >= batch_size {
                return Err(SparseError::BatchOutOfRange(b, batch_size));
            }
            if !(0..MAX_SPATIAL).contains(&i) || !(0..MAX_SPATIAL).contains(&j) {
                return Err(SparseError::CoordinateOutOfRange(b, i, j));
            }
        }
        let keys: Vec<u64> = coords.par_iter().map(|&[b, i, j]| pack(b, i, j)).collect();
        let sorted = keys.windows(2).all(|w| w[0] < w[1]);
        let index = if sorted {
            SortedIndex::from_sorted_keys(keys, None)
        } else {
            let mut pairs: Vec<(u64, u32)> = keys
                .into_iter()
                .enumerate()
                .map(|(r, k)| (k, r as u32))
                .collect();
            pairs.par_sort_unstable();
            if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
                let [b, i, j] = coords[w[0].1 as usize];
                let (r0, r1) = (w[0].1 as usize, w[1].1 as usize);
                return Err(SparseError::DuplicateCoordinate(b, i, j, r0, r1));
            }
            let (keys, perm): (Vec<u64>, Vec<u32>) = pairs.into_iter().unzip();
            SortedIndex::from_sorted_keys(keys, Some(perm))
        };
        Ok(Arc::new(CoordSet {
            coords,
            batch_size,
            index,
            rulebooks: Mutex::new(HashMap::new()),
        }))
    }

    /// Builds a set from keys already sorted and distinct (outputs of strided layers).
    pub(crate) fn from_sorted_keys(keys: Vec<u64>, batch_size: usize) -> Arc<Self> {
        let mask = SPATIAL_MASK;
        let coords = keys
            .par_iter()
            .map(|&k| {
                [
                    (k >> (2 * SPATIAL_BITS)) as i32,
                    ((k >> SPATIAL_BITS) & mask) as i32,
                    (k & mask) as i32,
                ]
            })
            .collect();
        Arc::new(CoordSet {
            coords,
            batch_size,
            index: SortedIndex::from_sorted_keys(keys, None),
            rulebooks: Mutex::new(HashMap::new()),
        })
    }

    /// The sites, one `[batch, i, j]` per feature row.
    pub fn coords(&self) -> &[[i32; 3]] {
        &self.coords
    }

    /// Number of active sites (rows of the feature matrix).
    pub fn len(&self) -> usize {
        self.coords.len()
    }

    /// True when no site is active.
    pub fn is_empty(&self) -> bool {
        self.coords.is_empty()
    }

    /// Number of batch entries (slides) the sites belong to.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Number of active sites of each batch entry.
    pub fn sites_per_batch(&self) -> Vec<usize> {
        let mut n = vec![0; self.batch_size];
        for c in &self.coords {
            n[c[0] as usize] += 1;
        }
        n
    }

    pub(crate) fn index(&self) -> &SortedIndex {
        &self.index
    }

    /// The rulebook for `key`, built on first use and cached for every later layer (and every
    /// tensor sharing this coordinate set).
    pub fn rulebook(&self, key: RuleKey) -> Result<Arc<Rulebook>> {
        if let Some(rb) = self.lock_cache().get(&key) {
            return Ok(rb.clone());
        }
        // Built outside the lock: two threads racing build identical rulebooks, one is kept.
        let rb = Arc::new(Rulebook::build(self, key)?);
        Ok(self.lock_cache().entry(key).or_insert(rb).clone())
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<RuleKey, Arc<Rulebook>>> {
        // A poisoned cache only means another thread panicked while inserting; the map is
        // still a valid cache.
        self.rulebooks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_duplicates_and_bad_ranges() {
        assert!(matches!(
            CoordSet::new(vec![[0, 1, 2], [0, 3, 3], [0, 1, 2]], 1),
            Err(SparseError::DuplicateCoordinate(0, 1, 2, _, _))
        ));
        assert!(matches!(
            CoordSet::new(vec![[1, 1, 2]], 1),
            Err(SparseError::BatchOutOfRange(1, 1))
        ));
        assert!(matches!(
            CoordSet::new(vec![[0, -1, 2]], 1),
            Err(SparseError::CoordinateOutOfRange(0, -1, 2))
        ));
        assert!(matches!(
            CoordSet::new(vec![[0, 1, MAX_SPATIAL]], 1),
            Err(SparseError::CoordinateOutOfRange(..))
        ));
    }

    #[test]
    fn index_is_sorted_and_maps_back() {
        let coords = vec![[1, 0, 5], [0, 2, 1], [0, 0, 3], [0, 2, 0], [1, 0, 1]];
        let cs = CoordSet::new(coords.clone(), 2).unwrap();
        let ix = cs.index();
        assert!(ix.keys.windows(2).all(|w| w[0] < w[1]));
        for s in 0..coords.len() {
            let [b, i, j] = coords[ix.feature_row(s) as usize];
            assert_eq!(ix.keys[s], pack(b, i, j));
        }
        assert_eq!(ix.rows.len(), 3);
        assert_eq!(ix.row_range(key_row(pack(0, 2, 0))), Some(1..3));
        assert_eq!(ix.row_of(4), 2);
        assert_eq!(cs.sites_per_batch(), vec![3, 2]);
    }
}
