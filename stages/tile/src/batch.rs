//! The tile table as Arrow: its schema, building batches from kept tiles (and their pixels),
//! and reading the coordinates back from cached batches for replay.

use arrow::array::{
    Array, ArrayRef, BinaryArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::sync::Arc;
use tessera_pipeline::schema::{tile_key_fields, PIXELS, PIXELS_SIZE, TILE_SIZE, X, Y};
use tessera_pipeline::{StageError, StageResult};

/// Pyramid level the tile was read from.
pub const LEVEL: &str = "level";
/// Microns per pixel of the tile's pixels (null when the slide's mpp is unknown).
pub const MPP: &str = "mpp";
/// Tissue fraction of the tile on the tissue mask.
pub const TISSUE_FRACTION: &str = "tissue_fraction";

/// One row of the tile table, pixels aside.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileRow {
    pub x: i64,
    pub y: i64,
    /// Level-0 side.
    pub size0: i64,
    pub level: i32,
    pub mpp: Option<f64>,
    pub tissue: f32,
}

/// The table the tile stage emits: tile keys, `level`, `mpp`, `tissue_fraction`, and
/// `pixels`/`pixels_size` when pixels are emitted.
pub fn tile_schema(with_pixels: bool) -> SchemaRef {
    let mut fields = tile_key_fields();
    fields.push(Field::new(LEVEL, DataType::Int32, false));
    fields.push(Field::new(MPP, DataType::Float64, true));
    fields.push(Field::new(TISSUE_FRACTION, DataType::Float32, false));
    if with_pixels {
        fields.push(Field::new(PIXELS, DataType::Binary, false));
        fields.push(Field::new(PIXELS_SIZE, DataType::Int32, false));
    }
    Arc::new(Schema::new(fields))
}

/// Builds one batch of `rows`; `pixels` (one RGB8 buffer of `tile_px²·3` bytes per row) is
/// required exactly when `schema` has the pixel columns.
pub fn build_batch(
    schema: &SchemaRef,
    slide_id: &str,
    rows: &[TileRow],
    pixels: Option<(&[Vec<u8>], u32)>,
) -> StageResult<RecordBatch> {
    let n = rows.len();
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            slide_id, n,
        ))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.x))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.y))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.size0))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.level))),
        Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.mpp))),
        Arc::new(Float32Array::from_iter_values(
            rows.iter().map(|r| r.tissue),
        )),
    ];
    let wants_pixels = schema.column_with_name(PIXELS).is_some();
    match (wants_pixels, pixels) {
        (true, Some((pixels, tile_px))) => {
            if pixels.len() != n {
                return Err(StageError::msg(format!(
                    "{} tiles read for {n} rows",
                    pixels.len()
                )));
            }
            columns.push(Arc::new(BinaryArray::from_iter_values(pixels.iter())));
            columns.push(Arc::new(Int32Array::from_iter_values(std::iter::repeat_n(
                tile_px as i32,
                n,
            ))));
        }
        (false, None) => {}
        (true, None) => {
            return Err(StageError::msg(
                "the tile table needs pixels but none were read",
            ))
        }
        (false, Some(_)) => {
            return Err(StageError::msg(
                "pixels were read for a table without pixels",
            ))
        }
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// The rows of a cached tile table (pixel columns ignored), to re-read their pixels.
pub fn rows_of(batch: &RecordBatch) -> StageResult<Vec<TileRow>> {
    fn column<'a, T: Array + 'static>(batch: &'a RecordBatch, name: &str) -> StageResult<&'a T> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<T>())
            .ok_or_else(|| {
                StageError::msg(format!(
                    "cached tile table lacks column `{name}` of the expected type"
                ))
            })
    }
    let x = column::<Int64Array>(batch, X)?;
    let y = column::<Int64Array>(batch, Y)?;
    let size = column::<Int64Array>(batch, TILE_SIZE)?;
    let level = column::<Int32Array>(batch, LEVEL)?;
    let mpp = column::<Float64Array>(batch, MPP)?;
    let tissue = column::<Float32Array>(batch, TISSUE_FRACTION)?;
    Ok((0..batch.num_rows())
        .map(|i| TileRow {
            x: x.value(i),
            y: y.value(i),
            size0: size.value(i),
            level: level.value(i),
            mpp: mpp.is_valid(i).then(|| mpp.value(i)),
            tissue: tissue.value(i),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_their_rows_and_carry_pixels() {
        let rows = vec![
            TileRow {
                x: 0,
                y: 10,
                size0: 512,
                level: 1,
                mpp: Some(1.0),
                tissue: 0.75,
            },
            TileRow {
                x: 384,
                y: 10,
                size0: 512,
                level: 1,
                mpp: None,
                tissue: 1.0,
            },
        ];
        let schema = tile_schema(true);
        let pixels = vec![vec![1u8; 2 * 2 * 3], vec![2u8; 2 * 2 * 3]];
        let batch = build_batch(&schema, "s1", &rows, Some((&pixels, 2))).unwrap();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(rows_of(&batch).unwrap(), rows);
        let px = batch
            .column_by_name(PIXELS)
            .unwrap()
            .as_any()
            .downcast_ref::<BinaryArray>()
            .unwrap();
        assert_eq!(px.value(1), &pixels[1][..]);
        assert!(build_batch(&schema, "s1", &rows, None).is_err());
        let plain = build_batch(&tile_schema(false), "s1", &rows, None).unwrap();
        assert_eq!(plain.num_columns(), 7);
    }
}
