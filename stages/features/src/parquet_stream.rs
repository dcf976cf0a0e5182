//! Reading Parquet feature files at disk speed: every row group is decoded once, in file
//! order, and split among its slides; a slide is handed out as soon as its last row has been
//! read. Which slide has how many rows where is known beforehand from an index built from the
//! `slide_id` column alone (or the row groups' statistics, when a row group holds one slide),
//! which is cheap next to decoding the embeddings.
//!
//! The engine asks for slides in the dataset's order. When that is the files' order, only the
//! slides of the row groups in flight are held. Otherwise the slides read before they are asked
//! for wait in a buffer bounded by `buffer_bytes`; past it, the slides wanted last are dropped
//! from it and read again on their own when asked for (their row groups only, filtered).

use crate::error::FeaturesResult;
use crate::features::{convert_batch, features_err, open, read_slide_rows};
use arrow::array::{Array, RecordBatch, StringArray, UInt32Array};
use arrow::compute::{cast, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReader;
use parquet::arrow::ProjectionMask;
use parquet::file::statistics::Statistics;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use tessera_pipeline::schema::SLIDE_ID;

/// Rows decoded per batch when streaming.
const STREAM_BATCH_ROWS: usize = 16_384;

/// Where one slide's rows are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlideRows {
    /// `(file index, row group)` pairs holding rows of the slide, in file order.
    pub parts: Vec<(usize, usize)>,
    /// How many rows the slide has in all files.
    pub rows: usize,
}

/// Which row groups of which files hold each slide.
#[derive(Debug, Clone, Default)]
pub struct SlideIndex {
    pub files: Vec<PathBuf>,
    pub slides: HashMap<String, SlideRows>,
}

impl SlideIndex {
    /// Indexes `files`: a row group whose `slide_id` statistics say it holds one slide is
    /// indexed from them; the others' `slide_id` column is read (nothing else).
    pub fn build(files: &[PathBuf]) -> FeaturesResult<SlideIndex> {
        let mut index = SlideIndex {
            files: files.to_vec(),
            slides: HashMap::new(),
        };
        for (fi, path) in files.iter().enumerate() {
            let builder = open(path)?;
            let meta = builder.metadata().clone();
            let leaf = builder
                .parquet_schema()
                .columns()
                .iter()
                .position(|c| c.path().parts() == [SLIDE_ID])
                .ok_or_else(|| features_err(path, "missing column `slide_id`"))?;
            let mut to_read = Vec::new();
            for rg in 0..meta.num_row_groups() {
                let group = meta.row_group(rg);
                let rows = group.num_rows() as usize;
                if rows == 0 {
                    continue;
                }
                match single_slide(group.column(leaf).statistics()) {
                    Some(id) => index.add(&id, fi, rg, rows),
                    None => to_read.push(rg),
                }
            }
            if to_read.is_empty() {
                continue;
            }
            let bounds: Vec<usize> = to_read
                .iter()
                .map(|&rg| meta.row_group(rg).num_rows() as usize)
                .collect();
            let mask = ProjectionMask::leaves(builder.parquet_schema(), [leaf]);
            let reader = builder
                .with_projection(mask)
                .with_row_groups(to_read.clone())
                .with_batch_size(STREAM_BATCH_ROWS)
                .build()
                .map_err(|e| features_err(path, e.to_string()))?;
            // Rows left in the current row group, walking `to_read` in order.
            let (mut k, mut left) = (0usize, bounds[0]);
            for batch in reader {
                let batch = batch.map_err(|e| features_err(path, e.to_string()))?;
                let ids = slide_ids(path, batch.column(0))?;
                let mut start = 0;
                while start < ids.len() {
                    while left == 0 {
                        k += 1;
                        left = *bounds.get(k).ok_or_else(|| {
                            features_err(path, "more `slide_id` values than the row groups hold")
                        })?;
                    }
                    let end = run_end(&ids, start).min(start + left);
                    index.add(ids.value(start), fi, to_read[k], end - start);
                    left -= end - start;
                    start = end;
                }
            }
        }
        // Row groups indexed from statistics came before the others: back to file order.
        for rows in index.slides.values_mut() {
            rows.parts.sort_unstable();
            rows.parts.dedup();
        }
        Ok(index)
    }

    fn add(&mut self, id: &str, file: usize, rg: usize, rows: usize) {
        let entry = self.slides.entry(id.to_string()).or_default();
        if entry.parts.last() != Some(&(file, rg)) {
            entry.parts.push((file, rg));
        }
        entry.rows += rows;
    }
}

