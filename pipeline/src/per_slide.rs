//! The per-slide stage shape: a stage that needs one slide's whole table at once (a sparse map,
//! an augmentation, a bag to sample from, a heatmap) implements [`PerSlide`] and is wrapped in
//! [`PerSlideStage`], which does the engine-facing part every such stage used to hand-roll:
//! holding the slide's batches until its end, concatenating them, forgetting a failed slide's
//! rows, and ending the slide downstream. As Vector offers function transforms next to task
//! transforms, this is the shape between a streaming [`Stage`] and a whole-run one.
//!
//! A per-slide stage reads one table, its input 0. Further inputs, when its kind declares any,
//! only sequence the run (the heatmap's second input makes it wait for training): their rows
//! and slide ends are dropped, but a slide failing on any input is forgotten.

use std::collections::HashMap;

use arrow::compute::concat_batches;
use arrow::record_batch::RecordBatch;

use crate::context::StageContext;
use crate::error::StageResult;
use crate::slide::SlideHandle;
use crate::stage::Stage;

/// What a [`PerSlide`] stage did with a slide's table.
#[derive(Debug, Clone)]
pub enum SlideOutput {
    /// Rows to emit for the slide (none is fine); the adapter emits them and ends the slide.
    Rows(Vec<RecordBatch>),
    /// The stage keeps the slide for later and ends it itself (`sample` emits it every epoch
    /// from `finish`; the heatmap waits for training): the adapter does not end it.
    Held,
}

/// A stage that processes one slide's whole table at a time. Wrap it in [`PerSlideStage`] (or
/// call [`per_slide`]) to get a [`Stage`].
pub trait PerSlide: Send {
    /// The part of an arriving batch worth holding until the slide ends (e.g. without the
    /// columns the stage drops anyway, so a slide's pixels are never held). Default: all of it.
    fn gather(&mut self, slide: &SlideHandle, batch: RecordBatch) -> StageResult<RecordBatch> {
        let _ = slide;
        Ok(batch)
    }

    /// Every row about `slide` has arrived: `table` holds them, in arrival order, or is `None`
    /// when the slide brought no row.
    fn process_slide(
        &mut self,
        ctx: &mut StageContext,
        slide: &SlideHandle,
        table: Option<RecordBatch>,
    ) -> StageResult<SlideOutput>;

    /// The slide failed (upstream, or in this stage): forget what the stage kept of it. The
    /// adapter has already dropped the rows it was holding.
    fn forget_slide(&mut self, slide: &SlideHandle) {
        let _ = slide;
    }

    /// An epoch ended upstream. The default forwards the marker.
    fn on_epoch_end(&mut self, ctx: &mut StageContext, epoch: u64) -> StageResult {
        ctx.end_epoch(epoch)
    }

    /// Every input is closed: emit whatever is held.
    fn finish(&mut self, ctx: &mut StageContext) -> StageResult {
        let _ = ctx;
        Ok(())
    }
}

/// The rows of the slides still arriving, by dataset index. Zero-row batches are not kept.
#[derive(Debug, Default)]
pub struct SlideTables {
    pending: HashMap<usize, Vec<RecordBatch>>,
}

impl SlideTables {
    /// Holds `batch` until `slide` ends.
    pub fn push(&mut self, slide: &SlideHandle, batch: RecordBatch) {
        let rows = self.pending.entry(slide.index).or_default();
        if batch.num_rows() > 0 {
            rows.push(batch);
        }
    }

    /// The slide's rows as one table (`None` without rows); the slide is no longer held.
    pub fn take(&mut self, slide: &SlideHandle) -> StageResult<Option<RecordBatch>> {
        let mut batches = self.pending.remove(&slide.index).unwrap_or_default();
        match batches.len() {
            0 => Ok(None),
            1 => Ok(batches.pop()),
            _ => Ok(Some(concat_batches(&batches[0].schema(), &batches)?)),
        }
    }

