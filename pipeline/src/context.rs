//! What a running stage uses to emit rows, end slides and epochs, report warnings and see the
//! run's settings. It also writes the stage's cache entries as rows go by.

use crate::cache::{Cache, PendingEntry};
use crate::claim::{claim_path, ClaimSet};
use crate::error::{StageError, StageResult};
use crate::graph::Graph;
use crate::message::{send_or_stop, Envelope, Message, Sent};
use crate::plan::{Plan, SlideState};
use crate::report::{ErrorRecord, StageStats};
use crate::schema::check_emitted;
use crate::slide::SlideHandle;
use crate::stage::{BuildContext, DeviceSpec};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use crossbeam_channel::Sender;
use indicatif::ProgressBar;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One outgoing edge: the consumer's inbox and which of its inputs this edge is.
pub(crate) struct Edge {
    pub sender: Sender<Envelope>,
    pub input_index: usize,
    pub consumer: usize,
    pub alive: bool,
}

/// How a cached stage persists its output.
pub(crate) struct StageCache {
    pub cache: Cache,
    pub kind: String,
    /// Key per slide (dataset index).
    pub keys: Vec<Option<String>>,
    /// The schema written to Parquet (output schema minus uncached columns).
    pub schema: SchemaRef,
    pub uncached: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// The run's claims: an entry's claim is given up once it is written or abandoned.
    pub claims: Arc<ClaimSet>,
}

impl StageCache {
    /// How stage `i` of `graph` writes its cache entries in this run: the persisted columns
    /// (output schema minus uncached ones), the keys per slide and the files' metadata.
    pub(crate) fn for_stage(
        graph: &Graph,
        i: usize,
        cache: &Cache,
        plan: &Plan,
        claims: Arc<ClaimSet>,
    ) -> StageCache {
        let s = &graph.stages[i];
        let uncached = s.stage.uncached_columns();
        let fields: Vec<_> = s
            .output_schema
            .fields()
            .iter()
            .filter(|f| !uncached.contains(f.name()))
            .cloned()
            .collect();
        let mut metadata = BTreeMap::new();
        metadata.insert("tessera.stage".to_string(), s.name.clone());
        metadata.insert("tessera.kind".to_string(), s.kind.clone());
        metadata.insert("tessera.version".to_string(), s.version.clone());
        metadata.insert(
            "tessera.params".to_string(),
            serde_json::to_string(&s.stage.canonical_params()).unwrap_or_default(),
        );
        StageCache {
            cache: cache.clone(),
            kind: s.kind.clone(),
            keys: plan.keys[i].clone(),
            schema: Arc::new(Schema::new(fields)),
            uncached,
            metadata,
            claims,
        }
    }

    /// Gives up this run's claim on the slide's entry, if it holds one.
    fn release_claim(&self, slide: usize) {
        if let Some(Some(key)) = self.keys.get(slide) {
            self.claims
                .release(&claim_path(&self.cache.entry_path(&self.kind, key)));
        }
    }
}

/// State shared by every worker of one stage.
pub(crate) struct StageShared {
    pub index: usize,
    pub name: String,
    /// The output schema the stage declared (checked by the graph against its consumers);
    /// every emitted batch must fit it.
    pub output_schema: SchemaRef,
    pub stats: StageStats,
    pub errors: Mutex<Vec<ErrorRecord>>,
    pub warnings: Mutex<Vec<ErrorRecord>>,
    pub details: Mutex<serde_json::Map<String, serde_json::Value>>,
    pub progress: ProgressBar,
    pub cache: Option<StageCache>,
    /// Work items (tiles) this stage has done, for the message next to its bar.
    pub items: crate::items::DoneItems,
}

/// State shared by the whole run.
pub(crate) struct RunShared {
    pub cancel: Arc<AtomicBool>,
    pub plan: Arc<Plan>,
    /// Work items planned in the run, per unit (see [`StageContext::plan_items`]).
    pub items: crate::items::PlannedItems,
}