/// The slide id a row group holds, when its statistics prove it holds only one.
fn single_slide(stats: Option<&Statistics>) -> Option<String> {
    let stats = stats?;
    if stats.null_count_opt() != Some(0) || !stats.min_is_exact() || !stats.max_is_exact() {
        return None;
    }
    let (min, max) = (stats.min_bytes_opt()?, stats.max_bytes_opt()?);
    (min == max)
        .then(|| std::str::from_utf8(min).ok().map(str::to_string))
        .flatten()
}

/// The `slide_id` column as strings, refusing nulls.
fn slide_ids(path: &Path, col: &dyn Array) -> FeaturesResult<StringArray> {
    let cast = cast(col, &DataType::Utf8)
        .map_err(|e| features_err(path, format!("column `slide_id`: {e}")))?;
    let ids = cast
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| features_err(path, "column `slide_id` is not a string"))?
        .clone();
    if ids.null_count() > 0 {
        return Err(features_err(
            path,
            format!(
                "column `slide_id` has {} empty (null) values",
                ids.null_count()
            ),
        ));
    }
    Ok(ids)
}

/// The end of the run of equal ids starting at `start`.
fn run_end(ids: &StringArray, start: usize) -> usize {
    let first = ids.value(start);
    let mut end = start + 1;
    while end < ids.len() && ids.value(end) == first {
        end += 1;
    }
    end
}

/// A slide's rows read so far.
#[derive(Default)]
struct Gathered {
    batches: Vec<RecordBatch>,
    rows: usize,
    bytes: usize,
}

/// Counters of how a stream read its files, for run.json and tests.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StreamStats {
    /// Row groups decoded in file order.
    pub streamed_row_groups: usize,
    /// Slides read on their own (asked for after the stream had passed them without keeping
    /// them: out of order, and the buffer was full).
    pub reread_slides: usize,
    /// The most bytes of slides waiting in the buffer at once.
    pub peak_buffer_bytes: usize,
}

/// Hands out slides of an indexed set of files, decoding each row group once in file order.
pub struct SlideStream {
    schema: SchemaRef,
    index: SlideIndex,
    /// The next file to open, and the reader over the current one.
    next_file: usize,
    reader: Option<(usize, ParquetRecordBatchReader)>,
    /// Dataset rank of each slide that will be asked for; others' rows are skipped.
    wanted: HashMap<String, usize>,
    gathered: HashMap<String, Gathered>,
    buffered_bytes: usize,
    buffer_limit: usize,
    /// Wanted slides the stream passed without keeping all their rows.
    dropped: HashSet<String>,
    stats: StreamStats,
}

impl SlideStream {
    /// A stream over `index`'s files giving rows in `schema`. `wanted` ranks the slides that
    /// will be asked for (in the order they will be); rows of other slides are skipped.
    pub fn new(
        index: SlideIndex,
        schema: SchemaRef,
        wanted: HashMap<String, usize>,
        buffer_limit: usize,
    ) -> SlideStream {
        SlideStream {
            schema,
            index,
            next_file: 0,
            reader: None,
            wanted,
            gathered: HashMap::new(),
            buffered_bytes: 0,
            buffer_limit,
            dropped: HashSet::new(),
            stats: StreamStats::default(),
        }
    }

    /// How the stream has read so far.
    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// Every row of `slide_id`, as batches of the output schema (each owning its memory).
    pub fn take(&mut self, slide_id: &str) -> FeaturesResult<Vec<RecordBatch>> {
        let Some(expected) = self.index.slides.get(slide_id).map(|s| s.rows) else {
            let place = self.index.files.first().cloned().unwrap_or_default();
            let place = if self.index.files.len() > 1 {
                place.parent().map(Path::to_path_buf).unwrap_or(place)
            } else {
                place
            };
            return Err(features_err(
                &place,
                format!("no rows for slide `{slide_id}`"),
            ));
        };
        self.wanted.remove(slide_id);
        if self.dropped.remove(slide_id) {
            self.forget(slide_id);
            self.stats.reread_slides += 1;
            return self.read_alone(slide_id);
        }
        while self.gathered.get(slide_id).map_or(0, |g| g.rows) < expected {
            if !self.advance(slide_id)? {
                let place = self.index.files.last().cloned().unwrap_or_default();
                return Err(features_err(
                    &place,
                    format!("the files changed while reading: slide `{slide_id}` has fewer rows than indexed"),
                ));
            }
        }
        Ok(self.forget(slide_id).map(|g| g.batches).unwrap_or_default())
    }

