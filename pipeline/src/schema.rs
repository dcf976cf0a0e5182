//! What a stage needs from its input tables, checked against what the upstream stage
//! declares it produces, before anything runs.

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::sync::Arc;

/// The type a stage accepts for one input column.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnType {
    /// Exactly this Arrow type.
    Exact(DataType),
    /// `FixedSizeList<Float32 | Float16, D>` of any `D`: an embedding of any model's width.
    Embedding,
    /// Any type: the stage only passes the column along or inspects it itself.
    Any,
}

impl ColumnType {
    /// Whether a produced column type satisfies this requirement.
    pub fn accepts(&self, ty: &DataType) -> bool {
        match self {
            ColumnType::Exact(t) => t == ty,
            ColumnType::Embedding => matches!(
                ty,
                DataType::FixedSizeList(f, _) if matches!(f.data_type(), DataType::Float32 | DataType::Float16)
            ),
            ColumnType::Any => true,
        }
    }

    /// Human-readable form for error messages.
    pub fn describe(&self) -> String {
        match self {
            ColumnType::Exact(t) => format!("{t}"),
            ColumnType::Embedding => "FixedSizeList<Float32|Float16, D>".into(),
            ColumnType::Any => "any type".into(),
        }
    }
}

/// One column a stage requires on an input.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColumnType,
}

impl Column {
    /// A required column of an exact type.
    pub fn exact(name: &'static str, ty: DataType) -> Self {
        Column {
            name,
            ty: ColumnType::Exact(ty),
        }
    }
    /// A required embedding column of any width.
    pub fn embedding(name: &'static str) -> Self {
        Column {
            name,
            ty: ColumnType::Embedding,
        }
    }
    /// A required column of any type.
    pub fn any(name: &'static str) -> Self {
        Column {
            name,
            ty: ColumnType::Any,
        }
    }
}

/// What a stage reads: the dataset's slide list (a source), or tables from upstream stages.
#[derive(Debug, Clone, PartialEq)]
pub enum InputSpec {
    /// Reads slides from the dataset; takes no upstream stage.
    Dataset,
    /// One entry per upstream input, in the order of the YAML `inputs:` list, each listing the
    /// columns the stage needs there (extra columns are allowed).
    Tables(Vec<Vec<Column>>),
}

/// The columns every per-slide table starts with: which slide and where on it, in level-0 px.
pub fn tile_key_fields() -> Vec<Field> {
    vec![
        Field::new(SLIDE_ID, DataType::Utf8, false),
        Field::new(X, DataType::Int64, false),
        Field::new(Y, DataType::Int64, false),
        Field::new(TILE_SIZE, DataType::Int64, false),
    ]
}

/// The columns a tile table must carry (`slide_id, x, y, tile_size`).
pub fn tile_key_columns() -> Vec<Column> {
    vec![
        Column::exact(SLIDE_ID, DataType::Utf8),
        Column::exact(X, DataType::Int64),
        Column::exact(Y, DataType::Int64),
        Column::exact(TILE_SIZE, DataType::Int64),
    ]
}

/// The embedding column type for width `dim`.
pub fn embedding_type(dim: usize, half: bool) -> DataType {
    let item = if half {
        DataType::Float16
    } else {
        DataType::Float32
    };
    DataType::FixedSizeList(Arc::new(Field::new("item", item, true)), dim as i32)
}

/// The minimum embeddings table: tile keys plus `embedding`.
pub fn embeddings_schema(dim: usize, half: bool) -> SchemaRef {
    let mut fields = tile_key_fields();
    fields.push(Field::new("embedding", embedding_type(dim, half), false));
    Arc::new(Schema::new(fields))
}

/// A mismatch between what an input provides and what a stage requires.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnMismatch {
    Missing {
        column: &'static str,
        wanted: String,
    },
    WrongType {
        column: &'static str,
        wanted: String,
        found: String,
    },
}

impl std::fmt::Display for ColumnMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ColumnMismatch::Missing { column, wanted } => {
                write!(
                    f,
                    "needs column `{column}` ({wanted}), which it does not produce"
                )
            }
            ColumnMismatch::WrongType {
                column,
                wanted,
                found,
            } => {
                write!(f, "needs column `{column}` as {wanted}, but it is {found}")
            }
        }
    }
}

