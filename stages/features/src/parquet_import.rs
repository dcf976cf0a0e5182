//! `kind: features`: embeddings computed elsewhere (another tool, an earlier project), read
//! from Parquet in the embeddings-table schema (`slide_id, x, y, tile_size, embedding`), so
//! they flow into sampling and training exactly like `embed`'s output.
//!
//! `path` is one Parquet file, a folder of them, or a pattern with `{slide_id}` naming one file
//! per slide. For files holding several slides, an index of which row groups hold which slide
//! is made once when the stage starts, so each slide reads only its own row groups.

use crate::error::{FeaturesError, FeaturesResult};
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
use tessera_pipeline::schema::{embeddings_schema, EMBEDDING};
use tessera_pipeline::{
    BuildContext, InputSpec, ParamIssue, SlideHandle, Stage, StageContext, StageError, StageKind,
    StageResult,
};

/// The placeholder a per-slide file pattern must contain.
pub const SLIDE_ID_PLACEHOLDER: &str = "{slide_id}";

/// Parameters of `kind: features`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesParams {
    /// Where the embeddings are: a Parquet file, a folder of Parquet files, or a pattern such
    /// as `features/{slide_id}.parquet` (relative paths: to the experiment file). Columns:
    /// `slide_id` (string), `x`, `y`, `tile_size` (integers, level-0 px) and `embedding`
    /// (fixed-size list, or list of equal lengths, of floats).
    pub path: String,
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
            Layout::Pattern(p) => Some(PathBuf::from(p.replace(SLIDE_ID_PLACEHOLDER, slide_id))),
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

fn open(path: &Path) -> FeaturesResult<ParquetRecordBatchReaderBuilder<File>> {
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
    let id = field("slide_id")?;
    if !matches!(
        id.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) {
        return Err(features_err(
            path,
            format!("column `slide_id` is {}, expected a string", id.data_type()),
        ));
    }
    for name in ["x", "y", "tile_size"] {
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

/// Which row groups of which files hold each slide.
type SlideIndex = HashMap<String, Vec<(PathBuf, Vec<usize>)>>;

/// Reads only the `slide_id` column of each row group of `files`.
fn index_slides(files: &[PathBuf]) -> FeaturesResult<SlideIndex> {
    let mut index: SlideIndex = HashMap::new();
    for path in files {
        let builder = open(path)?;
        let groups = builder.metadata().num_row_groups();
        for rg in 0..groups {
            let builder = open(path)?;
            let mask = ProjectionMask::columns(builder.parquet_schema(), ["slide_id"]);
            let reader = builder
                .with_projection(mask)
                .with_row_groups(vec![rg])
                .build()
                .map_err(|e| features_err(path, e.to_string()))?;
            let mut ids = std::collections::BTreeSet::new();
            for batch in reader {
                let batch = batch.map_err(|e| features_err(path, e.to_string()))?;
                let col = cast(batch.column(0), &DataType::Utf8)
                    .map_err(|e| features_err(path, format!("column `slide_id`: {e}")))?;
                if let Some(s) = col.as_any().downcast_ref::<StringArray>() {
                    ids.extend(s.iter().flatten().map(str::to_string));
                }
            }
            for id in ids {
                let entry = index.entry(id).or_default();
                match entry.last_mut() {
                    Some((p, rgs)) if p == path => rgs.push(rg),
                    _ => entry.push((path.clone(), vec![rg])),
                }
            }
        }
    }
    Ok(index)
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
        let columns = schema
            .fields()
            .iter()
            .map(|f| convert_column(path, &batch, f))
            .collect::<FeaturesResult<Vec<ArrayRef>>>()?;
        let batch = RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| features_err(path, e.to_string()))?;
        let keep = eq(batch.column(0), &wanted)?;
        let batch = filter_record_batch(&batch, &keep)?;
        if batch.num_rows() > 0 {
            out.push(batch);
        }
    }
    Ok(out)
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
                index_slides(&files)
                    .map_err(|e| StageError::other("indexing the features files", e))?,
            ),
        };
        Ok(Box::new(FeaturesStage {
            layout,
            schema,
            index,
        }))
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
pub(crate) fn first_readable<T>(
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
    /// Row groups per slide, for single files and folders.
    index: Option<SlideIndex>,
}

impl FeaturesStage {
    fn rows_of(&self, slide_id: &str) -> FeaturesResult<Vec<RecordBatch>> {
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
        let parts = self
            .index
            .as_ref()
            .and_then(|i| i.get(slide_id))
            .ok_or_else(|| {
                let place = match &self.layout {
                    Layout::File(p) | Layout::Folder(p) => p.clone(),
                    Layout::Pattern(p) => PathBuf::from(p),
                };
                features_err(&place, format!("no rows for slide `{slide_id}`"))
            })?;
        let mut out = Vec::new();
        for (path, rgs) in parts {
            out.extend(read_slide_rows(
                path,
                Some(rgs.clone()),
                slide_id,
                &self.schema,
            )?);
        }
        Ok(out)
    }
}

impl Stage for FeaturesStage {
    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        let rows = self
            .rows_of(&slide.id)
            .map_err(|e| StageError::other("reading features", e))?;
        for batch in rows {
            ctx.emit(slide, batch)?;
        }
        ctx.end_slide(slide)
    }
}
