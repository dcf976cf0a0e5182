//! The per-tile table: `slide_id, x, y, tile_size, score_<class>...` (one row per tile), plus
//! `cell_tiles` (tiles sharing the tile's sparse-map cell, hence its score). Written to Parquet
//! with the method, classes and prediction in the key-value metadata.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Int64Array, ListArray, StringArray};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use tessera_pipeline::schema::tile_key_fields;

use crate::scores::TileScores;
use crate::HeatmapError;

/// Prefix of the per-class score columns.
pub const SCORE_PREFIX: &str = "score_";
/// Column of the tiles sharing each tile's sparse-map cell.
pub const CELL_TILES: &str = "cell_tiles";

/// The Parquet table's schema for `classes`.
pub fn table_schema(classes: &[String]) -> SchemaRef {
    let mut fields = tile_key_fields();
    for c in classes {
        fields.push(Field::new(
            format!("{SCORE_PREFIX}{c}"),
            DataType::Float32,
            false,
        ));
    }
    fields.push(Field::new(CELL_TILES, DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

/// The schema the stage emits downstream: tile keys and `scores: List<Float32>` in the
/// checkpoint's class order (the classes are not known before the checkpoint is read).
pub fn stream_schema() -> SchemaRef {
    let mut fields = tile_key_fields();
    fields.push(Field::new(
        "scores",
        DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
        false,
    ));
    Arc::new(Schema::new(fields))
}

fn keys(s: &TileScores) -> Vec<ArrayRef> {
    vec![
        Arc::new(StringArray::from(vec![s.slide_id.as_str(); s.len()])),
        Arc::new(Int64Array::from(s.xs.clone())),
        Arc::new(Int64Array::from(s.ys.clone())),
        Arc::new(Int64Array::from(s.sizes.clone())),
    ]
}

/// The Parquet table of one slide.
pub fn to_table(s: &TileScores) -> Result<RecordBatch, HeatmapError> {
    let mut columns = keys(s);
    for c in 0..s.classes.len() {
        columns.push(Arc::new(Float32Array::from(s.class_scores(c))));
    }
    columns.push(Arc::new(Int64Array::from(s.cell_tiles.clone())));
    Ok(RecordBatch::try_new(table_schema(&s.classes), columns)?)
}

/// The rows emitted downstream for one slide.
pub fn to_stream(s: &TileScores) -> Result<RecordBatch, HeatmapError> {
    let c = s.classes.len();
    let mut columns = keys(s);
    columns.push(Arc::new(
        ListArray::from_iter_primitive::<Float32Type, _, _>(
            (0..s.len()).map(|i| Some(s.scores[i * c..(i + 1) * c].iter().map(|v| Some(*v)))),
        ),
    ));
    Ok(RecordBatch::try_new(stream_schema(), columns)?)
}

/// Writes the slide's table to `path` (through a temporary file renamed at the end).
pub fn write_parquet(
    path: &Path,
    s: &TileScores,
    metadata: &HashMap<String, String>,
) -> Result<(), HeatmapError> {
    let fail = |message: String| HeatmapError::Write {
        path: path.display().to_string(),
        message,
    };
    let batch = to_table(s)?;
    let kv: Vec<KeyValue> = metadata
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| fail(e.to_string()))?;
    let mut writer =
        ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(|e| fail(e.to_string()))?;
    writer.write(&batch).map_err(|e| fail(e.to_string()))?;
    writer.close().map_err(|e| fail(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| fail(e.to_string()))
}