/// Checks `schema` against `required`, returning the first mismatch.
pub fn check_columns(schema: &Schema, required: &[Column]) -> Result<(), ColumnMismatch> {
    for col in required {
        match schema.field_with_name(col.name) {
            Err(_) => {
                return Err(ColumnMismatch::Missing {
                    column: col.name,
                    wanted: col.ty.describe(),
                })
            }
            Ok(field) if !col.ty.accepts(field.data_type()) => {
                return Err(ColumnMismatch::WrongType {
                    column: col.name,
                    wanted: col.ty.describe(),
                    found: format!("{}", field.data_type()),
                })
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Why a batch a stage emitted does not fit the output schema it declared.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmitMismatch {
    #[error("lacks declared column `{column}` ({declared})")]
    Missing { column: String, declared: DataType },
    #[error("has column `{column}` as {found}, but declared it as {declared}")]
    WrongType {
        column: String,
        declared: DataType,
        found: DataType,
    },
}

/// Checks that an emitted batch's schema has every declared column with its declared type
/// (nested field names and metadata aside), so that what the graph check promised holds at
/// run time. Cheap: batches built on the declared schema (the usual case) compare equal field
/// by field at once; only a differing batch is looked at column by column.
pub fn check_emitted(declared: &Schema, emitted: &Schema) -> Result<(), EmitMismatch> {
    if declared.fields() == emitted.fields() {
        return Ok(());
    }
    for field in declared.fields() {
        match emitted.field_with_name(field.name()) {
            Err(_) => {
                return Err(EmitMismatch::Missing {
                    column: field.name().clone(),
                    declared: field.data_type().clone(),
                })
            }
            Ok(found) if !found.data_type().equals_datatype(field.data_type()) => {
                return Err(EmitMismatch::WrongType {
                    column: field.name().clone(),
                    declared: field.data_type().clone(),
                    found: found.data_type().clone(),
                })
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Name of the column carrying a tile's pixels downstream of tiling: RGB8, row-major,
/// `pixels_size x pixels_size x 3` bytes, at the tiling stage's target resolution.
pub const PIXELS: &str = "pixels";
/// Name of the column giving the side, in pixels, of each row's `pixels`.
pub const PIXELS_SIZE: &str = "pixels_size";
/// Name of the embedding column.
pub const EMBEDDING: &str = "embedding";
/// The tile keys ([`tile_key_fields`]): the slide, the tile's level-0 top-left corner and its
/// level-0 side.
pub const SLIDE_ID: &str = "slide_id";
pub const X: &str = "x";
pub const Y: &str = "y";
pub const TILE_SIZE: &str = "tile_size";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_accepts_any_width_of_float_lists() {
        assert!(ColumnType::Embedding.accepts(&embedding_type(512, false)));
        assert!(ColumnType::Embedding.accepts(&embedding_type(7, true)));
        assert!(!ColumnType::Embedding.accepts(&DataType::Float32));
    }

    #[test]
    fn emitted_batches_must_have_every_declared_column_with_its_type() {
        let declared = embeddings_schema(4, false);
        assert!(check_emitted(&declared, &declared).is_ok());
        // Extra columns and other column orders are fine.
        let mut fields: Vec<Field> = declared
            .fields()
            .iter()
            .rev()
            .map(|f| (**f).clone())
            .collect();
        fields.push(Field::new("extra", DataType::Utf8, true));
        assert!(check_emitted(&declared, &Schema::new(fields)).is_ok());
        let without: Vec<Field> = declared
            .fields()
            .iter()
            .filter(|f| f.name() != "embedding")
            .map(|f| (**f).clone())
            .collect();
        let err = check_emitted(&declared, &Schema::new(without)).unwrap_err();
        assert!(
            err.to_string()
                .contains("lacks declared column `embedding`"),
            "{err}"
        );
        let retyped: Vec<Field> = declared
            .fields()
            .iter()
            .map(|f| match f.name().as_str() {
                "x" => Field::new("x", DataType::Int32, false),
                _ => (**f).clone(),
            })
            .collect();
        let err = check_emitted(&declared, &Schema::new(retyped)).unwrap_err();
        assert!(err.to_string().contains("column `x` as Int32"), "{err}");
    }

    #[test]
    fn reports_missing_and_wrong_columns() {
        let schema = embeddings_schema(4, false);
        assert!(check_columns(&schema, &tile_key_columns()).is_ok());
        let err = check_columns(&schema, &[Column::exact("pixels", DataType::Binary)]).unwrap_err();
        assert!(err.to_string().contains("`pixels`"));
        let err = check_columns(&schema, &[Column::exact("x", DataType::Float64)]).unwrap_err();
        assert!(err.to_string().contains("Int64"), "{err}");
    }
}
