//! Typed access to the columns of a bag (a slide's `RecordBatch`), with errors that name the
//! column, and the embedding column read into / written from a flat `f32` matrix.

use crate::error::MilError;
use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float16Array, Float32Array, Int32Array,
    Int64Array, StringArray,
};
use arrow::datatypes::{DataType, Field, Float16Type, Float32Type, Int32Type, Int64Type, Schema};
use arrow::record_batch::RecordBatch;
use std::sync::Arc;
use tessera_pipeline::schema::{EMBEDDING, PIXELS, PIXELS_SIZE};
use tessera_pipeline::StageError;

/// A column by name, or an error saying what it was needed for.
pub fn column<'a>(
    batch: &'a RecordBatch,
    name: &str,
    purpose: &'static str,
) -> Result<&'a ArrayRef, MilError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| MilError::MissingColumn {
            column: name.to_string(),
            purpose,
        })
}

/// An `Int64` column's values; nulls are errors (coordinates and counts are never optional).
pub fn int64_values(
    batch: &RecordBatch,
    name: &str,
    purpose: &'static str,
) -> Result<Vec<i64>, MilError> {
    let array = column(batch, name, purpose)?;
    let ints: &Int64Array =
        array
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| MilError::WrongType {
                column: name.to_string(),
                expected: "Int64",
                found: array.data_type().to_string(),
            })?;
    if let Some(row) = (0..ints.len()).find(|&i| ints.is_null(i)) {
        return Err(MilError::Null {
            column: name.to_string(),
            row,
        });
    }
    Ok(ints.values().to_vec())
}

/// A `Utf8` column as a typed array.
pub fn utf8<'a>(
    batch: &'a RecordBatch,
    name: &str,
    purpose: &'static str,
) -> Result<&'a StringArray, MilError> {
    let array = column(batch, name, purpose)?;
    array
        .as_string_opt::<i32>()
        .ok_or_else(|| MilError::WrongType {
            column: name.to_string(),
            expected: "Utf8",
            found: array.data_type().to_string(),
        })
}

/// A bag's embeddings as a row-major `rows x dim` matrix, plus how they were stored.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingMatrix {
    pub values: Vec<f32>,
    pub dim: usize,
    /// The Arrow type of the column, to write merged embeddings back in the same type.
    pub data_type: DataType,
}

/// Reads `FixedSizeList<Float32|Float16, D>` into `f32` (merging happens in `f32`).
pub fn read_embeddings(batch: &RecordBatch, name: &str) -> Result<EmbeddingMatrix, MilError> {
    let array = column(batch, name, "the sparse map")?;
    let wrong = || MilError::WrongType {
        column: name.to_string(),
        expected: "FixedSizeList<Float32|Float16, D>",
        found: array.data_type().to_string(),
    };
    let list: &FixedSizeListArray = array.as_fixed_size_list_opt().ok_or_else(wrong)?;
    if let Some(row) = (0..list.len()).find(|&i| list.is_null(i)) {
        return Err(MilError::Null {
            column: name.to_string(),
            row,
        });
    }
    let dim = list.value_length() as usize;
    let child = list.values();
    let values: Vec<f32> = match child.data_type() {
        DataType::Float32 => {
            let f: &Float32Array = child.as_primitive::<Float32Type>();
            f.values()[..list.len() * dim].to_vec()
        }
        DataType::Float16 => {
            let f: &Float16Array = child.as_primitive::<Float16Type>();
            f.values()[..list.len() * dim]
                .iter()
                .map(|h| h.to_f32())
                .collect()
        }
        _ => return Err(wrong()),
    };
    Ok(EmbeddingMatrix {
        values,
        dim,
        data_type: array.data_type().clone(),
    })
}

/// Writes a row-major matrix back as an embedding column of `data_type` (as read).
pub fn embeddings_array(values: &[f32], data_type: &DataType) -> Result<ArrayRef, MilError> {
    let DataType::FixedSizeList(item, dim) = data_type else {
        return Err(MilError::Invalid(format!(
            "{data_type} is not an embedding type"
        )));
    };
    let child: ArrayRef = match item.data_type() {
        DataType::Float16 => Arc::new(Float16Array::from(
            values
                .iter()
                .map(|v| half::f16::from_f32(*v))
                .collect::<Vec<_>>(),
        )),
        _ => Arc::new(Float32Array::from(values.to_vec())),
    };
    let field: Arc<Field> = item.clone();
    Ok(Arc::new(FixedSizeListArray::try_new(
        field, *dim, child, None,
    )?))
}

/// What a bag's instances are made of: embeddings computed upstream, or tile pixels that the
/// training stage embeds itself (`train.finetune_embedder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceColumn {
    /// `embedding: FixedSizeList<Float32|Float16, D>`.
    Embedding,
    /// `pixels: Binary` (RGB8) and `pixels_size: Int32`, straight from the `tile` stage.
    Pixels,
}

