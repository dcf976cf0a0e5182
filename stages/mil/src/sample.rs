//! The epoch driver: gathers every slide's embeddings, then replays the dataset epoch after
//! epoch as bags of K tiles drawn without replacement (the paper re-samples every epoch),
//! until training closes its inputs or `epochs` is reached. See the crate docs for the contract.
//!
//! Memory: every slide's embeddings stay in memory as Arrow arrays for the whole training
//! (N tiles x D floats; pixels columns are dropped on arrival), packed back to back into large
//! shared allocations ([`crate::slab`]) so that they cost their bytes and no allocator
//! rounding; columns holding one value for the whole slide (`slide_id`, usually `tile_size`)
//! are kept once per slide and repeated when a bag is drawn. Fed tiles without embeddings
//! (end-to-end training, `train.finetune_embedder`), it keeps the pixels instead: N tiles x
//! side^2 x 3 bytes per slide (about 150 KB per 224 px tile), practical for small datasets.
//! With `spill_to_disk`, each slide's table lives in a memory-mapped file instead (see
//! [`crate::spill`]): resident memory is then what the kernel keeps cached.

use crate::columns::int64_values;
use crate::columns::{instance_column, require_instances, InstanceColumn};
use crate::error::MilError;
use crate::seeding::stream_rng;
use crate::sparse_map::{infer_grid_step, GRID_STEP};
use crate::splits::{assign_for, stratum, Split, SplitParams};
use arrow::array::{
    Array, ArrayRef, Int64Array, RecordBatch, RecordBatchOptions, StringArray, UInt32Array,
};
use arrow::compute::kernels::cmp::eq;
use arrow::compute::{take, take_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rand::seq::SliceRandom;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tessera_pipeline::schema::{tile_key_columns, PIXELS, PIXELS_SIZE, TILE_SIZE, X, Y};
use tessera_pipeline::{
    check_running, per_slide, BuildContext, InputSpec, ParamIssue, PerSlide, SlideHandle,
    SlideOutput, Stage, StageContext, StageError, StageKind, StageResult,
};

/// Parameters of the `sample` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SampleParams {
    /// K: tiles drawn per training slide and epoch, without replacement (all of them when a
    /// slide has fewer). 0 = every tile. Paper: 100.
    pub tiles_per_slide: usize,
    /// K for validation and test slides (drawn once, the same every epoch). Default: the same
    /// as `tiles_per_slide`; 0 = every tile.
    pub eval_tiles_per_slide: Option<usize>,
    /// Number of epochs to emit; 0 = until the training stage stops (its own epoch limit or
    /// early stopping).
    pub epochs: u64,
    /// Visit the training slides in a new random order every epoch.
    pub shuffle: bool,
    /// How to split the dataset when its CSV has no `split` column.
    pub splits: SplitParams,
    /// Keep each slide's tiles in a memory-mapped file under `spill_dir` instead of RAM (for
    /// cohorts whose embeddings do not fit in memory; the kernel pages them in as bags are
    /// drawn). The files are unlinked as soon as they are mapped: nothing is left behind.
    pub spill_to_disk: bool,
    /// Folder of the spill files (relative to the experiment); default `OUT/.spill`. Put it on
    /// a local disk.
    pub spill_dir: Option<std::path::PathBuf>,
}

impl Default for SampleParams {
    fn default() -> Self {
        SampleParams {
            tiles_per_slide: 100,
            eval_tiles_per_slide: None,
            epochs: 0,
            shuffle: true,
            splits: SplitParams::default(),
            spill_to_disk: false,
            spill_dir: None,
        }
    }
}

/// Column added by `sample`: the slide's split (`train`, `val` or `test`).
pub const SPLIT: &str = "split";
/// Column added by `sample`: the slide's label (its stratum for survival and regression).
pub const LABEL: &str = "label";

/// Columns `sample` replaces.
const REPLACED: [&str; 3] = [SPLIT, LABEL, GRID_STEP];

