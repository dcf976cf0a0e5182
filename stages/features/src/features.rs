//! `kind: features`: embeddings computed elsewhere (another tool, an earlier project), read
//! from Parquet in the embeddings-table schema (`slide_id, x, y, tile_size, embedding`), so
//! they flow into sampling and training exactly like `embed`'s output.
//!
//! `path` is one Parquet file, a folder of them, or a pattern with `{slide_id}` naming one file
//! per slide. Files holding several slides are indexed once when the stage starts (from the
//! `slide_id` column alone) and then decoded once, row group after row group in file order,
//! each slide handed on as soon as its last row is read ([`crate::parquet_stream`]).

use crate::error::{FeaturesError, FeaturesResult};
use crate::parquet_stream::{SlideIndex, SlideStream};
use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::compute::kernels::cmp::eq;
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use tessera_pipeline::schema::{embeddings_schema, EMBEDDING, SLIDE_ID, TILE_SIZE, X, Y};
use tessera_pipeline::{
    BuildContext, InputSpec, ParamIssue, SlideHandle, Stage, StageContext, StageError, StageKind,
    StageResult,
};

/// The placeholder a per-slide file pattern must contain.
pub const SLIDE_ID_PLACEHOLDER: &str = "{slide_id}";

/// Where one-file-per-slide sources (`h5_features`, `slideflow_features`) find their files:
/// `path` resolved against `base_dir` as a `{slide_id}` pattern, a folder `F` meaning
/// `F/{slide_id}.EXTENSION`.
pub fn per_slide_pattern(path: &str, base_dir: &Path, extension: &str) -> String {
    let resolved = tessera_pipeline::paths::resolve_path(base_dir, Path::new(path));
    let pattern = if path.contains(SLIDE_ID_PLACEHOLDER) {
        resolved
    } else {
        resolved.join(format!("{SLIDE_ID_PLACEHOLDER}.{extension}"))
    };
    pattern.to_string_lossy().into_owned()
}

/// The file of `slide_id` under a `{slide_id}` pattern.
pub fn slide_file(pattern: &str, slide_id: &str) -> PathBuf {
    PathBuf::from(pattern.replace(SLIDE_ID_PLACEHOLDER, slide_id))
}

/// Parameters of `kind: features`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesParams {
    /// Where the embeddings are: a Parquet file, a folder of Parquet files, or a pattern such
    /// as `features/{slide_id}.parquet` (relative paths: to the experiment file). Columns:
    /// `slide_id` (string), `x`, `y`, `tile_size` (integers, level-0 px) and `embedding`
    /// (fixed-size list, or list of equal lengths, of floats).
    pub path: String,
    /// MiB of slides read ahead of the dataset's order that may wait in memory. Files are read
    /// once in their own order; when the dataset CSV lists slides in another order, slides
    /// read before they are asked for wait here, and past this bound the ones asked for last
    /// are read again on their own. Does not change the output (not in cache keys).
    pub buffer_mb: u64,
}

impl Default for FeaturesParams {
    fn default() -> Self {
        FeaturesParams {
            path: String::new(),
            buffer_mb: 1024,
        }
    }
}

/// How `path` names the files.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    File(PathBuf),
    Folder(PathBuf),
    /// A path containing `{slide_id}`.
    Pattern(String),
}

impl Layout {
    /// Interprets `path`, resolving it with `resolve`.
    pub fn of(path: &str, resolve: impl Fn(&str) -> PathBuf) -> Layout {
        let resolved = resolve(path);
        if path.contains(SLIDE_ID_PLACEHOLDER) {
            Layout::Pattern(resolved.to_string_lossy().into_owned())
        } else if resolved.is_dir() {
            Layout::Folder(resolved)
        } else {
            Layout::File(resolved)
        }
    }

    /// Every Parquet file this layout names now (a pattern: those matching it in its folder).
    pub fn files(&self) -> FeaturesResult<Vec<PathBuf>> {
        match self {
            Layout::File(p) => Ok(vec![p.clone()]),
            Layout::Folder(dir) => {
                let mut files = list_dir(dir)?
                    .into_iter()
                    .filter(|p| {
                        p.extension()
                            .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
                    })
                    .collect::<Vec<_>>();
                files.sort();
                Ok(files)
            }
            Layout::Pattern(pattern) => {
                let (prefix, suffix) = pattern
                    .split_once(SLIDE_ID_PLACEHOLDER)
                    .unwrap_or((pattern, ""));
                // The folder holding the file names: the prefix up to its last separator.
                let dir = Path::new(&format!("{prefix}_"))
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let mut files: Vec<PathBuf> = list_dir(&dir)?
                    .into_iter()
                    .filter(|p| {
                        let s = p.to_string_lossy();
                        s.len() > prefix.len() + suffix.len()
                            && s.starts_with(prefix)
                            && s.ends_with(suffix)
                    })
                    .collect();
                files.sort();
                Ok(files)
            }
        }
    }

