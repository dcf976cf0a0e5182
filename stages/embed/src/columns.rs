//! Arrow plumbing shared by `embed` and `features`: the embedding column and the output
//! schema of an embeddings table.

use crate::error::EmbedResult;
use arrow::array::{ArrayRef, FixedSizeListArray, Float16Array, Float32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::collections::HashMap;
use std::sync::Arc;
use tessera_pipeline::schema::{embedding_type, tile_key_fields, EMBEDDING, PIXELS, PIXELS_SIZE};

/// Builds the `embedding` column from row-major `rows x dim` values, stored as Float16 when
/// `half` (halves the cache; about 3 significant digits are kept).
pub fn embedding_column(values: Vec<f32>, dim: usize, half: bool) -> EmbedResult<ArrayRef> {
    let DataType::FixedSizeList(item, _) = embedding_type(dim, half) else {
        unreachable!("embedding_type always returns a FixedSizeList")
    };
    let values: ArrayRef = if half {
        Arc::new(Float16Array::from_iter_values(
            values.into_iter().map(half::f16::from_f32),
        ))
    } else {
        Arc::new(Float32Array::from(values))
    };
    Ok(Arc::new(FixedSizeListArray::try_new(
        item, dim as i32, values, None,
    )?))
}

/// The schema `embed` emits for an input schema: the tile keys, `embedding`, then every
/// other input column passed through (level, mpp, tissue_fraction...) except the pixels.
pub fn embed_output_schema(
    input: &Schema,
    dim: usize,
    half: bool,
    metadata: HashMap<String, String>,
) -> SchemaRef {
    let mut fields: Vec<Field> = tile_key_fields();
    fields.push(Field::new(EMBEDDING, embedding_type(dim, half), false));
    let taken: Vec<String> = fields.iter().map(|f| f.name().clone()).collect();
    for f in input.fields() {
        let name = f.name().as_str();
        if taken.iter().any(|t| t == name) || name == PIXELS || name == PIXELS_SIZE {
            continue;
        }
        fields.push(f.as_ref().clone());
    }
    Arc::new(Schema::new_with_metadata(fields, metadata))
}
