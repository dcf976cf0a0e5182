//! A bag's embedding rows: owned, or read from a memory-mapped spill file that `train` writes
//! when an epoch's bags outgrow its memory budget. Both read as `&[f32]`, so models never know
//! where a bag lives; a mapped bag gives its pages back to the kernel after each use, so the
//! resident set stays bounded however many bags an epoch holds.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// Row-major `[len, dim]` embeddings of one bag.
#[derive(Clone, Default)]
pub struct EmbeddingRows(Storage);

#[derive(Clone)]
enum Storage {
    Owned(Vec<f32>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        /// Byte offset of the first value in `map` (a multiple of 4).
        offset: usize,
        /// Number of f32 values.
        len: usize,
    },
}

impl Default for Storage {
    fn default() -> Self {
        Storage::Owned(Vec::new())
    }
}

/// Why rows could not be viewed in a mapping.
#[derive(Debug, thiserror::Error)]
#[error("spilled bag rows at byte {offset} (+{len} values) do not fit a {map_len}-byte mapping aligned for f32")]
pub struct MappedRowsError {
    offset: usize,
    len: usize,
    map_len: usize,
}

impl EmbeddingRows {
    /// The `len` f32 values at byte `offset` of `map` (native endianness, as written by
    /// [`EmbeddingRows::as_bytes`]).
    pub fn mapped(
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    ) -> Result<Self, MappedRowsError> {
        let fits = len
            .checked_mul(4)
            .and_then(|bytes| offset.checked_add(bytes))
            .is_some_and(|end| end <= map.len());
        let aligned = (map.as_ptr() as usize)
            .wrapping_add(offset)
            .is_multiple_of(std::mem::align_of::<f32>());
        if !fits || !aligned {
            return Err(MappedRowsError {
                offset,
                len,
                map_len: map.len(),
            });
        }
        Ok(EmbeddingRows(Storage::Mapped { map, offset, len }))
    }

    /// Whether the rows live in a spill file rather than in memory.
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Storage::Mapped { .. })
    }

    /// The values' bytes, for writing them to a spill file.
    pub fn as_bytes(&self) -> &[u8] {
        let values: &[f32] = self;
        // SAFETY: any initialised f32 slice is a valid byte slice of 4x its length.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), values.len() * 4) }
    }

    /// Drops the pages of the spill file mapped so far from the process's resident set (they
    /// stay in the page cache and are read back on the next access); nothing for owned rows.
    /// Called once a batch has copied the rows, so an epoch of spilled bags never becomes
    /// resident all at once.
    pub fn release_pages(&self) {
        let Storage::Mapped { map, .. } = &self.0 else {
            return;
        };
        // The whole mapping, not just these rows' pages: on a fault Linux also maps cached
        // pages around it ("fault-around"), i.e. pages of other bags, which would otherwise
        // pile up until the whole epoch's file is resident. Unmapped stretches cost next to
        // nothing to release, and a dropped page is read back from the page cache.
        // SAFETY: a read-only shared mapping of an unlinked file nobody writes: after
        // MADV_DONTNEED the next access reads the same bytes back from the file.
        let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }
}

impl Deref for EmbeddingRows {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match &self.0 {
            Storage::Owned(values) => values,
            Storage::Mapped { map, offset, len } => {
                // SAFETY: `mapped` checked that `offset..offset + 4 * len` lies inside the
                // mapping and is aligned for f32; the Arc keeps the mapping alive, and the
                // unlinked file behind it is never written again.
                unsafe { std::slice::from_raw_parts(map.as_ptr().add(*offset).cast(), *len) }
            }
        }
    }
}

impl DerefMut for EmbeddingRows {
    /// Mapped rows are read-only: writing copies them into memory first.
    fn deref_mut(&mut self) -> &mut [f32] {
        if self.is_mapped() {
            self.0 = Storage::Owned(self.to_vec());
        }
        match &mut self.0 {
            Storage::Owned(values) => values,
            Storage::Mapped { .. } => unreachable!("mapped rows were just copied into memory"),
        }
    }
}

impl From<Vec<f32>> for EmbeddingRows {
    fn from(values: Vec<f32>) -> Self {
        EmbeddingRows(Storage::Owned(values))
    }
}

impl FromIterator<f32> for EmbeddingRows {
    fn from_iter<I: IntoIterator<Item = f32>>(iter: I) -> Self {
        EmbeddingRows(Storage::Owned(iter.into_iter().collect()))
    }
}

impl PartialEq for EmbeddingRows {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for EmbeddingRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "EmbeddingRows({} values, {place})", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mapping(values: &[f32]) -> Arc<memmap2::Mmap> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(EmbeddingRows::from(values.to_vec()).as_bytes())
            .unwrap();
        Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap())
    }

    #[test]
    fn mapped_rows_read_what_was_written() {
        let values: Vec<f32> = (0..5000).map(|v| (v as f32 * 0.3).sin()).collect();
        let map = mapping(&values);
        let rows = EmbeddingRows::mapped(map.clone(), 4 * 1000, 3000).unwrap();
        assert!(rows.is_mapped());
        assert_eq!(&rows[..], &values[1000..4000]);
        rows.release_pages();
        // Released pages read back the same bytes.
        assert_eq!(&rows[..], &values[1000..4000]);
        assert_eq!(rows, EmbeddingRows::from(values[1000..4000].to_vec()));
    }

    #[test]
    fn out_of_range_or_misaligned_rows_are_refused() {
        let map = mapping(&[1.0, 2.0, 3.0]);
        assert!(EmbeddingRows::mapped(map.clone(), 4, 3).is_err());
        assert!(EmbeddingRows::mapped(map.clone(), 2, 1).is_err());
        assert!(EmbeddingRows::mapped(map.clone(), usize::MAX - 2, 1).is_err());
        assert!(EmbeddingRows::mapped(map, 4, 2).is_ok());
    }

    #[test]
    fn writing_mapped_rows_copies_them() {
        let map = mapping(&[1.0, 2.0]);
        let mut rows = EmbeddingRows::mapped(map, 0, 2).unwrap();
        rows[0] = 7.0;
        assert!(!rows.is_mapped());
        assert_eq!(&rows[..], &[7.0, 2.0]);
    }
}