/// Whether `sample` drops a column of `input`: the ones it replaces, and the pixels when the
/// input carries embeddings (pixels are not needed downstream of embedding and would multiply
/// memory). Without embeddings the pixels are the instances (end-to-end training) and stay.
fn dropped(input: &Schema, name: &str) -> bool {
    REPLACED.contains(&name)
        || ((name == PIXELS || name == PIXELS_SIZE)
            && instance_column(input) == Some(InstanceColumn::Embedding))
}

/// The schema of the bags: the input's columns (pixels dropped next to embeddings), then
/// `split`, `label`, `grid_step`.
pub fn sample_schema(input: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = input
        .fields()
        .iter()
        .filter(|f| !dropped(input, f.name()))
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(SPLIT, DataType::Utf8, false));
    fields.push(Field::new(LABEL, DataType::Utf8, false));
    fields.push(Field::new(GRID_STEP, DataType::Int64, false));
    Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()))
}

/// The input's columns that `sample` keeps.
fn kept_columns(batch: &RecordBatch) -> Result<RecordBatch, MilError> {
    let schema = batch.schema();
    let keep: Vec<usize> = (0..schema.fields().len())
        .filter(|&i| !dropped(&schema, schema.field(i).name()))
        .collect();
    Ok(batch.project(&keep)?)
}

/// Rows drawn for one bag: all rows when `k` is 0 or at least the bag's size, else `k` rows
/// without replacement, in table order.
pub fn draw_rows(n: usize, k: usize, rng: &mut impl rand::Rng) -> Vec<u32> {
    if k == 0 || k >= n {
        return (0..n as u32).collect();
    }
    let mut rows: Vec<u32> = rand::seq::index::sample(rng, n, k)
        .into_iter()
        .map(|r| r as u32)
        .collect();
    rows.sort_unstable();
    rows
}

impl StageKind for SampleParams {
    const KIND: &'static str = "sample";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "Epoch driver: splits the dataset by patient and emits K tiles per slide, re-sampled every epoch";

    /// The tile keys; the instances (embeddings or pixels) are checked by `output_schema`.
    fn input_spec(&self) -> InputSpec {
        InputSpec::Tables(vec![tile_key_columns()])
    }

    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        let input = inputs
            .first()
            .ok_or_else(|| StageError::msg("sample needs one input"))?;
        require_instances(input, "sample")?;
        Ok(sample_schema(input))
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        self.splits
            .validate()
            .map_err(|(field, message)| ParamIssue::new(format!("splits.{field}"), message))
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        let splits = assign_for(ctx.task, &ctx.slides, ctx.seed, &self.splits)?;
        let spill_dir = self
            .spill_to_disk
            .then(|| crate::spill::spill_folder(ctx, self.spill_dir.as_deref()));
        Ok(per_slide(SampleStage {
            params: self.clone(),
            seed: ctx.seed,
            splits,
            task: ctx.task,
            bags: BTreeMap::new(),
            spill_dir,
            slab: Default::default(),
        }))
    }

    /// Holds every slide until training: one copy.
    fn parallel(&self) -> bool {
        false
    }

    /// `epochs: 0` loops until training stops it.
    fn endless(&self) -> bool {
        self.epochs == 0
    }

    /// Its output changes every epoch.
    fn cacheable(&self) -> bool {
        false
    }
}

/// A slide's tiles as `sample` keeps them: the columns that vary from tile to tile, and once
/// each the ones that hold one value for the whole slide (`slide_id`, usually `tile_size`;
/// 5% of the table at 128-d embeddings), repeated again when a bag is drawn.
#[derive(Clone)]
struct SlideTiles {
    /// The kept columns, in order.
    schema: SchemaRef,
    /// The columns that vary (or that cannot be compared cheaply), in schema order.
    varying: RecordBatch,
    /// `(position in schema, one-row array)` of the columns holding one value.
    constants: Vec<(usize, ArrayRef)>,
}

