//! Per-batch overhead of the engine: a source emits N one-row batches, which cross 0, 1, 2 or 4
//! pass-through stages to a sink. Everything but the engine is free, so the time per batch
//! per edge is what a channel hop costs (send, receive, the stage callback dispatch,
//! counters). Prints a markdown table.
//!
//! `cargo bench -p tessera-pipeline --bench channel`

use arrow::array::{ArrayRef, Int64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;
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

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]))
}

/// Emits `batches` one-row batches for each slide.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
struct Source {
    batches: usize,
}

impl StageKind for Source {
    const KIND: &'static str = "bench_source";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str = "";
    fn input_spec(&self) -> InputSpec {
        InputSpec::Dataset
    }
    fn output_schema(&self, _: &[SchemaRef]) -> StageResult<SchemaRef> {
        Ok(schema())
    }
    fn build(&self, _: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(Box::new(self.clone()))
    }
    fn cacheable(&self) -> bool {
        false
    }
}

impl Stage for Source {
    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        let column: ArrayRef = Arc::new(Int64Array::from(vec![1]));
        let batch = RecordBatch::try_new(schema(), vec![column])?;
        for _ in 0..self.batches {
            ctx.emit(slide, batch.clone())?;
        }
        ctx.end_slide(slide)
    }
}

/// Re-emits every batch it receives (also serves as the sink: nothing reads its output).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
struct Pass {}

impl StageKind for Pass {
    const KIND: &'static str = "bench_pass";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str = "";
    fn input_spec(&self) -> InputSpec {
        InputSpec::Tables(vec![vec![Column::exact("x", DataType::Int64)]])
    }
    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        Ok(inputs[0].clone())
    }
    fn build(&self, _: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(Box::new(Pass {}))
    }
    fn cacheable(&self) -> bool {
        false
    }
}

impl Stage for Pass {
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

/// Seconds to push `batches` batches through `hops` pass-through stages and a sink.
fn time_chain(hops: usize, batches: usize, capacity: usize) -> f64 {
    let part = |name: String, stage, inputs: Vec<String>| StagePart {
        kind: name.clone(),
        name,
        version: "1".into(),
        stage,
        inputs,
        workers: 1,
        cache: false,
        on_error: ErrorPolicy::Fail,
    };
    let mut parts = vec![part(
        "source".into(),
        configure_typed(Source { batches }),
        vec![],
    )];
    let mut previous = "source".to_string();
    for i in 0..=hops {
        let name = if i == hops {
            "sink".to_string()
        } else {
            format!("pass{i}")
        };
        parts.push(part(
            name.clone(),
            configure_typed(Pass {}),
            vec![previous.clone()],
        ));
        previous = name;
    }
    let graph = Graph::from_parts(parts).expect("bench graph");
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = RunSettings {
        name: "bench".into(),
        seed: 0,
        device: DeviceSpec::Cpu,
        cache_dir: dir.path().join("cache"),
        out_dir: dir.path().join("out"),
        base_dir: dir.path().to_path_buf(),
        slides: test_slides(&[("s", None, None)]),
        task: Default::default(),
        channel_capacity: capacity,
        interrupt: None,
        progress: false,
        shard: None,
        claim_ttl: std::time::Duration::from_secs(600),
    };
    let t0 = Instant::now();
    let report = execute(&graph, &settings).expect("bench run");
    let seconds = t0.elapsed().as_secs_f64();
    assert_eq!(report.status, RunStatus::Ok);
    assert_eq!(
        report.stage("sink").map(|s| s.rows_in),
        Some(batches as u64)
    );
    seconds
}

fn main() {
    let batches: usize = std::env::var("BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let repeats = 3;
    println!(
        "{batches} one-row batches per run, best of {repeats}; {} CPUs\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| pass-through stages | edges | channel_capacity | total ms | µs / batch | µs / batch / edge |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for capacity in [4, 64] {
        for hops in [0, 1, 2, 4] {
            let edges = hops + 1;
            let best = (0..repeats)
                .map(|_| time_chain(hops, batches, capacity))
                .fold(f64::INFINITY, f64::min);
            let per_batch = best * 1e6 / batches as f64;
            println!(
                "| {hops} | {edges} | {capacity} | {:.1} | {per_batch:.2} | {:.2} |",
                best * 1e3,
                per_batch / edges as f64
            );
        }
    }
}