    fn forget(&mut self, slide_id: &str) -> Option<Gathered> {
        let g = self.gathered.remove(slide_id)?;
        self.buffered_bytes -= g.bytes;
        Some(g)
    }

    /// Reads a slide's row groups on their own, keeping its rows.
    fn read_alone(&self, slide_id: &str) -> FeaturesResult<Vec<RecordBatch>> {
        let Some(rows) = self.index.slides.get(slide_id) else {
            return Ok(Vec::new());
        };
        let mut by_file: Vec<(usize, Vec<usize>)> = Vec::new();
        for &(f, rg) in &rows.parts {
            match by_file.last_mut() {
                Some((last, rgs)) if *last == f => rgs.push(rg),
                _ => by_file.push((f, vec![rg])),
            }
        }
        let mut out = Vec::new();
        for (f, rgs) in by_file {
            out.extend(read_slide_rows(
                &self.index.files[f],
                Some(rgs),
                slide_id,
                &self.schema,
            )?);
        }
        Ok(out)
    }

    /// Decodes the next batch of the stream and shares it out; false at the end of the files.
    fn advance(&mut self, asked: &str) -> FeaturesResult<bool> {
        let (fi, batch) = loop {
            if self.reader.is_none() {
                if self.next_file >= self.index.files.len() {
                    return Ok(false);
                }
                let fi = self.next_file;
                self.next_file += 1;
                self.reader = Some((fi, self.open_stream(fi)?));
            }
            let Some((fi, reader)) = self.reader.as_mut() else {
                continue;
            };
            match reader.next() {
                Some(batch) => {
                    let path = &self.index.files[*fi];
                    break (*fi, batch.map_err(|e| features_err(path, e.to_string()))?);
                }
                None => self.reader = None,
            }
        };
        let path = self.index.files[fi].clone();
        let batch = convert_batch(&path, &batch, &self.schema)?;
        let ids = slide_ids(&path, batch.column(0))?;
        let mut start = 0;
        while start < ids.len() {
            let end = run_end(&ids, start);
            let id = ids.value(start);
            if (self.wanted.contains_key(id) || id == asked) && !self.dropped.contains(id) {
                // A copy (`take`; a slice, or concatenating one slice, would share the whole
                // decoded batch), so that the slide owns only its own rows.
                let rows = UInt32Array::from_iter_values(start as u32..end as u32);
                let part = take_record_batch(&batch, &rows)?;
                let bytes = part.get_array_memory_size();
                let g = self.gathered.entry(id.to_string()).or_default();
                g.rows += part.num_rows();
                g.bytes += bytes;
                g.batches.push(part);
                self.buffered_bytes += bytes;
            }
            start = end;
        }
        self.stats.peak_buffer_bytes = self.stats.peak_buffer_bytes.max(self.buffered_bytes);
        self.evict(asked);
        Ok(true)
    }

    /// Opens file `fi` for streaming every row group in order, projected to the output columns.
    fn open_stream(&mut self, fi: usize) -> FeaturesResult<ParquetRecordBatchReader> {
        let path = &self.index.files[fi];
        let builder = open(path)?;
        self.stats.streamed_row_groups += builder.metadata().num_row_groups();
        let names: Vec<&str> = self
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        for name in &names {
            if builder.schema().field_with_name(name).is_err() {
                return Err(features_err(path, format!("missing column `{name}`")));
            }
        }
        let mask = ProjectionMask::columns(builder.parquet_schema(), names.iter().copied());
        builder
            .with_projection(mask)
            .with_batch_size(STREAM_BATCH_ROWS)
            .build()
            .map_err(|e| features_err(path, e.to_string()))
    }

    /// Drops the waiting slides wanted last until the buffer fits its limit (never `asked`).
    fn evict(&mut self, asked: &str) {
        if self.buffered_bytes <= self.buffer_limit {
            return;
        }
        let mut waiting: Vec<(usize, String)> = self
            .gathered
            .keys()
            .filter(|id| id.as_str() != asked)
            .map(|id| {
                (
                    self.wanted.get(id).copied().unwrap_or(usize::MAX),
                    id.clone(),
                )
            })
            .collect();
        waiting.sort_unstable_by(|a, b| b.cmp(a));
        for (_, id) in waiting {
            if self.buffered_bytes <= self.buffer_limit {
                break;
            }
            self.forget(&id);
            self.dropped.insert(id);
        }
    }
}
