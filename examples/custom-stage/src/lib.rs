//! How to add your own stage to tessera: `tile_filter`, a quality-control filter between
//! tiling and embedding that drops tiles on per-tile statistics a pathologist would check by
//! eye — too little tissue, background glass (too bright), pen marks or folds (too dark),
//! out-of-focus scanning (too blurry).
//!
//! A stage kind is its parameter struct ([`TileFilterParams`]) implementing
//! [`StageKind`]; the running stage ([`TileFilter`]) implements [`Stage`]. Register it next to
//! the built-ins and hand the registry to the engine's CLI (see `src/main.rs`):
//!
//! ```no_run
//! let mut registry = tessera_stages::builtin_registry();
//! registry.register::<tessera_example_custom_stage::TileFilterParams>();
//! let exit_code = tessera_cli::main(registry);
//! ```

mod stats;

pub use stats::{laplacian_variance, mean_luma};

use arrow::array::{Array, BinaryArray, BooleanArray, Float32Array, Int32Array};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tessera_pipeline::schema::{tile_key_columns, PIXELS, PIXELS_SIZE};
use tessera_pipeline::{
    BuildContext, Column, InputSpec, ParamIssue, SlideHandle, Stage, StageContext, StageError,
    StageKind, StageResult,
};

/// Name of the tissue-fraction column written by the `tile` stage.
pub const TISSUE_FRACTION: &str = "tissue_fraction";

/// Parameters of `tile_filter`. Every criterion is optional; a tile is kept when it passes all
/// the criteria that are set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TileFilterParams {
    /// Drop tiles whose `tissue_fraction` (from the `tile` stage) is below this (0 to 1; 0
    /// disables the criterion).
    pub min_tissue: f32,
    /// Drop tiles whose mean luma (0.299 R + 0.587 G + 0.114 B, 0 to 255) is below this:
    /// pen marks, folds, dark debris. Needs the `pixels` column.
    pub min_brightness: Option<f32>,
    /// Drop tiles whose mean luma (0 to 255) is above this: background glass and faint
    /// tissue. Needs the `pixels` column.
    pub max_brightness: Option<f32>,
    /// Drop tiles whose variance of the 4-neighbour Laplacian of luma is below this: blurry,
    /// out-of-focus regions. The value depends on the resolution; look at a few tiles first
    /// (sharp H&E at 1 mpp is typically in the hundreds). Needs the `pixels` column.
    pub min_sharpness: Option<f32>,
}

impl Default for TileFilterParams {
    fn default() -> Self {
        TileFilterParams {
            min_tissue: 0.0,
            min_brightness: None,
            max_brightness: Some(220.0),
            min_sharpness: None,
        }
    }
}

impl TileFilterParams {
    /// Whether any criterion reads the pixels.
    fn needs_pixels(&self) -> bool {
        self.min_brightness.is_some()
            || self.max_brightness.is_some()
            || self.min_sharpness.is_some()
    }
}

impl StageKind for TileFilterParams {
    const KIND: &'static str = "tile_filter";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "Drops tiles by tissue fraction, brightness or blur (example of a user-defined stage)";

    /// Tile keys, plus `tissue_fraction` and the pixels when a criterion needs them: the
    /// graph check then rejects, before anything runs, a filter fed by a table lacking them.
    fn input_spec(&self) -> InputSpec {
        let mut columns = tile_key_columns();
        if self.min_tissue > 0.0 {
            columns.push(Column::exact(TISSUE_FRACTION, DataType::Float32));
        }
        if self.needs_pixels() {
            columns.push(Column::exact(PIXELS, DataType::Binary));
            columns.push(Column::exact(PIXELS_SIZE, DataType::Int32));
        }
        InputSpec::Tables(vec![columns])
    }

    /// Rows are dropped, never changed: the output table is the input table.
    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        inputs
            .first()
            .cloned()
            .ok_or_else(|| StageError::msg("tile_filter needs one input"))
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        if !(0.0..=1.0).contains(&self.min_tissue) {
            return Err(ParamIssue::new("min_tissue", "must be between 0 and 1"));
        }
        for (field, value) in [
            ("min_brightness", self.min_brightness),
            ("max_brightness", self.max_brightness),
        ] {
            if let Some(v) = value {
                if !(0.0..=255.0).contains(&v) {
                    return Err(ParamIssue::new(
                        field,
                        format!("{v} is not a luma between 0 and 255"),
                    ));
                }
            }
        }
        if let (Some(lo), Some(hi)) = (self.min_brightness, self.max_brightness) {
            if lo > hi {
                return Err(ParamIssue::new(
                    "min_brightness",
                    format!("{lo} is above max_brightness {hi}: every tile would be dropped"),
                ));
            }
        }
        if self.min_sharpness.is_some_and(|s| s < 0.0) {
            return Err(ParamIssue::new(
                "min_sharpness",
                "a variance is never negative",
            ));
        }
        if self.min_tissue == 0.0 && !self.needs_pixels() {
            return Err(ParamIssue::new(
                "",
                "no criterion set: give min_tissue, min_brightness, max_brightness or min_sharpness",
            ));
        }
        Ok(())
    }

    fn build(&self, _ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(Box::new(TileFilter {
            params: self.clone(),
            counts: HashMap::new(),
        }))
    }
}