/// The instance column of `schema`: `embedding` when present (pixels next to it are dropped by
/// `sample`), else `pixels` + `pixels_size`; `None` when it has neither.
pub fn instance_column(schema: &Schema) -> Option<InstanceColumn> {
    let has = |name: &str, ok: &dyn Fn(&DataType) -> bool| {
        schema
            .field_with_name(name)
            .is_ok_and(|f| ok(f.data_type()))
    };
    if has(EMBEDDING, &|t| {
        tessera_pipeline::ColumnType::Embedding.accepts(t)
    }) {
        Some(InstanceColumn::Embedding)
    } else if has(PIXELS, &|t| *t == DataType::Binary)
        && has(PIXELS_SIZE, &|t| *t == DataType::Int32)
    {
        Some(InstanceColumn::Pixels)
    } else {
        None
    }
}

/// [`instance_column`], or the error a stage reports at validation when there is none.
pub fn require_instances(schema: &Schema, stage: &str) -> Result<InstanceColumn, StageError> {
    instance_column(schema).ok_or_else(|| {
        StageError::msg(format!(
            "{stage} needs either an `{EMBEDDING}` column (from `embed` or `features`) or tile \
             pixels (`{PIXELS}: Binary`, `{PIXELS_SIZE}: Int32`, from `tile`, for \
             `train.finetune_embedder`); its input has neither"
        ))
    })
}

/// One tile's RGB8 pixels, row-major, `side x side x 3` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TilePixels {
    pub rgb: Vec<u8>,
    pub side: usize,
}

/// Reads the `pixels` / `pixels_size` columns, checking every row's byte count.
pub fn read_pixels(batch: &RecordBatch) -> Result<Vec<TilePixels>, MilError> {
    let purpose = "end-to-end training (finetune_embedder)";
    let bytes = column(batch, PIXELS, purpose)?;
    let bytes = bytes
        .as_binary_opt::<i32>()
        .ok_or_else(|| MilError::WrongType {
            column: PIXELS.to_string(),
            expected: "Binary",
            found: bytes.data_type().to_string(),
        })?;
    let sides = column(batch, PIXELS_SIZE, purpose)?;
    let sides: &Int32Array =
        sides
            .as_primitive_opt::<Int32Type>()
            .ok_or_else(|| MilError::WrongType {
                column: PIXELS_SIZE.to_string(),
                expected: "Int32",
                found: sides.data_type().to_string(),
            })?;
    (0..batch.num_rows())
        .map(|row| {
            if bytes.is_null(row) || sides.is_null(row) {
                return Err(MilError::Null {
                    column: PIXELS.to_string(),
                    row,
                });
            }
            let side = usize::try_from(sides.value(row)).unwrap_or(0);
            let rgb = bytes.value(row);
            if side == 0 || rgb.len() != side * side * 3 {
                return Err(MilError::Invalid(format!(
                    "row {row}: column `{PIXELS}` holds {} bytes, `{PIXELS_SIZE}` says {side} x {side} x 3",
                    rgb.len()
                )));
            }
            Ok(TilePixels {
                rgb: rgb.to_vec(),
                side,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Schema;
    use tessera_pipeline::schema::embedding_type;

    fn batch_with(name: &str, array: ArrayRef) -> RecordBatch {
        let schema = Schema::new(vec![Field::new(name, array.data_type().clone(), true)]);
        RecordBatch::try_new(Arc::new(schema), vec![array]).unwrap()
    }

    #[test]
    fn embeddings_round_trip_in_both_widths_and_after_slicing() {
        for half in [false, true] {
            let ty = embedding_type(3, half);
            let values = [0.5f32, 1.0, -2.0, 3.0, 0.25, 8.0];
            let array = embeddings_array(&values, &ty).unwrap();
            let batch = batch_with("embedding", array);
            let read = read_embeddings(&batch, "embedding").unwrap();
            assert_eq!(read.values, values);
            assert_eq!(read.dim, 3);
            assert_eq!(read.data_type, ty);
            let sliced = read_embeddings(&batch.slice(1, 1), "embedding").unwrap();
            assert_eq!(sliced.values, [3.0, 0.25, 8.0]);
        }
    }

    #[test]
    fn errors_name_the_column() {
        let batch = batch_with("x", Arc::new(Float32Array::from(vec![1.0])));
        let err = int64_values(&batch, "x", "the sparse map")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`x`") && err.contains("Int64"), "{err}");
        let err = int64_values(&batch, "y", "the sparse map")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`y`") && err.contains("sparse map"), "{err}");
        let batch = batch_with("x", Arc::new(Int64Array::from(vec![Some(1), None])));
        let err = int64_values(&batch, "x", "t").unwrap_err().to_string();
        assert!(err.contains("row 1"), "{err}");
    }
}