impl SlideTiles {
    /// Splits `table` into its varying and its constant columns. A column is constant when it
    /// is of a primitive, boolean or string type, has no nulls, and all its rows are equal;
    /// tables of fewer than two rows are kept whole.
    fn new(table: RecordBatch) -> Result<SlideTiles, MilError> {
        let schema = table.schema();
        let mut constants = Vec::new();
        if table.num_rows() >= 2 {
            for (i, col) in table.columns().iter().enumerate() {
                if is_constant(col)? {
                    // A copy of the first row, not a slice that would keep the whole column.
                    constants.push((i, take(col, &UInt32Array::from(vec![0u32]), None)?));
                }
            }
        }
        let keep: Vec<usize> = (0..schema.fields().len())
            .filter(|i| !constants.iter().any(|(p, _)| p == i))
            .collect();
        let varying = RecordBatch::try_new_with_options(
            Arc::new(schema.project(&keep)?),
            keep.iter().map(|&i| table.column(i).clone()).collect(),
            &RecordBatchOptions::new().with_row_count(Some(table.num_rows())),
        )?;
        Ok(SlideTiles {
            schema,
            varying,
            constants,
        })
    }

    fn num_rows(&self) -> usize {
        self.varying.num_rows()
    }

    /// The kept columns at `rows`, in schema order (the same arrays as taking them from the
    /// whole table).
    fn take(&self, rows: &[u32]) -> Result<Vec<ArrayRef>, MilError> {
        let indices = UInt32Array::from(rows.to_vec());
        let taken = take_record_batch(&self.varying, &indices)?;
        let mut varying = taken.columns().iter();
        let zeros = UInt32Array::from(vec![0u32; rows.len()]);
        let mut columns = Vec::with_capacity(self.schema.fields().len());
        for i in 0..self.schema.fields().len() {
            match self.constants.iter().find(|(p, _)| *p == i) {
                Some((_, one)) => columns.push(take(one, &zeros, None)?),
                None => columns.push(
                    varying
                        .next()
                        .ok_or_else(|| {
                            arrow::error::ArrowError::SchemaError(
                                "sample: fewer varying columns than the schema holds".into(),
                            )
                        })?
                        .clone(),
                ),
            }
        }
        Ok(columns)
    }
}

/// Whether every row of `col` holds the same value (no nulls; primitive, boolean and string
/// columns only: the instance columns are never constant and are not compared).
fn is_constant(col: &ArrayRef) -> Result<bool, MilError> {
    let comparable = col.data_type().is_primitive()
        || matches!(
            col.data_type(),
            DataType::Boolean | DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        );
    if !comparable || col.is_empty() || col.null_count() > 0 {
        return Ok(false);
    }
    let first = arrow::array::Scalar::new(col.slice(0, 1));
    Ok(eq(col, &first)?.true_count() == col.len())
}

/// A slide's tiles, ready to be sampled.
struct Bag {
    slide: SlideHandle,
    tiles: SlideTiles,
    /// The spill mapping `tiles` reads from (`spill_to_disk`).
    spilled: Option<crate::spill::Spilled>,
    split: Split,
    label: String,
    grid_step: i64,
}

/// The running `sample` stage.
struct SampleStage {
    params: SampleParams,
    seed: u64,
    /// Split of every dataset slide, by dataset index.
    splits: Vec<Split>,
    /// The experiment's task: the `label` column is the slide's stratum for it.
    task: tessera_pipeline::Task,
    /// Complete slides, by dataset index (so epochs visit them in dataset order).
    bags: BTreeMap<usize, Bag>,
    /// Where slides' tiles are spilled to memory-mapped files (`spill_to_disk`).
    spill_dir: Option<std::path::PathBuf>,
    /// Where slides' tiles are packed in memory (without `spill_to_disk`).
    slab: crate::slab::Slab,
}

impl SampleStage {
    fn tiles_for(&self, split: Split) -> usize {
        match split {
            Split::Train => self.params.tiles_per_slide,
            _ => self
                .params
                .eval_tiles_per_slide
                .unwrap_or(self.params.tiles_per_slide),
        }
    }