/// The running filter: streams each batch through, keeping the rows that pass.
pub struct TileFilter {
    params: TileFilterParams,
    /// Per slide index: (tiles kept, tiles dropped), for the warning on slides left empty.
    counts: HashMap<usize, (usize, usize)>,
}

impl TileFilter {
    /// Which rows of `batch` pass every criterion.
    pub fn keep_mask(&self, batch: &RecordBatch) -> StageResult<BooleanArray> {
        let p = &self.params;
        let n = batch.num_rows();
        let mut keep = vec![true; n];
        if p.min_tissue > 0.0 {
            let tissue = column::<Float32Array>(batch, TISSUE_FRACTION)?;
            for (row, k) in keep.iter_mut().enumerate() {
                *k &= tissue.is_valid(row) && tissue.value(row) >= p.min_tissue;
            }
        }
        if p.needs_pixels() {
            let pixels = column::<BinaryArray>(batch, PIXELS)?;
            let sizes = column::<Int32Array>(batch, PIXELS_SIZE)?;
            for (row, k) in keep.iter_mut().enumerate() {
                if !*k {
                    continue;
                }
                let side = usize::try_from(sizes.value(row)).unwrap_or(0);
                let rgb = pixels.value(row);
                if rgb.len() != side * side * 3 {
                    return Err(StageError::msg(format!(
                        "row {row}: `{PIXELS}` holds {} bytes, but `{PIXELS_SIZE}` {side} needs {}",
                        rgb.len(),
                        side * side * 3
                    )));
                }
                let luma = mean_luma(rgb);
                *k &= p.min_brightness.is_none_or(|lo| luma >= lo)
                    && p.max_brightness.is_none_or(|hi| luma <= hi);
                if *k {
                    if let Some(min) = p.min_sharpness {
                        *k &= laplacian_variance(rgb, side) >= min;
                    }
                }
            }
        }
        Ok(BooleanArray::from(keep))
    }
}

impl Stage for TileFilter {
    fn on_batch(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
        batch: RecordBatch,
    ) -> StageResult {
        let mask = self.keep_mask(&batch)?;
        let kept = mask.true_count();
        let counts = self.counts.entry(slide.index).or_default();
        counts.0 += kept;
        counts.1 += batch.num_rows() - kept;
        if kept == 0 {
            return Ok(());
        }
        let out = if kept == batch.num_rows() {
            batch
        } else {
            filter_record_batch(&batch, &mask)?
        };
        ctx.emit(slide, out)
    }

    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        let (kept, dropped) = self.counts.remove(&slide.index).unwrap_or_default();
        if kept == 0 && dropped > 0 {
            ctx.warn(
                Some(slide),
                format!("tile_filter dropped all {dropped} tiles of the slide"),
            );
        }
        ctx.end_slide(slide)
    }

    fn on_slide_failed(&mut self, _ctx: &mut StageContext, slide: &SlideHandle) {
        self.counts.remove(&slide.index);
    }
}