    /// The file of one slide, for patterns.
    pub fn slide_file(&self, slide_id: &str) -> Option<PathBuf> {
        match self {
            Layout::Pattern(p) => Some(slide_file(p, slide_id)),
            _ => None,
        }
    }
}

fn list_dir(dir: &Path) -> FeaturesResult<Vec<PathBuf>> {
    let err = |e: std::io::Error| FeaturesError::File {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    std::fs::read_dir(dir)
        .map_err(err)?
        .map(|e| e.map(|e| e.path()).map_err(err))
        .collect()
}

pub(crate) fn features_err(path: &Path, message: impl Into<String>) -> FeaturesError {
    FeaturesError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

pub(crate) fn open(path: &Path) -> FeaturesResult<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).map_err(|e| features_err(path, e.to_string()))?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| features_err(path, format!("not a readable Parquet file: {e}")))
}

/// Checks a file's columns and returns the output schema they map to: the tile keys and
/// `embedding` as `FixedSizeList<Float32 | Float16, D>`.
pub fn probe_schema(path: &Path) -> FeaturesResult<SchemaRef> {
    let builder = open(path)?;
    let schema = builder.schema().clone();
    let field = |name: &str| {
        schema.field_with_name(name).map_err(|_| {
            let found: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            features_err(
                path,
                format!(
                    "missing column `{name}` (columns are: {})",
                    found.join(", ")
                ),
            )
        })
    };
    let id = field(SLIDE_ID)?;
    if !matches!(
        id.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) {
        return Err(features_err(
            path,
            format!("column `slide_id` is {}, expected a string", id.data_type()),
        ));
    }
    for name in [X, Y, TILE_SIZE] {
        let f = field(name)?;
        if !f.data_type().is_integer() {
            return Err(features_err(
                path,
                format!(
                    "column `{name}` is {}, expected an integer (level-0 pixels)",
                    f.data_type()
                ),
            ));
        }
    }
    let emb = field(EMBEDDING)?;
    let bad = || {
        features_err(
            path,
            format!(
                "column `{EMBEDDING}` is {}, expected a list of floats",
                emb.data_type()
            ),
        )
    };
    let (item, dim) = match emb.data_type() {
        DataType::FixedSizeList(item, d) => (item.data_type().clone(), *d as usize),
        DataType::List(item) | DataType::LargeList(item) => (
            item.data_type().clone(),
            first_list_len(builder, path)?.ok_or_else(|| {
                features_err(
                    path,
                    format!("column `{EMBEDDING}` has no non-empty row to take the width from"),
                )
            })?,
        ),
        _ => return Err(bad()),
    };
    let half = match item {
        DataType::Float16 => true,
        DataType::Float32 | DataType::Float64 => false,
        _ => return Err(bad()),
    };
    Ok(embeddings_schema(dim, half))
}