    /// The bag of `bag` for `epoch`: training bags change every epoch, the others never.
    fn draw(&self, bag: &Bag, epoch: u64) -> Result<RecordBatch, MilError> {
        let epoch_part = (bag.split == Split::Train).then_some(epoch);
        let mut rng = stream_rng(self.seed, "sample", epoch_part, &bag.slide.id);
        let rows = draw_rows(bag.tiles.num_rows(), self.tiles_for(bag.split), &mut rng);
        let n = rows.len();
        let mut columns = bag.tiles.take(&rows)?;
        if let Some(spilled) = &bag.spilled {
            spilled.release_pages();
        }
        let schema = sample_schema(&bag.tiles.schema);
        columns.push(Arc::new(StringArray::from(vec![bag.split.as_str(); n])));
        columns.push(Arc::new(StringArray::from(vec![bag.label.as_str(); n])));
        columns.push(Arc::new(Int64Array::from(vec![bag.grid_step; n])));
        Ok(RecordBatch::try_new(schema, columns)?)
    }

    /// Measures the slide's grid step on all its tiles (exact where a sampled bag is not).
    fn grid_step(
        ctx: &StageContext,
        slide: &SlideHandle,
        tiles: &RecordBatch,
    ) -> Result<i64, MilError> {
        let xs = int64_values(tiles, X, "the tile-grid step")?;
        let ys = int64_values(tiles, Y, "the tile-grid step")?;
        let tile_size = int64_values(tiles, TILE_SIZE, "the tile-grid step")?
            .first()
            .copied()
            .unwrap_or(1);
        Ok(match infer_grid_step(&xs, &ys, tile_size) {
            Some(g) => {
                if !g.regular {
                    ctx.warn(
                        Some(slide),
                        format!(
                            "tile coordinates are not on a regular grid; grid step taken as the smallest \
                             distance between tiles, {} px (set sparse_map's `grid_step_px` to override)",
                            g.step
                        ),
                    );
                }
                g.step
            }
            None => tile_size.max(1),
        })
    }
}

/// Gathers each slide whole (the adapter holds its rows until it ends), keeps it as a [`Bag`],
/// and ends the slides itself, every epoch, from `finish`.
impl PerSlide for SampleStage {
    /// Pixels next to embeddings are dropped as they arrive, never held.
    fn gather(&mut self, _slide: &SlideHandle, batch: RecordBatch) -> StageResult<RecordBatch> {
        Ok(kept_columns(&batch)?)
    }

    fn process_slide(
        &mut self,
        ctx: &mut StageContext,
        slide: &SlideHandle,
        table: Option<RecordBatch>,
    ) -> StageResult<SlideOutput> {
        self.keep_slide(ctx, slide, table)?;
        Ok(SlideOutput::Held)
    }

    fn forget_slide(&mut self, slide: &SlideHandle) {
        self.bags.remove(&slide.index);
    }

    /// Upstream epochs mean nothing here: this stage starts the epochs.
    fn on_epoch_end(&mut self, _ctx: &mut StageContext, _epoch: u64) -> StageResult {
        Ok(())
    }

    fn finish(&mut self, ctx: &mut StageContext) -> StageResult {
        self.replay_epochs(ctx)
    }
}

impl SampleStage {
    /// Keeps a complete slide as a bag to sample from (or warns why it is left out).
    fn keep_slide(
        &mut self,
        ctx: &mut StageContext,
        slide: &SlideHandle,
        table: Option<RecordBatch>,
    ) -> StageResult {
        let label = match stratum(self.task, slide) {
            Some(label) => label,
            None if self.task == tessera_pipeline::Task::Classification => {
                return Err(MilError::NoLabel {
                    slide: slide.id.clone(),
                }
                .into())
            }
            None => {
                ctx.warn(
                    Some(slide),
                    format!(
                        "no {} in the dataset CSV for task {}: the slide is left out of training and evaluation",
                        self.task.columns().iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join("/"),
                        self.task
                    ),
                );
                return Ok(());
            }
        };
        let split = *self.splits.get(slide.index).ok_or_else(|| {
            StageError::msg(format!(
                "slide `{}` is not in the dataset the splits were made for",
                slide.id
            ))
        })?;
        let Some(tiles) = table else {
            ctx.warn(
                Some(slide),
                "no tiles: the slide is left out of training and evaluation",
            );
            return Ok(());
        };
        let grid_step = Self::grid_step(ctx, slide, &tiles)?;
        let mut tiles = SlideTiles::new(tiles)?;
        let spilled = match &self.spill_dir {
            Some(dir) => Some(
                crate::spill::spill_mapped(
                    &tiles.varying,
                    &dir.join(format!("{}-{}.arrow", std::process::id(), slide.index)),
                )
                .map_err(MilError::from)?,
            ),
            None => None,
        };
        tiles.varying = match &spilled {
            Some(s) => {
                // Mapping the file back touched its pages; draws page in only what they read.
                s.release_pages();
                s.batch.clone()
            }
            None => self.slab.pack_batch(&tiles.varying)?,
        };
        self.bags.insert(
            slide.index,
            Bag {
                slide: slide.clone(),
                tiles,
                spilled,
                split,
                label,
                grid_step,
            },
        );
        Ok(())
    }