    /// Drops what is held of a failed slide.
    pub fn forget(&mut self, slide: &SlideHandle) {
        self.pending.remove(&slide.index);
    }

    /// Slides with rows still held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// The [`Stage`] of a [`PerSlide`] stage.
pub struct PerSlideStage<T> {
    inner: T,
    tables: SlideTables,
}

impl<T: PerSlide> PerSlideStage<T> {
    pub fn new(inner: T) -> Self {
        PerSlideStage {
            inner,
            tables: SlideTables::default(),
        }
    }

    /// The wrapped stage.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

/// `stage` as a boxed [`Stage`], for [`crate::StageKind::build`].
pub fn per_slide<T: PerSlide + 'static>(stage: T) -> Box<dyn Stage> {
    Box::new(PerSlideStage::new(stage))
}

impl<T: PerSlide> Stage for PerSlideStage<T> {
    fn on_batch(
        &mut self,
        _ctx: &mut StageContext,
        input: usize,
        slide: &SlideHandle,
        batch: RecordBatch,
    ) -> StageResult {
        if input == 0 {
            let kept = self.inner.gather(slide, batch)?;
            self.tables.push(slide, kept);
        }
        Ok(())
    }

    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        if input != 0 {
            return Ok(());
        }
        let table = self.tables.take(slide)?;
        match self.inner.process_slide(ctx, slide, table)? {
            SlideOutput::Rows(batches) => {
                for batch in batches {
                    ctx.emit(slide, batch)?;
                }
                ctx.end_slide(slide)
            }
            SlideOutput::Held => Ok(()),
        }
    }

    fn on_slide_failed(&mut self, _ctx: &mut StageContext, slide: &SlideHandle) {
        self.tables.forget(slide);
        self.inner.forget_slide(slide);
    }

    fn on_epoch_end(&mut self, ctx: &mut StageContext, epoch: u64) -> StageResult {
        self.inner.on_epoch_end(ctx, epoch)
    }

