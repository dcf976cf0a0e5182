//! Runs one stage through the real engine without a YAML file: feeds it tables, collects what
//! it emits. For the tests of stage crates (built-in or a user's).

use crate::config::ErrorPolicy;
use crate::context::StageContext;
use crate::error::StageResult;
use crate::graph::{Graph, StagePart};
use crate::registry::ConfiguredStage;
use crate::report::RunReport;
use crate::runner::execute;
use crate::schema::InputSpec;
use crate::settings::RunSettings;
use crate::slide::{Slide, SlideHandle};
use crate::stage::{BuildContext, DeviceSpec, Stage, StageKind};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Slides for tests: (id, path, label).
pub fn test_slides(specs: &[(&str, Option<&str>, Option<&str>)]) -> Vec<SlideHandle> {
    specs
        .iter()
        .enumerate()
        .map(|(index, (id, path, label))| {
            Arc::new(Slide {
                index,
                id: id.to_string(),
                path: path.map(PathBuf::from),
                label: label.map(str::to_string),
                split: None,
                case_id: None,
                mpp: None,
                extra: Default::default(),
            })
        })
        .collect()
}

/// A one-stage run: inputs fed per slide, outputs collected.
pub struct Harness {
    pub slides: Vec<SlideHandle>,
    /// Per input of the stage under test: its schema and (slide index, batch) pairs.
    pub inputs: Vec<(SchemaRef, Vec<(usize, RecordBatch)>)>,
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub seed: u64,
    /// Cache the stage's output (`cache: true`).
    pub cache: bool,
    pub workers: usize,
    /// Close the stage's output after this many epochs (for stages that loop forever).
    pub epochs: Option<u64>,
    pub channel_capacity: usize,
    /// The experiment's task (classification unless a test says otherwise).
    pub task: crate::task::Task,
}

/// What the stage emitted.
#[derive(Debug, Default)]
pub struct HarnessOutput {
    /// (slide id, batch), in arrival order.
    pub batches: Vec<(String, RecordBatch)>,
    /// Slide ids whose end was signalled, in order.
    pub ended: Vec<String>,
    /// Epoch markers seen.
    pub epochs: Vec<u64>,
    pub report: Option<RunReport>,
}

impl HarnessOutput {
    /// Total rows emitted for a slide.
    pub fn rows_of(&self, slide_id: &str) -> usize {
        self.batches
            .iter()
            .filter(|(s, _)| s == slide_id)
            .map(|(_, b)| b.num_rows())
            .sum()
    }
}

impl Harness {
    /// A harness writing under `dir` (output and cache folders inside it).
    pub fn new(slides: Vec<SlideHandle>, dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Harness {
            slides,
            inputs: Vec::new(),
            out_dir: dir.join("out"),
            cache_dir: dir.join("cache"),
            seed: 0,
            cache: false,
            workers: 1,
            epochs: None,
            channel_capacity: 4,
            task: crate::task::Task::Classification,
        }
    }

    /// Adds an input table.
    pub fn input(mut self, schema: SchemaRef, batches: Vec<(usize, RecordBatch)>) -> Self {
        self.inputs.push((schema, batches));
        self
    }

    /// Runs `params` as the stage under test.
    pub fn run<K: StageKind>(&self, params: K) -> Result<HarnessOutput, String> {
        let configured = crate::registry::configure_typed(params);
        let collected = Arc::new(Mutex::new(HarnessOutput::default()));
        let mut parts = Vec::new();
        let mut input_names = Vec::new();
        for (i, (schema, batches)) in self.inputs.iter().enumerate() {
            let name = format!("input{i}");
            parts.push(part(
                &name,
                Arc::new(Feed {
                    schema: schema.clone(),
                    batches: batches.clone(),
                }),
                vec![],
                false,
                1,
            ));
            input_names.push(name);
        }
        parts.push(part(
            K::KIND,
            configured,
            input_names,
            self.cache,
            self.workers,
        ));
        parts.push(part(
            "collect",
            Arc::new(Collect {
                sink: collected.clone(),
                epochs: self.epochs,
            }),
            vec![K::KIND.to_string()],
            false,
            1,
        ));
        let graph = Graph::from_parts_in(parts, &self.out_dir).map_err(|e| e.to_string())?;
        let settings = RunSettings {
            name: "harness".into(),
            seed: self.seed,
            device: DeviceSpec::Cpu,
            cache_dir: self.cache_dir.clone(),
            out_dir: self.out_dir.clone(),
            base_dir: self.out_dir.clone(),
            slides: self.slides.clone(),
            task: self.task,
            channel_capacity: self.channel_capacity,
            interrupt: None,
            progress: false,
            shard: None,
            claim_ttl: std::time::Duration::from_secs(600),
        };
        let report = execute(&graph, &settings).map_err(|e| e.to_string())?;
        let mut out = std::mem::take(&mut *collected.lock().map_err(|e| e.to_string())?);
        out.report = Some(report);
        Ok(out)
    }
}