/// A running stage's handle on the run. One per worker.
pub struct StageContext {
    pub(crate) shared: Arc<StageShared>,
    pub(crate) run: Arc<RunShared>,
    pub(crate) outputs: Vec<Edge>,
    pub(crate) pending: HashMap<usize, PendingEntry>,
    pub(crate) build: BuildContext,
    pub(crate) inputs_closed: bool,
}

impl StageContext {
    /// Sends rows about `slide` downstream (and into the cache when the stage is cached).
    /// Returns `StageError::Stopped` when the run is stopping or nobody consumes any more, and
    /// `StageError::Undeclared` when the batch lacks a declared column or has it with another
    /// type than the stage's declared output schema.
    pub fn emit(&mut self, slide: &SlideHandle, batch: RecordBatch) -> StageResult {
        if self.is_cancelled() {
            return Err(StageError::Stopped);
        }
        check_emitted(&self.shared.output_schema, &batch.schema()).map_err(|mismatch| {
            StageError::Undeclared {
                stage: self.shared.name.clone(),
                mismatch,
            }
        })?;
        self.shared.stats.add_rows_out(batch.num_rows());
        self.write_cache(slide, Some(&batch))?;
        self.send_to_needing(
            slide,
            Message::Batch {
                slide: slide.clone(),
                batch,
            },
        )
    }

    /// Declares that every row about `slide` has been emitted: completes its cache entry
    /// (an empty table when the slide produced no rows) and tells the consumers.
    pub fn end_slide(&mut self, slide: &SlideHandle) -> StageResult {
        if self.is_cancelled() {
            return Err(StageError::Stopped);
        }
        self.write_cache(slide, None)?;
        if let Some(entry) = self.pending.remove(&slide.index) {
            let finished = entry.finish();
            if let Some(cache) = self.shared.cache.as_ref() {
                cache.release_claim(slide.index);
            }
            finished.map_err(|e| StageError::other("completing the cache entry", e))?;
            self.shared.stats.add_cache_miss();
        }
        self.shared.stats.add_item_out();
        self.shared.progress.inc(1);
        self.send_to_needing(
            slide,
            Message::SlideEnd {
                slide: slide.clone(),
            },
        )
    }

    /// Tells the engine this stage wants no more input (a training loop that reached its last
    /// epoch while upstream keeps re-sampling): the engine closes the stage's inbox, upstream
    /// stages see their consumer gone and stop, and `finish` is called next.
    pub fn close_inputs(&mut self) {
        self.inputs_closed = true;
    }

    /// Marks the end of a training epoch for every consumer.
    pub fn end_epoch(&mut self, epoch: u64) -> StageResult {
        self.broadcast(Message::EndOfEpoch { epoch })
    }

    /// True once the run is stopping: long loops inside a callback should return
    /// `Err(StageError::Stopped)` soon after.
    pub fn is_cancelled(&self) -> bool {
        self.run.cancel.load(Ordering::Relaxed)
    }

    /// Records a warning about a slide (e.g. "no tissue found"); listed in run.json.
    pub fn warn(&self, slide: Option<&SlideHandle>, message: impl Into<String>) {
        self.record_warning(slide, message.into(), false);
    }

    /// A warning that the run's closing line repeats (and a sweep's summary lists): the
    /// results of this run cannot be trusted as they are, e.g. training that learned nothing.
    pub fn alert(&self, message: impl Into<String>) {
        self.record_warning(None, message.into(), true);
    }

    /// Records `value` under `key` in this stage's `details` in run.json (a later call with
    /// the same key replaces it).
    pub fn set_detail(&self, key: impl Into<String>, value: serde_json::Value) {
        if let Ok(mut d) = self.shared.details.lock() {
            d.insert(key.into(), value);
        }
    }

    fn record_warning(&self, slide: Option<&SlideHandle>, message: String, alert: bool) {
        match slide {
            Some(s) => tracing::warn!(stage = %self.shared.name, slide = %s.id, "{message}"),
            None => tracing::warn!(stage = %self.shared.name, "{message}"),
        }
        if let Ok(mut w) = self.shared.warnings.lock() {
            w.push(ErrorRecord {
                stage: self.shared.name.clone(),
                slide: slide.map(|s| s.id.clone()),
                message,
                alert,
            });
        }
    }

