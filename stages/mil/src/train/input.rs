//! Gathers a slide's incoming rows (possibly several record batches) into a [`Bag`].

use arrow::array::Array;
use arrow::record_batch::RecordBatch;

use super::error::TrainError;
use crate::columns::{int64_values, read_embeddings, read_pixels, utf8, TilePixels};
use crate::models::{Bag, Split};
use crate::sample::{LABEL, SPLIT};
use crate::sparse_map::{MAP_I, MAP_J};
use tessera_pipeline::schema::{EMBEDDING, PIXELS};

/// The rows of one slide received so far in the current epoch.
#[derive(Debug, Default)]
pub struct BagRows {
    dim: Option<usize>,
    embeddings: Vec<f32>,
    /// Tile pixels, when the rows carry pixels instead of embeddings (end-to-end training).
    pixels: Option<Vec<TilePixels>>,
    positions: Vec<[i64; 2]>,
    split: Option<String>,
    label: Option<String>,
}

impl BagRows {
    /// Appends a batch; `spatial` reads `map_i`/`map_j` too. The instances are the
    /// `embedding` column, or the tile pixels when there is none (end-to-end training).
    pub fn append(
        &mut self,
        slide: &str,
        batch: &RecordBatch,
        spatial: bool,
    ) -> Result<(), TrainError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if batch.column_by_name(EMBEDDING).is_none() && batch.column_by_name(PIXELS).is_some() {
            self.pixels
                .get_or_insert_with(Vec::new)
                .extend(read_pixels(batch)?);
        } else {
            self.append_embeddings(slide, batch)?;
        }
        if spatial {
            let i = int64_values(batch, MAP_I, "the sparse CNN's map positions")?;
            let j = int64_values(batch, MAP_J, "the sparse CNN's map positions")?;
            self.positions
                .extend(i.into_iter().zip(j).map(|(i, j)| [i, j]));
        }
        let first = |name: &str| -> Result<Option<String>, TrainError> {
            let col = utf8(batch, name, "training")?;
            Ok((!col.is_null(0)).then(|| col.value(0).to_string()))
        };
        if self.split.is_none() {
            self.split = first(SPLIT)?;
        }
        if self.label.is_none() {
            self.label = first(LABEL)?;
        }
        Ok(())
    }

    fn append_embeddings(&mut self, slide: &str, batch: &RecordBatch) -> Result<(), TrainError> {
        let emb = read_embeddings(batch, EMBEDDING)?;
        if let Some(dim) = self.dim {
            if dim != emb.dim {
                return Err(TrainError::Slide {
                    slide: slide.into(),
                    message: format!(
                        "column `embedding` changes width from {dim} to {} within the slide",
                        emb.dim
                    ),
                });
            }
        }
        self.dim = Some(emb.dim);
        self.embeddings.extend_from_slice(&emb.values);
        Ok(())
    }

    /// The bag, or `None` when no row arrived (a slide without tiles cannot be classified).
    pub fn into_bag(self, slide: &str, classes: &[String]) -> Result<Option<Bag>, TrainError> {
        let Some(dim) = self.dim.or(self.pixels.as_ref().map(|_| 0)) else {
            return Ok(None);
        };
        if self.dim.is_some() && self.pixels.is_some() {
            return Err(TrainError::Slide {
                slide: slide.into(),
                message: "some batches carry embeddings and others tile pixels".into(),
            });
        }
        let bad = |message: String| TrainError::Slide {
            slide: slide.into(),
            message,
        };
        let split_name = self
            .split
            .ok_or_else(|| bad("column `split` is null".into()))?;
        let split = Split::parse(&split_name).ok_or_else(|| {
            bad(format!(
                "column `split` is `{split_name}`, not train, val or test"
            ))
        })?;
        let label = self
            .label
            .ok_or_else(|| bad("column `label` is null (the slide has no label)".into()))?;
        let label_index = classes.iter().position(|c| *c == label).ok_or_else(|| {
            bad(format!(
                "label `{label}` is not one of the dataset's classes {classes:?}"
            ))
        })?;
        if let Some(at) = self.embeddings.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "column `embedding` holds {} at instance {}; fix or drop the slide's features",
                self.embeddings[at],
                at / dim.max(1)
            )));
        }
        let n = match &self.pixels {
            Some(p) => p.len(),
            None => self.embeddings.len() / dim.max(1),
        };
        let positions = (!self.positions.is_empty()).then_some(self.positions);
        if let Some(p) = &positions {
            if p.len() != n {
                return Err(bad(format!("{} map positions for {n} embeddings", p.len())));
            }
        }
        Ok(Some(Bag {
            slide_id: slide.into(),
            label_index,
            split,
            dim,
            embeddings: self.embeddings.into(),
            positions,
            pixels: self.pixels,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn batch(rows: usize, split: &str, label: &str) -> RecordBatch {
        let values: Vec<f32> = (0..rows * 2).map(|v| v as f32).collect();
        let emb = crate::columns::embeddings_array(
            &values,
            &tessera_pipeline::schema::embedding_type(2, false),
        )
        .unwrap();
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("slide_id", Arc::new(StringArray::from(vec!["s"; rows]))),
            ("embedding", emb),
            ("split", Arc::new(StringArray::from(vec![split; rows]))),
            ("label", Arc::new(StringArray::from(vec![label; rows]))),
            (
                "map_i",
                Arc::new(Int64Array::from((0..rows as i64).collect::<Vec<_>>())),
            ),
            ("map_j", Arc::new(Int64Array::from(vec![3i64; rows]))),
        ];
        let schema = Schema::new(
            cols.iter()
                .map(|(n, a)| Field::new(*n, a.data_type().clone(), false))
                .collect::<Vec<_>>(),
        );
        RecordBatch::try_new(Arc::new(schema), cols.into_iter().map(|(_, a)| a).collect()).unwrap()
    }

    #[test]
    fn batches_of_one_slide_make_one_bag() {
        let classes = vec!["a".to_string(), "b".to_string()];
        let mut rows = BagRows::default();
        rows.append("s", &batch(2, "val", "b"), true).unwrap();
        rows.append("s", &batch(1, "val", "b"), true).unwrap();
        let bag = rows.into_bag("s", &classes).unwrap().unwrap();
        assert_eq!(bag.len(), 3);
        assert_eq!(bag.label_index, 1);
        assert_eq!(bag.split, Split::Val);
        assert_eq!(
            bag.positions.as_deref(),
            Some(&[[0, 3], [1, 3], [0, 3]][..])
        );
        assert_eq!(&bag.embeddings[..4], &[0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn unknown_labels_and_splits_name_the_slide() {
        let classes = vec!["a".to_string()];
        let mut rows = BagRows::default();
        rows.append("s9", &batch(1, "train", "zzz"), false).unwrap();
        let err = rows.into_bag("s9", &classes).unwrap_err().to_string();
        assert!(err.contains("s9") && err.contains("zzz"), "{err}");
        let mut rows = BagRows::default();
        rows.append("s9", &batch(1, "holdout", "a"), false).unwrap();
        assert!(rows
            .into_bag("s9", &classes)
            .unwrap_err()
            .to_string()
            .contains("holdout"));
        assert!(BagRows::default()
            .into_bag("s", &classes)
            .unwrap()
            .is_none());
    }
}