fn part(
    name: &str,
    stage: Arc<dyn ConfiguredStage>,
    inputs: Vec<String>,
    cache: bool,
    workers: usize,
) -> StagePart {
    StagePart {
        name: name.to_string(),
        kind: name.to_string(),
        version: "test".into(),
        stage,
        inputs,
        workers,
        cache,
        on_error: ErrorPolicy::Skip,
    }
}

/// A source replaying fixed batches per slide.
struct Feed {
    schema: SchemaRef,
    batches: Vec<(usize, RecordBatch)>,
}

impl ConfiguredStage for Feed {
    fn canonical_params(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn input_spec(&self) -> InputSpec {
        InputSpec::Dataset
    }
    fn output_schema(&self, _: &[SchemaRef], _: &std::path::Path) -> StageResult<SchemaRef> {
        Ok(self.schema.clone())
    }
    fn cache_salt(&self, _: &BuildContext) -> StageResult<String> {
        Ok(String::new())
    }
    fn uncached_columns(&self) -> Vec<String> {
        Vec::new()
    }
    fn parallel(&self) -> bool {
        false
    }
    fn cacheable(&self) -> bool {
        true
    }
    fn build(&self, _: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(Box::new(FeedRun {
            batches: self.batches.clone(),
        }))
    }
}

struct FeedRun {
    batches: Vec<(usize, RecordBatch)>,
}

impl Stage for FeedRun {
    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        for (_, batch) in self.batches.iter().filter(|(i, _)| *i == slide.index) {
            ctx.emit(slide, batch.clone())?;
        }
        ctx.end_slide(slide)
    }
}

/// A sink recording everything it receives.
struct Collect {
    sink: Arc<Mutex<HarnessOutput>>,
    epochs: Option<u64>,
}

impl ConfiguredStage for Collect {
    fn canonical_params(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn input_spec(&self) -> InputSpec {
        InputSpec::Tables(vec![vec![]])
    }
    fn output_schema(&self, inputs: &[SchemaRef], _: &std::path::Path) -> StageResult<SchemaRef> {
        Ok(inputs[0].clone())
    }
    fn cache_salt(&self, _: &BuildContext) -> StageResult<String> {
        Ok(String::new())
    }
    fn uncached_columns(&self) -> Vec<String> {
        Vec::new()
    }
    fn parallel(&self) -> bool {
        false
    }
    fn cacheable(&self) -> bool {
        false
    }
    fn build(&self, _: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(Box::new(CollectRun {
            sink: self.sink.clone(),
            epochs: self.epochs,
        }))
    }
}

struct CollectRun {
    sink: Arc<Mutex<HarnessOutput>>,
    epochs: Option<u64>,
}

impl Stage for CollectRun {
    fn on_batch(
        &mut self,
        _: &mut StageContext,
        _: usize,
        slide: &SlideHandle,
        batch: RecordBatch,
    ) -> StageResult {
        if let Ok(mut s) = self.sink.lock() {
            s.batches.push((slide.id.clone(), batch));
        }
        Ok(())
    }
    fn on_slide_end(&mut self, _: &mut StageContext, _: usize, slide: &SlideHandle) -> StageResult {
        if let Ok(mut s) = self.sink.lock() {
            s.ended.push(slide.id.clone());
        }
        Ok(())
    }
    fn on_epoch_end(&mut self, ctx: &mut StageContext, epoch: u64) -> StageResult {
        let seen = self.sink.lock().map(|mut s| {
            s.epochs.push(epoch);
            s.epochs.len() as u64
        });
        if let (Ok(seen), Some(max)) = (seen, self.epochs) {
            if seen >= max {
                ctx.close_inputs();
            }
        }
        Ok(())
    }
}