fn first_list_len(
    builder: ParquetRecordBatchReaderBuilder<File>,
    path: &Path,
) -> FeaturesResult<Option<usize>> {
    let mask = ProjectionMask::columns(builder.parquet_schema(), [EMBEDDING]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(64)
        .build()
        .map_err(|e| features_err(path, e.to_string()))?;
    for batch in reader {
        let batch = batch.map_err(|e| features_err(path, e.to_string()))?;
        let col = batch.column(0);
        let lens: Vec<usize> = match col.data_type() {
            DataType::List(_) => col
                .as_any()
                .downcast_ref::<arrow::array::ListArray>()
                .map(|l| {
                    (0..l.len())
                        .filter(|i| l.is_valid(*i))
                        .map(|i| l.value_length(i) as usize)
                        .collect()
                })
                .unwrap_or_default(),
            DataType::LargeList(_) => col
                .as_any()
                .downcast_ref::<arrow::array::LargeListArray>()
                .map(|l| {
                    (0..l.len())
                        .filter(|i| l.is_valid(*i))
                        .map(|i| l.value_length(i) as usize)
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        if let Some(&d) = lens.iter().find(|&&d| d > 0) {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

/// Reads the rows of `slide_id` from `path` (only `row_groups` when given), converted to
/// `schema`.
pub fn read_slide_rows(
    path: &Path,
    row_groups: Option<Vec<usize>>,
    slide_id: &str,
    schema: &SchemaRef,
) -> FeaturesResult<Vec<RecordBatch>> {
    let builder = open(path)?;
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    for name in &names {
        if builder.schema().field_with_name(name).is_err() {
            return Err(features_err(path, format!("missing column `{name}`")));
        }
    }
    let mask = ProjectionMask::columns(builder.parquet_schema(), names.iter().copied());
    let mut builder = builder.with_projection(mask);
    if let Some(rgs) = row_groups {
        builder = builder.with_row_groups(rgs);
    }
    let reader = builder
        .build()
        .map_err(|e| features_err(path, e.to_string()))?;
    let wanted = StringArray::new_scalar(slide_id);
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| features_err(path, e.to_string()))?;
        let batch = convert_batch(path, &batch, schema)?;
        let keep = eq(batch.column(0), &wanted)?;
        let batch = if keep.true_count() == batch.num_rows() {
            batch
        } else {
            filter_record_batch(&batch, &keep)?
        };
        if batch.num_rows() > 0 {
            out.push(batch);
        }
    }
    Ok(out)
}

/// A batch of a file's columns converted to `schema` (by name), naming the file and column
/// on failure.
pub(crate) fn convert_batch(
    path: &Path,
    batch: &RecordBatch,
    schema: &SchemaRef,
) -> FeaturesResult<RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| convert_column(path, batch, f))
        .collect::<FeaturesResult<Vec<ArrayRef>>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| features_err(path, e.to_string()))
}

/// Casts one file column to the output field's type, naming the file and column on failure.
fn convert_column(path: &Path, batch: &RecordBatch, field: &Field) -> FeaturesResult<ArrayRef> {
    let name = field.name();
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| features_err(path, format!("missing column `{name}`")))?;
    if let (DataType::List(_) | DataType::LargeList(_), DataType::FixedSizeList(_, d)) =
        (col.data_type(), field.data_type())
    {
        let d = *d as usize;
        let bad = (0..col.len()).find(|&i| {
            let len = match col.data_type() {
                DataType::List(_) => col
                    .as_any()
                    .downcast_ref::<arrow::array::ListArray>()
                    .map(|l| l.value_length(i) as usize),
                _ => col
                    .as_any()
                    .downcast_ref::<arrow::array::LargeListArray>()
                    .map(|l| l.value_length(i) as usize),
            };
            col.is_valid(i) && len != Some(d)
        });
        if let Some(i) = bad {
            return Err(features_err(
                path,
                format!("column `{name}`: row {i} is not {d} values long like the first embedding"),
            ));
        }
    }
    let out = cast(col, field.data_type())
        .map_err(|e| features_err(path, format!("column `{name}` ({}): {e}", col.data_type())))?;
    if out.null_count() > 0 {
        return Err(features_err(
            path,
            format!(
                "column `{name}` has {} empty (null) values",
                out.null_count()
            ),
        ));
    }
    Ok(out)
}

impl FeaturesParams {
    /// The schema of the first readable file ([`first_readable`]).
    fn probe_files(&self, files: &[PathBuf]) -> StageResult<SchemaRef> {
        match first_readable(files, probe_schema) {
            Some(probed) => probed.map_err(|e| StageError::other("reading the features schema", e)),
            None => Err(StageError::msg(format!(
                "features: no Parquet file found at `{}`",
                self.path
            ))),
        }
    }

    fn layout(&self, ctx: Option<&BuildContext>) -> Layout {
        Layout::of(&self.path, |p| match ctx {
            Some(ctx) => ctx.resolve(p),
            None => PathBuf::from(p),
        })
    }
}

impl StageKind for FeaturesParams {
    const KIND: &'static str = "features";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str = "Reads tile embeddings computed elsewhere from Parquet (slide_id, x, y, tile_size, embedding)";

    fn input_spec(&self) -> InputSpec {
        InputSpec::Dataset
    }

    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        self.output_schema_at(inputs, Path::new("."))
    }

    fn output_schema_at(&self, _inputs: &[SchemaRef], base_dir: &Path) -> StageResult<SchemaRef> {
        let layout = Layout::of(&self.path, |p| {
            tessera_pipeline::paths::resolve_path(base_dir, Path::new(p))
        });
        let files = layout
            .files()
            .map_err(|e| StageError::other("listing the features files", e))?;
        self.probe_files(&files)
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        if self.path.trim().is_empty() {
            return Err(ParamIssue::new(
                "path",
                "required: a Parquet file, a folder of them, or a pattern with {slide_id}",
            ));
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        let layout = self.layout(Some(ctx));
        let files = layout
            .files()
            .map_err(|e| StageError::other("listing the features files", e))?;
        let schema = self.probe_files(&files)?;
        let index = match layout {
            Layout::Pattern(_) => None,
            _ => Some(
                SlideIndex::build(&files)
                    .map_err(|e| StageError::other("indexing the features files", e))?,
            ),
        };
        Ok(Box::new(FeaturesStage {
            layout,
            schema,
            index,
            stream: None,
            buffer_bytes: usize::try_from(self.buffer_mb.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
        }))
    }

    fn key_neutral_params() -> &'static [&'static str] {
        &["buffer_mb"]
    }

    fn cache_salt(&self, ctx: &BuildContext) -> StageResult<String> {
        let layout = self.layout(Some(ctx));
        let files = match &layout {
            Layout::Pattern(_) => ctx
                .slides
                .iter()
                .filter_map(|s| layout.slide_file(&s.id))
                .collect(),
            _ => layout
                .files()
                .map_err(|e| StageError::other("listing the features files", e))?,
        };
        Ok(files_salt(files))
    }
}

/// `probe` of the first file it succeeds on, else the first file's error; `None` without files.
/// With one file per slide, a broken file is that slide's error when it is read, not the whole
/// experiment's.
pub fn first_readable<T>(
    files: &[PathBuf],
    probe: impl Fn(&Path) -> FeaturesResult<T>,
) -> Option<FeaturesResult<T>> {
    let mut first_error = None;
    for f in files {
        match probe(f) {
            Ok(v) => return Some(Ok(v)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map(Err)
}

/// A cache salt naming imported files by path and content identity (size, ends' hash), so an
/// entry downstream is recomputed when a features file is replaced.
pub(crate) fn files_salt(files: impl IntoIterator<Item = PathBuf>) -> String {
    let mut h = blake3::Hasher::new();
    for f in files {
        h.update(f.to_string_lossy().as_bytes());
        let identity =
            tessera_pipeline::cache::file_identity(&f).unwrap_or_else(|_| "missing".into());
        h.update(identity.as_bytes());
    }
    h.finalize().to_hex()[..32].to_string()
}

/// The running `features` source.
struct FeaturesStage {
    layout: Layout,
    schema: SchemaRef,
    /// Where each slide's rows are, for single files and folders; taken by the stream when
    /// the first slide is asked for.
    index: Option<SlideIndex>,
    stream: Option<SlideStream>,
    buffer_bytes: usize,
}

impl FeaturesStage {
    /// One slide's rows: its own file under a pattern, else from the stream over the files
    /// (started at the first slide, knowing which slides this run will ask for and in what
    /// order).
    fn rows_of(&mut self, ctx: &StageContext, slide_id: &str) -> FeaturesResult<Vec<RecordBatch>> {
        if let Some(path) = self.layout.slide_file(slide_id) {
            if !path.is_file() {
                return Err(features_err(
                    &path,
                    format!("no features file for slide `{slide_id}`"),
                ));
            }
            let rows = read_slide_rows(&path, None, slide_id, &self.schema)?;
            if rows.is_empty() {
                return Err(features_err(
                    &path,
                    format!("no row has slide_id `{slide_id}`"),
                ));
            }
            return Ok(rows);
        }
        if self.stream.is_none() {
            let index = self.index.take().unwrap_or_default();
            let wanted = wanted_slides(ctx);
            self.stream = Some(SlideStream::new(
                index,
                self.schema.clone(),
                wanted,
                self.buffer_bytes,
            ));
        }
        match self.stream.as_mut() {
            Some(stream) => stream.take(slide_id),
            None => Ok(Vec::new()),
        }
    }
}

/// The slides this worker will be asked for, ranked in the order they will be: the dataset's
/// slides this stage computes in this run. With several workers sharing the slides, a
/// worker cannot know which it gets: it then keeps none it was not asked for (each is read on
/// its own when the stream has passed it).
fn wanted_slides(ctx: &StageContext) -> HashMap<String, usize> {
    if ctx.build_context().workers > 1 {
        return HashMap::new();
    }
    ctx.slides()
        .iter()
        .filter(|s| ctx.computes(s))
        .enumerate()
        .map(|(rank, s)| (s.id.clone(), rank))
        .collect()
}

impl Stage for FeaturesStage {
    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        let rows = self
            .rows_of(ctx, &slide.id)
            .map_err(|e| StageError::other("reading features", e))?;
        for batch in rows {
            ctx.emit(slide, batch)?;
        }
        ctx.end_slide(slide)
    }

    fn finish(&mut self, ctx: &mut StageContext) -> StageResult {
        if let Some(stream) = &self.stream {
            ctx.set_detail(
                "parquet_stream",
                serde_json::to_value(stream.stats()).unwrap_or_default(),
            );
        }
        Ok(())
    }
}