/// A column of `batch` downcast to its expected array type, or an error naming it.
fn column<'a, A: Array + 'static>(batch: &'a RecordBatch, name: &str) -> StageResult<&'a A> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<A>())
        .ok_or_else(|| StageError::msg(format!("input lacks column `{name}` of the expected type")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;
    use tessera_pipeline::schema::tile_key_fields;
    use tessera_pipeline::testing::{test_slides, Harness};

    const SIDE: usize = 8;

    fn schema() -> SchemaRef {
        let mut fields = tile_key_fields();
        fields.push(Field::new(TISSUE_FRACTION, DataType::Float32, false));
        fields.push(Field::new(PIXELS, DataType::Binary, false));
        fields.push(Field::new(PIXELS_SIZE, DataType::Int32, false));
        Arc::new(Schema::new(fields))
    }

    /// Tiles: 0 sharp tissue, 1 white glass, 2 flat (blurry) tissue, 3 sharp but little tissue.
    fn batch() -> RecordBatch {
        let checker: Vec<u8> = (0..SIDE * SIDE)
            .flat_map(|i| {
                let v = if (i / SIDE + i % SIDE).is_multiple_of(2) {
                    60
                } else {
                    200
                };
                [v, v, v]
            })
            .collect();
        let white = vec![245u8; SIDE * SIDE * 3];
        let flat = vec![130u8; SIDE * SIDE * 3];
        let pixels = [checker.clone(), white, flat, checker];
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec!["s"; 4])),
            Arc::new(Int64Array::from(vec![0, 256, 512, 768])),
            Arc::new(Int64Array::from(vec![0; 4])),
            Arc::new(Int64Array::from(vec![256; 4])),
            Arc::new(Float32Array::from(vec![0.9, 0.9, 0.9, 0.1])),
            Arc::new(BinaryArray::from_iter_values(pixels.iter())),
            Arc::new(Int32Array::from(vec![SIDE as i32; 4])),
        ];
        RecordBatch::try_new(schema(), columns).unwrap()
    }

    fn xs(out: &[(String, RecordBatch)]) -> Vec<i64> {
        out.iter()
            .flat_map(|(_, b)| {
                let x = b
                    .column_by_name("x")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap();
                x.values().to_vec()
            })
            .collect()
    }

    fn run(params: TileFilterParams) -> Vec<i64> {
        let dir = tempfile::tempdir().unwrap();
        let out = Harness::new(test_slides(&[("s", None, None)]), dir.path())
            .input(schema(), vec![(0, batch())])
            .run(params)
            .unwrap();
        assert_eq!(out.ended, vec!["s".to_string()]);
        xs(&out.batches)
    }

    #[test]
    fn each_criterion_drops_its_tiles_and_nothing_else() {
        let none = TileFilterParams {
            max_brightness: None,
            ..Default::default()
        };
        assert_eq!(
            run(TileFilterParams {
                min_tissue: 0.5,
                ..none.clone()
            }),
            vec![0, 256, 512]
        );
        assert_eq!(
            run(TileFilterParams {
                max_brightness: Some(220.0),
                ..none.clone()
            }),
            vec![0, 512, 768]
        );
        assert_eq!(
            run(TileFilterParams {
                min_brightness: Some(200.0),
                ..none.clone()
            }),
            vec![256]
        );
        assert_eq!(
            run(TileFilterParams {
                min_sharpness: Some(10.0),
                ..none.clone()
            }),
            vec![0, 768]
        );
        let all = TileFilterParams {
            min_tissue: 0.5,
            min_sharpness: Some(10.0),
            ..Default::default()
        };
        assert_eq!(run(all), vec![0]);
    }

    #[test]
    fn other_columns_pass_through_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let out = Harness::new(test_slides(&[("s", None, None)]), dir.path())
            .input(schema(), vec![(0, batch())])
            .run(TileFilterParams {
                min_tissue: 0.5,
                max_brightness: None,
                ..Default::default()
            })
            .unwrap();
        let b = &out.batches[0].1;
        assert_eq!(b.schema(), schema());
        let kept =
            filter_record_batch(&batch(), &BooleanArray::from(vec![true, true, true, false]))
                .unwrap();
        assert_eq!(b, &kept);
    }

    #[test]
    fn a_slide_losing_every_tile_still_ends_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let out = Harness::new(test_slides(&[("s", None, None)]), dir.path())
            .input(schema(), vec![(0, batch())])
            .run(TileFilterParams {
                min_tissue: 0.95,
                ..Default::default()
            })
            .unwrap();
        assert!(out.batches.is_empty());
        assert_eq!(out.ended, vec!["s".to_string()]);
        let report = out.report.unwrap();
        let warnings = &report.stage("tile_filter").unwrap().warnings;
        assert!(
            warnings
                .iter()
                .any(|w| w.message.contains("dropped all 4 tiles")),
            "{warnings:?}"
        );
    }

    #[test]
    fn input_needs_only_the_columns_its_criteria_read() {
        let tissue_only = TileFilterParams {
            min_tissue: 0.5,
            max_brightness: None,
            ..Default::default()
        };
        let InputSpec::Tables(t) = tissue_only.input_spec() else {
            panic!()
        };
        assert!(
            t[0].iter().any(|c| c.name == TISSUE_FRACTION)
                && !t[0].iter().any(|c| c.name == PIXELS)
        );
        let InputSpec::Tables(t) = TileFilterParams::default().input_spec() else {
            panic!()
        };
        assert!(
            t[0].iter().any(|c| c.name == PIXELS)
                && !t[0].iter().any(|c| c.name == TISSUE_FRACTION)
        );
    }

    #[test]
    fn rejects_meaningless_parameters_naming_the_field() {
        let bad = |p: TileFilterParams| p.validate().unwrap_err().field;
        assert_eq!(
            bad(TileFilterParams {
                min_tissue: 1.5,
                ..Default::default()
            }),
            "min_tissue"
        );
        assert_eq!(
            bad(TileFilterParams {
                max_brightness: Some(300.0),
                ..Default::default()
            }),
            "max_brightness"
        );
        assert_eq!(
            bad(TileFilterParams {
                min_brightness: Some(230.0),
                max_brightness: Some(200.0),
                ..Default::default()
            }),
            "min_brightness"
        );
        assert_eq!(
            bad(TileFilterParams {
                min_sharpness: Some(-1.0),
                ..Default::default()
            }),
            "min_sharpness"
        );
        assert!(TileFilterParams {
            max_brightness: None,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(TileFilterParams::default().validate().is_ok());
    }
}