    /// Sets the length of the stage's progress bar (it defaults to the number of slides).
    pub fn set_progress_len(&self, len: u64) {
        self.shared.progress.set_length(len);
    }

    /// Advances the stage's progress bar.
    pub fn inc_progress(&self, delta: u64) {
        self.shared.progress.inc(delta);
    }

    /// Adds `n` items of `unit` (e.g. `"tiles"`) to the run's plan, as soon as they are known
    /// (the tiling stage, once a slide's tissue is found): stages counting the same unit with
    /// [`StageContext::items_done`] show done / planned, their rate and the time left.
    pub fn plan_items(&self, unit: &str, n: u64) {
        let planned = self.run.items.add(unit, n);
        let done = self.shared.items.done();
        let secs = self.shared.items.elapsed();
        self.shared
            .progress
            .set_message(crate::items::render(unit, done, planned, secs));
    }

    /// Counts `n` items of `unit` done by this stage, and shows `done/planned unit · rate ·
    /// ETA` next to its progress bar (which counts slides).
    pub fn items_done(&self, unit: &str, n: u64) {
        let (done, secs) = self.shared.items.add(n);
        let planned = self.run.items.get(unit);
        self.shared
            .progress
            .set_message(crate::items::render(unit, done, planned, secs));
    }

    /// Shows a short status next to the stage's progress bar (e.g. the current loss).
    pub fn set_progress_message(&self, message: impl Into<String>) {
        self.shared.progress.set_message(message.into());
    }

    pub fn stage_name(&self) -> &str {
        &self.shared.name
    }
    pub fn seed(&self) -> u64 {
        self.build.seed
    }
    pub fn device(&self) -> &DeviceSpec {
        &self.build.device
    }
    pub fn out_dir(&self) -> &Path {
        &self.build.out_dir
    }
    /// Every slide of the dataset.
    pub fn slides(&self) -> &[SlideHandle] {
        &self.build.slides
    }
    pub fn build_context(&self) -> &BuildContext {
        &self.build
    }
    /// Whether this run has the stage compute `slide` (rather than replay or skip it): a
    /// source reading many slides from one file keeps only the slides it will be asked for.
    pub fn computes(&self, slide: &SlideHandle) -> bool {
        self.run.plan.state(self.shared.index, slide.index) == SlideState::Compute
    }

    /// Drops what was written to the cache for a failed slide and tells consumers.
    pub(crate) fn abort_slide(&mut self, slide: &SlideHandle) {
        self.pending.remove(&slide.index);
        if let Some(cache) = self.shared.cache.as_ref() {
            cache.release_claim(slide.index);
        }
        let _ = self.send_to_needing(
            slide,
            Message::SlideFailed {
                slide: slide.clone(),
            },
        );
    }

