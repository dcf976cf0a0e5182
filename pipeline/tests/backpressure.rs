//! Bounded channels give backpressure: a fast producer feeding a slow consumer blocks once the
//! channel is full, so the batches in flight — and the memory they hold — never exceed the
//! channel capacity, whatever the number of batches.

use arrow::array::{ArrayRef, BinaryArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tessera_pipeline::config::ErrorPolicy;
use tessera_pipeline::graph::{Graph, StagePart};
use tessera_pipeline::registry::configure_typed;
use tessera_pipeline::runner::execute;
use tessera_pipeline::settings::RunSettings;
use tessera_pipeline::testing::test_slides;
use tessera_pipeline::{
    BuildContext, Column, DeviceSpec, InputSpec, RunStatus, SlideHandle, Stage, StageContext,
    StageKind, StageResult,
};

/// Counters shared by the producer and the consumer of one run.
#[derive(Default)]
struct Counters {
    emitted: AtomicI64,
    consumed: AtomicI64,
    /// Largest `emitted - consumed` the producer saw after an emit returned.
    max_in_flight: AtomicI64,
}

/// The counters of the run in progress, looked up by the stages (tests in this file run one
/// pipeline each; the lock keeps them from sharing counters).
static CURRENT: Mutex<Option<Arc<Counters>>> = Mutex::new(None);
static SERIAL: Mutex<()> = Mutex::new(());

fn counters() -> Arc<Counters> {
    CURRENT
        .lock()
        .unwrap()
        .clone()
        .expect("counters set by the test")
}

fn payload_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "payload",
        DataType::Binary,
        false,
    )]))
}

/// A source emitting `batches` batches of `bytes` bytes per slide, as fast as it may.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct FastProducer {
    batches: usize,
    bytes: usize,
}

struct Producer(FastProducer, Arc<Counters>);

impl StageKind for FastProducer {
    const KIND: &'static str = "fast_producer";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str = "test source";
    fn input_spec(&self) -> InputSpec {
        InputSpec::Dataset
    }
    fn output_schema(&self, _: &[SchemaRef]) -> StageResult<SchemaRef> {
        Ok(payload_schema())
    }
    fn build(&self, _: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(Box::new(Producer(self.clone(), counters())))
    }
    fn cacheable(&self) -> bool {
        false
    }
}

impl Stage for Producer {
    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        let column: ArrayRef = Arc::new(BinaryArray::from_iter_values([vec![7u8; self.0.bytes]]));
        let batch = RecordBatch::try_new(payload_schema(), vec![column])?;
        let c = &self.1;
        for _ in 0..self.0.batches {
            ctx.emit(slide, batch.clone())?;
            let in_flight =
                c.emitted.fetch_add(1, Ordering::SeqCst) + 1 - c.consumed.load(Ordering::SeqCst);
            c.max_in_flight.fetch_max(in_flight, Ordering::SeqCst);
        }
        ctx.end_slide(slide)
    }
}

/// A sink taking `sleep_ms` per batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct SlowConsumer {
    sleep_ms: u64,
}

struct Consumer(SlowConsumer, Arc<Counters>);

impl StageKind for SlowConsumer {
    const KIND: &'static str = "slow_consumer";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str = "test sink";
    fn input_spec(&self) -> InputSpec {
        InputSpec::Tables(vec![vec![Column::exact("payload", DataType::Binary)]])
    }
    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        Ok(inputs[0].clone())
    }
    fn build(&self, _: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(Box::new(Consumer(self.clone(), counters())))
    }
    fn cacheable(&self) -> bool {
        false
    }
}

impl Stage for Consumer {
    fn on_batch(
        &mut self,
        _: &mut StageContext,
        _: usize,
        _: &SlideHandle,
        _: RecordBatch,
    ) -> StageResult {
        self.1.consumed.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(self.0.sleep_ms));
        Ok(())
    }
}

/// Runs producer -> consumer with `capacity`; returns (max batches in flight, batches consumed).
fn run(capacity: usize, slides: usize, batches: usize) -> (i64, i64) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Arc::new(Counters::default());
    *CURRENT.lock().unwrap() = Some(c.clone());
    let part = |name: &str, kind: &str, stage, inputs: Vec<String>| StagePart {
        name: name.into(),
        kind: kind.into(),
        version: "1".into(),
        stage,
        inputs,
        workers: 1,
        cache: false,
        on_error: ErrorPolicy::Fail,
    };
    let graph = Graph::from_parts(vec![
        part(
            "producer",
            FastProducer::KIND,
            configure_typed(FastProducer {
                batches,
                bytes: 4096,
            }),
            vec![],
        ),
        part(
            "consumer",
            SlowConsumer::KIND,
            configure_typed(SlowConsumer { sleep_ms: 2 }),
            vec!["producer".into()],
        ),
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..slides).map(|i| format!("s{i}")).collect();
    let specs: Vec<(&str, Option<&str>, Option<&str>)> =
        ids.iter().map(|s| (s.as_str(), None, None)).collect();
    let settings = RunSettings {
        name: "backpressure".into(),
        seed: 0,
        device: DeviceSpec::Cpu,
        cache_dir: dir.path().join("cache"),
        out_dir: dir.path().join("out"),
        base_dir: dir.path().to_path_buf(),
        slides: test_slides(&specs),
        task: Default::default(),
        channel_capacity: capacity,
        interrupt: None,
        progress: false,
        shard: None,
        claim_ttl: std::time::Duration::from_secs(600),
    };
    let report = execute(&graph, &settings).unwrap();
    assert_eq!(report.status, RunStatus::Ok, "{report:?}");
    assert_eq!(
        report.stage("consumer").unwrap().rows_in as usize,
        slides * batches
    );
    (
        c.max_in_flight.load(Ordering::SeqCst),
        c.consumed.load(Ordering::SeqCst),
    )
}

#[test]
fn a_fast_producer_blocks_on_a_full_channel() {
    for capacity in [1, 4, 16] {
        let (max_in_flight, consumed) = run(capacity, 2, 60);
        assert_eq!(consumed, 120);
        // The channel holds `capacity` messages; one more may sit between the consumer's
        // receive and its count. Never more, however many batches the producer has.
        assert!(
            max_in_flight <= capacity as i64 + 1,
            "capacity {capacity}: {max_in_flight} batches were emitted but not consumed"
        );
        // ... and the producer did run ahead until the channel was full (it was not just slow).
        assert!(
            max_in_flight >= capacity as i64,
            "capacity {capacity}: only {max_in_flight} in flight"
        );
    }
}
