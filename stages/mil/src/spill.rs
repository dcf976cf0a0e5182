//! Keeps a record batch in a memory-mapped Arrow IPC file instead of RAM, for `sample` over
//! cohorts whose embeddings exceed memory (10,000 slides x thousands of tiles x 512-1536 floats).
//! The file is written, mapped, and unlinked at once: the mapping keeps it readable, the kernel
//! pages it in and out as the bags touch it, and nothing is left behind, even after a kill.

use arrow::array::RecordBatch;
use arrow::buffer::Buffer;
use arrow::ipc::convert::try_fb_to_schema;
use arrow::ipc::reader::{read_footer_length, FileDecoder};
use arrow::ipc::root_as_footer;
use arrow::ipc::writer::FileWriter;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

/// Why a batch could not be spilled or mapped back.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("spill file {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("spill file {path}: {source}")]
    Arrow {
        path: std::path::PathBuf,
        source: arrow::error::ArrowError,
    },
    #[error("spill file {path}: {message}")]
    Format {
        path: std::path::PathBuf,
        message: String,
    },
}

/// A spilled batch and the mapping it reads from.
pub struct Spilled {
    pub batch: RecordBatch,
    map: Arc<memmap2::Mmap>,
}

impl Spilled {
    /// Drops the pages the process has touched from its resident set (they stay in the page
    /// cache, and are read back on the next access): called after each draw, so that resident
    /// memory does not grow with the cohort as training visits every slide.
    pub fn release_pages(&self) {
        // SAFETY: a read-only shared mapping of an unlinked file nobody writes: after
        // MADV_DONTNEED the next access reads the same bytes back from the file.
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }
}

/// Where a stage's spill files go: the folder its `spill_dir` parameter names (relative to the
/// experiment), or `OUT/.spill`. One rule for `sample` and `train`, so both spill side by side.
pub fn spill_folder(
    ctx: &tessera_pipeline::BuildContext,
    configured: Option<&Path>,
) -> std::path::PathBuf {
    match configured {
        Some(dir) => ctx.resolve(dir),
        None => ctx.out_dir.join(".spill"),
    }
}

/// Writes `batch` to `path`, maps it, removes the file and returns the batch read zero-copy
/// from the mapping.
pub fn spill(batch: &RecordBatch, path: &Path) -> Result<RecordBatch, SpillError> {
    spill_mapped(batch, path).map(|s| s.batch)
}

/// [`spill`], keeping a handle on the mapping (see [`Spilled::release_pages`]).
pub fn spill_mapped(batch: &RecordBatch, path: &Path) -> Result<Spilled, SpillError> {
    let io = |source| SpillError::Io {
        path: path.to_path_buf(),
        source,
    };
    let arrow = |source| SpillError::Arrow {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    {
        let file = std::fs::File::create(path).map_err(io)?;
        let mut writer =
            FileWriter::try_new(std::io::BufWriter::new(file), &batch.schema()).map_err(arrow)?;
        writer.write(batch).map_err(arrow)?;
        writer.finish().map_err(arrow)?;
    }
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the file is ours, just written, and unlinked below: nobody can change it.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?);
    std::fs::remove_file(path).map_err(io)?;
    let mut batches = decode(map.clone(), path)?;
    match batches.len() {
        1 => Ok(Spilled {
            batch: batches.remove(0),
            map,
        }),
        n => Err(SpillError::Format {
            path: path.to_path_buf(),
            message: format!("expected one record batch, found {n}"),
        }),
    }
}

/// The record batches of an IPC file held in `map`, referencing the mapping (no copy).
fn decode(map: Arc<memmap2::Mmap>, path: &Path) -> Result<Vec<RecordBatch>, SpillError> {
    let format = |message: String| SpillError::Format {
        path: path.to_path_buf(),
        message,
    };
    let arrow = |source| SpillError::Arrow {
        path: path.to_path_buf(),
        source,
    };
    let len = map.len();
    let ptr = NonNull::new(map.as_ptr() as *mut u8).ok_or_else(|| format("empty map".into()))?;
    // SAFETY: `ptr..ptr+len` is the mapping, kept alive by the Arc owner for as long as any
    // buffer slices it.
    let buffer = unsafe { Buffer::from_custom_allocation(ptr, len, map) };
    if len < 10 {
        return Err(format(format!(
            "{len} bytes is too short for an Arrow IPC file"
        )));
    }
    let trailer = len - 10;
    let footer_len = read_footer_length(
        buffer[trailer..]
            .try_into()
            .map_err(|_| format("bad trailer".into()))?,
    )
    .map_err(arrow)?;
    let footer = root_as_footer(&buffer[trailer - footer_len..trailer])
        .map_err(|e| format(format!("bad footer: {e}")))?;
    let schema = try_fb_to_schema(
        footer
            .schema()
            .ok_or_else(|| format("footer without a schema".into()))?,
    )
    .map_err(arrow)?;
    let mut decoder = FileDecoder::new(Arc::new(schema), footer.version());
    for block in footer.dictionaries().iter().flatten() {
        let block_len = block.bodyLength() as usize + block.metaDataLength() as usize;
        let data = buffer.slice_with_length(block.offset() as usize, block_len);
        decoder.read_dictionary(block, &data).map_err(arrow)?;
    }
    let mut batches = Vec::new();
    for block in footer.recordBatches().iter().flatten() {
        let block_len = block.bodyLength() as usize + block.metaDataLength() as usize;
        let data = buffer.slice_with_length(block.offset() as usize, block_len);
        if let Some(batch) = decoder.read_record_batch(block, &data).map_err(arrow)? {
            batches.push(batch);
        }
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};

    #[test]
    fn a_spilled_batch_equals_the_original_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let values = Float32Array::from((0..30).map(|v| v as f32 * 0.5).collect::<Vec<_>>());
        let emb = FixedSizeListArray::new(
            Arc::new(Field::new("item", DataType::Float32, true)),
            3,
            Arc::new(values),
            None,
        );
        let batch = RecordBatch::try_from_iter([
            (
                "slide_id",
                Arc::new(StringArray::from(vec!["s"; 10])) as ArrayRef,
            ),
            (
                "x",
                Arc::new(Int64Array::from_iter_values(0..10)) as ArrayRef,
            ),
            ("embedding", Arc::new(emb) as ArrayRef),
        ])
        .unwrap();
        let path = dir.path().join("spill/s.arrow");
        let back = spill(&batch, &path).unwrap();
        assert_eq!(back, batch);
        assert!(!path.exists(), "the spill file is unlinked once mapped");
        // Taking rows from the mapped batch works like from an in-memory one.
        let taken =
            arrow::compute::take_record_batch(&back, &arrow::array::UInt32Array::from(vec![1, 7]))
                .unwrap();
        assert_eq!(taken.num_rows(), 2);
    }
}