    fn write_cache(&mut self, slide: &SlideHandle, batch: Option<&RecordBatch>) -> StageResult {
        let Some(cache) = self.shared.cache.as_ref() else {
            return Ok(());
        };
        if self.run.plan.state(self.shared.index, slide.index) != SlideState::Compute {
            return Ok(());
        }
        let Some(Some(key)) = cache.keys.get(slide.index) else {
            return Ok(());
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = self.pending.entry(slide.index) {
            let mut metadata = cache.metadata.clone();
            metadata.insert("tessera.slide_id".into(), slide.id.clone());
            let entry = cache
                .cache
                .begin(&cache.kind, key, cache.schema.clone(), metadata)
                .map_err(|e| StageError::other("starting a cache entry", e))?;
            slot.insert(entry);
        }
        if let (Some(batch), Some(entry)) = (batch, self.pending.get_mut(&slide.index)) {
            let projected = project(batch, &cache.schema, &cache.uncached)?;
            entry
                .write(&projected)
                .map_err(|e| StageError::other("writing the cache entry", e))?;
        }
        Ok(())
    }

    fn send_to_needing(&mut self, slide: &SlideHandle, message: Message) -> StageResult {
        let plan = self.run.plan.clone();
        let wanted: Vec<bool> = self
            .outputs
            .iter()
            .map(|e| plan.state(e.consumer, slide.index) == SlideState::Compute)
            .collect();
        self.send_where(message, &wanted)
    }

    fn broadcast(&mut self, message: Message) -> StageResult {
        let wanted = vec![true; self.outputs.len()];
        self.send_where(message, &wanted)
    }

    fn send_where(&mut self, message: Message, wanted: &[bool]) -> StageResult {
        if self.outputs.is_empty() {
            return Ok(());
        }
        let cancel = self.run.cancel.clone();
        for (edge, want) in self.outputs.iter_mut().zip(wanted) {
            if !*want || !edge.alive {
                continue;
            }
            let envelope = (edge.input_index, message.clone());
            match send_or_stop(&edge.sender, envelope, &cancel) {
                Sent::Delivered => {}
                Sent::Stopped => return Err(StageError::Stopped),
                Sent::Disconnected => edge.alive = false,
            }
        }
        if self.outputs.iter().all(|e| !e.alive) {
            return Err(StageError::Stopped);
        }
        Ok(())
    }
}

/// Keeps the persisted columns of a batch, in the cache schema's order.
fn project(
    batch: &RecordBatch,
    schema: &SchemaRef,
    uncached: &[String],
) -> StageResult<RecordBatch> {
    if uncached.is_empty() && batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            batch.column_by_name(f.name()).cloned().ok_or_else(|| {
                StageError::msg(format!(
                    "emitted batch lacks declared column `{}`",
                    f.name()
                ))
            })
        })
        .collect::<StageResult<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

#[cfg(test)]
mod tests {
    use crate::error::StageResult;
    use crate::schema::InputSpec;
    use crate::slide::SlideHandle;
    use crate::stage::{BuildContext, Stage, StageKind};
    use crate::testing::{test_slides, Harness};
    use crate::StageContext;
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use arrow::record_batch::RecordBatch;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use std::sync::Arc;

    /// Declares `slide_id, y: Int64` but passes its input (`slide_id, x`) through.
    #[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
    struct Liar {}

    impl StageKind for Liar {
        const KIND: &'static str = "liar";
        const VERSION: &'static str = "1";
        const ABOUT: &'static str = "emits other columns than it declares";
        fn input_spec(&self) -> InputSpec {
            InputSpec::Tables(vec![vec![]])
        }
        fn output_schema(&self, _: &[SchemaRef]) -> StageResult<SchemaRef> {
            Ok(Arc::new(Schema::new(vec![
                Field::new("slide_id", DataType::Utf8, false),
                Field::new("y", DataType::Int64, false),
            ])))
        }
        fn build(&self, _: &BuildContext) -> StageResult<Box<dyn Stage>> {
            Ok(Box::new(PassThrough))
        }
    }

    struct PassThrough;

    impl Stage for PassThrough {
        fn on_batch(
            &mut self,
            ctx: &mut StageContext,
            _: usize,
            slide: &SlideHandle,
            batch: RecordBatch,
        ) -> StageResult {
            ctx.emit(slide, batch)
        }
    }

    #[test]
    fn a_batch_without_a_declared_column_fails_naming_the_stage_and_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("slide_id", DataType::Utf8, false),
            Field::new("x", DataType::Int64, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec!["a"])),
            Arc::new(Int64Array::from(vec![1])),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
        let out = Harness::new(test_slides(&[("a", None, Some("l"))]), dir.path())
            .input(schema, vec![(0, batch)])
            .run(Liar {})
            .unwrap();
        assert!(out.batches.is_empty());
        let report = out.report.unwrap();
        let messages: Vec<&str> = report.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            vec!["stage `liar` emitted a batch that lacks declared column `y` (Int64)"]
        );
    }
}