    /// Emits the kept slides epoch after epoch (see the module docs).
    fn replay_epochs(&mut self, ctx: &mut StageContext) -> StageResult {
        let of = |split: Split| -> Vec<usize> {
            self.bags
                .iter()
                .filter(|(_, b)| b.split == split)
                .map(|(i, _)| *i)
                .collect()
        };
        let (train, val, test) = (of(Split::Train), of(Split::Val), of(Split::Test));
        if self.bags.is_empty() {
            ctx.warn(
                None,
                "no slide with tiles reached `sample`: nothing to train on",
            );
            return Ok(());
        }
        if train.is_empty() {
            ctx.warn(None, "no training slide: bags of the other splits only");
        }
        tracing::info!(
            stage = %ctx.stage_name(),
            "{} slides: {} train, {} val, {} test; {} tiles per training bag",
            self.bags.len(),
            train.len(),
            val.len(),
            test.len(),
            self.params.tiles_per_slide
        );
        let per_epoch = self.bags.len() as u64;
        if self.params.epochs > 0 {
            ctx.set_progress_len(per_epoch * self.params.epochs);
        }
        let mut epoch = 0u64;
        while self.params.epochs == 0 || epoch < self.params.epochs {
            check_running(ctx)?;
            if self.params.epochs == 0 {
                ctx.set_progress_len(per_epoch * (epoch + 1));
            }
            ctx.set_progress_message(format!("epoch {epoch}"));
            let mut order = train.clone();
            if self.params.shuffle {
                order.shuffle(&mut stream_rng(self.seed, "sample-order", Some(epoch), ""));
            }
            for index in order.iter().chain(&val).chain(&test) {
                let bag = &self.bags[index];
                let batch = self.draw(bag, epoch)?;
                ctx.emit(&bag.slide, batch)?;
                ctx.end_slide(&bag.slide)?;
            }
            ctx.end_epoch(epoch)?;
            epoch += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse_map::tests::bag as tile_bag;
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    use tessera_pipeline::Slide;

    fn handle(id: &str, split: Option<Split>) -> SlideHandle {
        Arc::new(Slide {
            index: 0,
            id: id.into(),
            path: None,
            label: Some("tumor".into()),
            split: split.map(|s| s.as_str().to_string()),
            case_id: None,
            mpp: None,
            extra: Default::default(),
        })
    }

    fn stage(k: usize) -> SampleStage {
        SampleStage {
            params: SampleParams {
                tiles_per_slide: k,
                ..Default::default()
            },
            seed: 42,
            splits: vec![],
            task: Default::default(),
            bags: BTreeMap::new(),
            spill_dir: None,
            slab: Default::default(),
        }
    }

    fn bag(split: Split, n: usize) -> Bag {
        let coords: Vec<(i64, i64)> = (0..n as i64).map(|k| (k * 256, 0)).collect();
        Bag {
            slide: handle("s1", Some(split)),
            tiles: SlideTiles::new(tile_bag(&coords, 256)).unwrap(),
            spilled: None,
            split,
            label: "tumor".into(),
            grid_step: 256,
        }
    }

    fn xs(batch: &RecordBatch) -> Vec<i64> {
        batch
            .column_by_name("x")
            .unwrap()
            .as_primitive::<Int64Type>()
            .values()
            .to_vec()
    }

    #[test]
    fn draws_k_distinct_rows_or_all() {
        let mut rng = stream_rng(1, "t", None, "");
        let rows = draw_rows(50, 10, &mut rng);
        assert_eq!(rows.len(), 10);
        assert!(
            rows.windows(2).all(|w| w[0] < w[1]),
            "sorted and distinct: {rows:?}"
        );
        assert!(rows.iter().all(|&r| r < 50));
        assert_eq!(draw_rows(5, 10, &mut rng), [0, 1, 2, 3, 4]);
        assert_eq!(draw_rows(5, 0, &mut rng), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn training_bags_change_per_epoch_and_evaluation_bags_do_not() {
        let s = stage(5);
        let train = bag(Split::Train, 40);
        let e0 = s.draw(&train, 0).unwrap();
        assert_eq!(e0.num_rows(), 5);
        assert_eq!(
            xs(&e0),
            xs(&s.draw(&train, 0).unwrap()),
            "same epoch, same bag"
        );
        assert_ne!(
            xs(&e0),
            xs(&s.draw(&train, 1).unwrap()),
            "new epoch, new bag"
        );
        let test = bag(Split::Test, 40);
        assert_eq!(
            xs(&s.draw(&test, 0).unwrap()),
            xs(&s.draw(&test, 7).unwrap())
        );
    }

    #[test]
    fn bags_carry_split_label_and_grid_step_in_the_declared_schema() {
        let s = stage(3);
        let b = bag(Split::Val, 10);
        let out = s.draw(&b, 0).unwrap();
        let declared = SampleParams::default()
            .output_schema(std::slice::from_ref(&b.tiles.schema))
            .unwrap();
        assert_eq!(out.schema().fields(), declared.fields());
        let split = out.column_by_name("split").unwrap().as_string::<i32>();
        assert!(split.iter().all(|v| v == Some("val")));
        let label = out.column_by_name("label").unwrap().as_string::<i32>();
        assert!(label.iter().all(|v| v == Some("tumor")));
        let step = out
            .column_by_name(GRID_STEP)
            .unwrap()
            .as_primitive::<Int64Type>();
        assert!(step.values().iter().all(|&v| v == 256));
    }

    #[test]
    fn pixels_and_stale_split_columns_are_dropped() {
        let mut fields = tessera_pipeline::schema::embeddings_schema(4, false)
            .fields()
            .to_vec();
        fields.push(Arc::new(Field::new(PIXELS, DataType::Binary, false)));
        fields.push(Arc::new(Field::new("split", DataType::Utf8, false)));
        let out = sample_schema(&Schema::new(fields));
        let names: Vec<&str> = out.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            [
                "slide_id",
                "x",
                "y",
                "tile_size",
                "embedding",
                "split",
                "label",
                GRID_STEP
            ]
        );
    }

    #[test]
    fn pixels_are_kept_without_embeddings_and_neither_is_an_error() {
        let mut fields = tessera_pipeline::schema::tile_key_fields();
        fields.push(Field::new(PIXELS, DataType::Binary, false));
        fields.push(Field::new(PIXELS_SIZE, DataType::Int32, false));
        let tiles = Arc::new(Schema::new(fields.clone()));
        let out = SampleParams::default().output_schema(&[tiles]).unwrap();
        assert!(out.field_with_name(PIXELS).is_ok());
        assert!(out.field_with_name(PIXELS_SIZE).is_ok());
        let keys = Arc::new(Schema::new(tessera_pipeline::schema::tile_key_fields()));
        let err = SampleParams::default()
            .output_schema(&[keys])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("embedding")
                && err.contains("pixels")
                && err.contains("finetune_embedder"),
            "{err}"
        );
    }

    /// The bag `draw` made before per-slide constants were folded: the drawn rows of the whole
    /// table, then split, label and grid step.
    fn reference_draw(
        s: &SampleStage,
        table: &RecordBatch,
        split: Split,
        epoch: u64,
    ) -> RecordBatch {
        let epoch_part = (split == Split::Train).then_some(epoch);
        let mut rng = stream_rng(s.seed, "sample", epoch_part, "s1");
        let rows = draw_rows(table.num_rows(), s.tiles_for(split), &mut rng);
        let n = rows.len();
        let taken = take_record_batch(table, &UInt32Array::from(rows)).unwrap();
        let mut columns = taken.columns().to_vec();
        columns.push(Arc::new(StringArray::from(vec![split.as_str(); n])));
        columns.push(Arc::new(StringArray::from(vec!["tumor"; n])));
        columns.push(Arc::new(Int64Array::from(vec![256i64; n])));
        RecordBatch::try_new(sample_schema(&table.schema()), columns).unwrap()
    }

    #[test]
    fn per_slide_constants_are_kept_once_and_bags_are_unchanged() {
        let coords: Vec<(i64, i64)> = (0..40i64).map(|k| (k * 256, (k % 3) * 256)).collect();
        let table = tile_bag(&coords, 256);
        let tiles = SlideTiles::new(table.clone()).unwrap();
        let varying = tiles.varying.schema();
        let names: Vec<&str> = varying.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            ["x", "y", "embedding"],
            "slide_id and tile_size are per slide"
        );
        assert!(tiles.constants.iter().all(|(_, one)| one.len() == 1));
        let mut s = stage(7);
        let mut packed = SlideTiles::new(table.clone()).unwrap();
        packed.varying = s.slab.pack_batch(&packed.varying).unwrap();
        for (split, epoch) in [(Split::Train, 0), (Split::Train, 3), (Split::Test, 1)] {
            let b = Bag {
                tiles: SlideTiles::new(table.clone()).unwrap(),
                ..bag(split, 0)
            };
            let want = reference_draw(&s, &table, split, epoch);
            assert_eq!(s.draw(&b, epoch).unwrap(), want);
            let b = Bag {
                tiles: packed.clone(),
                ..bag(split, 0)
            };
            let got = s.draw(&b, epoch).unwrap();
            assert_eq!(got, want);
            for (g, w) in got.columns().iter().zip(want.columns()) {
                assert_eq!(g.to_data(), w.to_data(), "same buffers, same null bitmaps");
            }
        }
    }

    #[test]
    fn columns_that_vary_or_hold_nulls_are_kept_per_tile() {
        let coords: Vec<(i64, i64)> = (0..6i64).map(|k| (k * 256, 0)).collect();
        let table = tile_bag(&coords, 256);
        let mut columns = table.columns().to_vec();
        // tile_size varies within the slide; slide_id has a null.
        columns[3] = Arc::new(Int64Array::from(vec![256, 256, 512, 256, 256, 256]));
        columns[0] = Arc::new(StringArray::from(vec![
            Some("s"),
            None,
            Some("s"),
            Some("s"),
            Some("s"),
            Some("s"),
        ]));
        let mut fields: Vec<Field> = table
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields[0] = fields[0].clone().with_nullable(true);
        let table = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        let tiles = SlideTiles::new(table.clone()).unwrap();
        let folded: Vec<usize> = tiles.constants.iter().map(|(p, _)| *p).collect();
        assert_eq!(folded, [2], "only y, 0 on every tile");
        let rows = [1u32, 2, 5];
        let want = take_record_batch(&table, &UInt32Array::from(rows.to_vec())).unwrap();
        assert_eq!(tiles.take(&rows).unwrap(), want.columns());
        // One tile: nothing to fold.
        let one = SlideTiles::new(table.slice(0, 1)).unwrap();
        assert!(one.constants.is_empty());
        assert_eq!(one.take(&[0]).unwrap(), table.slice(0, 1).columns());
    }

    #[test]
    fn params_validation_names_the_nested_field() {
        let p = SampleParams {
            splits: SplitParams {
                folds: 3,
                fold: 5,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(p.validate().unwrap_err().field, "splits.fold");
    }
}
