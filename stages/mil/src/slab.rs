//! Packs many small Arrow arrays into a few large allocations, for `sample`'s in-memory tables.
//!
//! `sample` holds every slide's embeddings for the whole training: at 200 tiles x 128 floats
//! that is one 100 KiB buffer per slide, plus a few small ones (coordinates). A general-purpose
//! allocator serves such sizes from size classes (mimalloc rounds 100 KiB up to 112 KiB), and
//! with transparent huge pages the rounding is resident too: the cohort cost 14% more than its
//! bytes. Here the slides' buffers are copied back to back (64-byte aligned) into chunks of
//! [`CHUNK_BYTES`], each one allocation that the arrays share, so the tables cost their bytes.
//!
//! A chunk is freed when the last array in it is dropped: a slide dropped early (a failed
//! slide) keeps its bytes until then.

use arrow::array::{ArrayData, ArrayRef, RecordBatch};
use arrow::buffer::{BooleanBuffer, Buffer, NullBuffer};
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;

/// Bytes of one chunk. Untouched pages of the last chunk are not resident.
pub const CHUNK_BYTES: usize = 64 << 20;

/// Alignment of every copied buffer (Arrow's own on most targets; enough for any value type).
const ALIGN: usize = 64;

/// One allocation shared by the buffers copied into it.
struct Chunk {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the chunk is plain bytes; it is written only through `Slab::copy`, into a region no
// buffer refers to yet, and only read through the immutable buffers made from it.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

impl Chunk {
    fn new(bytes: usize) -> Chunk {
        let layout = Layout::from_size_align(bytes.max(ALIGN), ALIGN)
            .expect("a chunk size below isize::MAX");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        Chunk { ptr, layout }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: allocated in `Chunk::new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Copies arrays into shared chunks (see the module docs).
pub struct Slab {
    chunk_bytes: usize,
    /// The chunk being filled, and how many of its bytes are taken.
    current: Option<(Arc<Chunk>, usize)>,
}

impl Default for Slab {
    fn default() -> Self {
        Slab::new(CHUNK_BYTES)
    }
}

impl Slab {
    /// A slab filling chunks of `chunk_bytes`.
    pub fn new(chunk_bytes: usize) -> Slab {
        Slab {
            chunk_bytes: chunk_bytes.max(ALIGN),
            current: None,
        }
    }

    /// A copy of `batch` whose buffers live in the slab.
    pub fn pack_batch(
        &mut self,
        batch: &RecordBatch,
    ) -> Result<RecordBatch, arrow::error::ArrowError> {
        let columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .map(|c| arrow::array::make_array(self.pack(&c.to_data())))
            .collect();
        RecordBatch::try_new_with_options(
            batch.schema(),
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )
    }

    /// A copy of `data` (its buffers, null bitmap and children, offsets kept) in the slab.
    pub fn pack(&mut self, data: &ArrayData) -> ArrayData {
        let buffers = data.buffers().iter().map(|b| self.copy(b)).collect();
        let children = data.child_data().iter().map(|c| self.pack(c)).collect();
        let nulls = data.nulls().map(|n| {
            let bits = BooleanBuffer::new(self.copy(n.buffer()), n.offset(), n.len());
            // SAFETY: the same bits as `n`, so the same null count.
            unsafe { NullBuffer::new_unchecked(bits, n.null_count()) }
        });
        let builder = ArrayData::builder(data.data_type().clone())
            .len(data.len())
            .offset(data.offset())
            .buffers(buffers)
            .child_data(children)
            .nulls(nulls);
        // SAFETY: a byte-for-byte copy of valid array data.
        unsafe { builder.build_unchecked() }
    }

    /// `bytes` copied into the slab: the current chunk, a new one when it is full, or a chunk
    /// of its own when it is large next to a chunk (so as not to waste the current one).
    fn copy(&mut self, bytes: &[u8]) -> Buffer {
        let len = bytes.len();
        if len > self.chunk_bytes / 4 {
            let chunk = Arc::new(Chunk::new(len));
            return Self::write(chunk, 0, bytes);
        }
        let fits = self.current.as_ref().and_then(|(chunk, used)| {
            let start = used.next_multiple_of(ALIGN);
            (start + len <= chunk.layout.size()).then(|| (chunk.clone(), start))
        });
        let (chunk, start) = fits.unwrap_or_else(|| (Arc::new(Chunk::new(self.chunk_bytes)), 0));
        self.current = Some((chunk.clone(), start + len));
        Self::write(chunk, start, bytes)
    }

    /// Writes `bytes` at `start` of `chunk`, a region no buffer refers to yet, and returns the
    /// buffer over it.
    fn write(chunk: Arc<Chunk>, start: usize, bytes: &[u8]) -> Buffer {
        debug_assert!(start + bytes.len() <= chunk.layout.size());
        // SAFETY: `start..start + len` is inside the chunk, and no buffer covers it yet (every
        // copy starts past the previous one's end), so nothing reads it while it is written.
        let ptr = unsafe {
            let dst = chunk.ptr.as_ptr().add(start);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len());
            NonNull::new_unchecked(dst)
        };
        // SAFETY: the region stays allocated while the buffer (which owns an `Arc` of the
        // chunk) lives, and is never written again.
        unsafe { Buffer::from_custom_allocation(ptr, bytes.len(), chunk) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Array, FixedSizeListArray, Float32Array, Int64Array, StringArray, UInt32Array,
    };
    use arrow::compute::take;
    use arrow::datatypes::{DataType, Field};

    fn embeddings(rows: usize, d: i32) -> ArrayRef {
        let values = Float32Array::from_iter_values((0..rows * d as usize).map(|v| v as f32 * 0.5));
        Arc::new(FixedSizeListArray::new(
            Arc::new(Field::new("item", DataType::Float32, false)),
            d,
            Arc::new(values),
            None,
        ))
    }

    fn same(a: &ArrayRef, b: &ArrayRef) {
        assert_eq!(a.to_data(), b.to_data());
        assert_eq!(a.as_ref(), b.as_ref());
    }

    #[test]
    fn packed_arrays_equal_their_originals() {
        let mut slab = Slab::new(4096);
        let arrays: Vec<ArrayRef> = vec![
            embeddings(10, 8),
            Arc::new(StringArray::from(vec!["a", "bb", "", "dddd"])),
            Arc::new(Int64Array::from(vec![Some(1), None, Some(3)])),
            // A slice: offsets into its buffers are kept.
            Arc::new(Int64Array::from_iter_values(0..100).slice(7, 20)),
            Arc::new(StringArray::from(vec![Some("x"), None, Some("zz")]).slice(1, 2)),
            embeddings(0, 4),
        ];
        for a in &arrays {
            let packed = arrow::array::make_array(slab.pack(&a.to_data()));
            packed.to_data().validate_full().unwrap();
            same(a, &packed);
        }
    }

    #[test]
    fn buffers_share_chunks_and_large_ones_get_their_own() {
        let mut slab = Slab::new(1 << 16);
        let a = slab.copy(&[1u8; 100]);
        let b = slab.copy(&[2u8; 100]);
        assert_eq!(
            b.as_ptr() as usize - a.as_ptr() as usize,
            128,
            "64-byte aligned, back to back"
        );
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        let big = slab.copy(&[3u8; 1 << 15]);
        let c = slab.copy(&[4u8; 10]);
        assert_eq!(
            c.as_ptr() as usize - a.as_ptr() as usize,
            256,
            "the big one did not take the chunk"
        );
        assert!(big.iter().all(|&v| v == 3));
        // Fill the chunk: the next copy starts a new one, the old one lives on in its buffers.
        let fill = slab.copy(&vec![5u8; (1 << 14) - 10]);
        let d = slab.copy(&vec![6u8; 1 << 14]);
        let e = slab.copy(&vec![7u8; 1 << 14]);
        let f = slab.copy(&vec![8u8; 1 << 14]);
        drop(slab);
        for (buf, v) in [
            (&a, 1u8),
            (&b, 2),
            (&c, 4),
            (&fill, 5),
            (&d, 6),
            (&e, 7),
            (&f, 8),
        ] {
            assert!(buf.iter().all(|&x| x == v));
        }
    }

    #[test]
    fn a_packed_batch_draws_like_the_original() {
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            Field::new("x", DataType::Int64, false),
            Field::new("embedding", embeddings(1, 8).data_type().clone(), false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..50)),
                embeddings(50, 8),
            ],
        )
        .unwrap();
        let mut slab = Slab::new(1 << 12);
        let packed = slab.pack_batch(&batch).unwrap();
        assert_eq!(packed, batch);
        let rows = UInt32Array::from(vec![3, 9, 49]);
        for (a, b) in batch.columns().iter().zip(packed.columns()) {
            same(
                &take(a, &rows, None).unwrap(),
                &take(b, &rows, None).unwrap(),
            );
        }
    }
}