    fn finish(&mut self, ctx: &mut StageContext) -> StageResult {
        self.inner.finish(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::StageError;
    use crate::schema::InputSpec;
    use crate::stage::{BuildContext, StageKind};
    use crate::testing::{test_slides, Harness};
    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]))
    }

    fn batch(values: &[i64]) -> RecordBatch {
        RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(values.to_vec()))]).unwrap()
    }

    fn values(batch: &RecordBatch) -> Vec<i64> {
        let col = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        (0..col.len()).map(|i| col.value(i)).collect()
    }

    /// Emits each slide's table as one batch, its values summed; fails on a batch holding a
    /// negative value; holds every slide when `hold` (and emits them in `finish`).
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
    struct Summing {
        hold: bool,
    }

    struct SummingRun {
        hold: bool,
        held: Vec<(SlideHandle, Option<RecordBatch>)>,
    }

    impl StageKind for Summing {
        const KIND: &'static str = "summing";
        const VERSION: &'static str = "1";
        const ABOUT: &'static str = "test";
        fn input_spec(&self) -> InputSpec {
            InputSpec::Tables(vec![vec![]])
        }
        fn output_schema(&self, _: &[SchemaRef]) -> StageResult<SchemaRef> {
            Ok(schema())
        }
        fn build(&self, _: &BuildContext) -> StageResult<Box<dyn Stage>> {
            Ok(per_slide(SummingRun {
                hold: self.hold,
                held: Vec::new(),
            }))
        }
        fn parallel(&self) -> bool {
            false
        }
        fn cacheable(&self) -> bool {
            false
        }
    }

    fn sum(table: Option<&RecordBatch>) -> Vec<RecordBatch> {
        table
            .map(|t| vec![batch(&[values(t).iter().sum()])])
            .unwrap_or_default()
    }

    impl PerSlide for SummingRun {
        fn gather(&mut self, _: &SlideHandle, batch: RecordBatch) -> StageResult<RecordBatch> {
            if values(&batch).iter().any(|&v| v < 0) {
                return Err(StageError::msg("negative value"));
            }
            Ok(batch)
        }

        fn process_slide(
            &mut self,
            _ctx: &mut StageContext,
            slide: &SlideHandle,
            table: Option<RecordBatch>,
        ) -> StageResult<SlideOutput> {
            if self.hold {
                self.held.push((slide.clone(), table));
                return Ok(SlideOutput::Held);
            }
            Ok(SlideOutput::Rows(sum(table.as_ref())))
        }

        fn forget_slide(&mut self, slide: &SlideHandle) {
            self.held.retain(|(s, _)| s.index != slide.index);
        }

        fn finish(&mut self, ctx: &mut StageContext) -> StageResult {
            for (slide, table) in std::mem::take(&mut self.held) {
                for b in sum(table.as_ref()) {
                    ctx.emit(&slide, b)?;
                }
                ctx.end_slide(&slide)?;
            }
            Ok(())
        }
    }

    fn harness(dir: &std::path::Path) -> Harness {
        let slides = test_slides(&[
            ("a", None, None),
            ("empty", None, None),
            ("zero", None, None),
            ("bad", None, None),
        ]);
        Harness::new(slides, dir).input(
            schema(),
            vec![
                (0, batch(&[1, 2])),
                (0, batch(&[3])),
                (2, batch(&[])),
                (3, batch(&[5])),
                (3, batch(&[-1])),
                (3, batch(&[7])),
            ],
        )
    }

    #[test]
    fn a_slide_is_processed_whole_and_ended_empty_slides_included() {
        let dir = tempfile::tempdir().unwrap();
        let out = harness(dir.path()).run(Summing { hold: false }).unwrap();
        let sums: Vec<(String, Vec<i64>)> = out
            .batches
            .iter()
            .map(|(s, b)| (s.clone(), values(b)))
            .collect();
        assert_eq!(sums, [("a".to_string(), vec![6])]);
        // Slides without rows end without output; the failed one does not end.
        let mut ended = out.ended.clone();
        ended.sort();
        assert_eq!(ended, ["a", "empty", "zero"]);
        let report = out.report.unwrap();
        let errors: Vec<_> = report
            .errors
            .iter()
            .map(|e| e.slide.clone().unwrap_or_default())
            .collect();
        assert_eq!(errors, ["bad"]);
    }

    #[test]
    fn held_slides_are_ended_by_the_stage_and_failed_ones_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let out = harness(dir.path()).run(Summing { hold: true }).unwrap();
        assert_eq!(out.rows_of("a"), 1);
        let mut ended = out.ended.clone();
        ended.sort();
        assert_eq!(ended, ["a", "empty", "zero"]);
    }

    #[test]
    fn a_failed_slide_s_rows_are_dropped() {
        let slides = test_slides(&[("a", None, None), ("b", None, None)]);
        let mut tables = SlideTables::default();
        tables.push(&slides[0], batch(&[1, 2]));
        tables.push(&slides[1], batch(&[3]));
        tables.push(&slides[0], batch(&[4]));
        tables.forget(&slides[0]);
        assert_eq!(tables.take(&slides[0]).unwrap().map(|t| values(&t)), None);
        assert_eq!(
            tables.take(&slides[1]).unwrap().map(|t| values(&t)),
            Some(vec![3])
        );
        assert!(tables.is_empty());
        // Arrival order is kept; zero-row batches are not held.
        tables.push(&slides[0], batch(&[]));
        assert_eq!(tables.take(&slides[0]).unwrap().map(|t| values(&t)), None);
        tables.push(&slides[0], batch(&[9]));
        tables.push(&slides[0], batch(&[]));
        tables.push(&slides[0], batch(&[8, 7]));
        assert_eq!(
            tables.take(&slides[0]).unwrap().map(|t| values(&t)),
            Some(vec![9, 8, 7])
        );
    }
}
