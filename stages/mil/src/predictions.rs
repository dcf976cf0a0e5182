//! The predictions table: one row per slide, emitted by `train` and consumed by `evaluate`
//! (and written to `predictions.parquet`). Class indices refer to [`crate::splits::classes`].
//!
//! One schema for every task, so the graph is typed before the task is known: the
//! classification columns, then nullable `time, event, risk` (survival) and `target,
//! predicted_value` (regression), null where they do not apply. For survival and regression,
//! `label` is the stratum (`event` / `censored`, or `value`), `label_index` its index, and
//! `probs` the model's raw outputs (survival `nll`: one logit per time bin; `cox` and
//! regression: one value).

use crate::columns::{int64_values, utf8};
use crate::error::MilError;
use crate::sample::{LABEL, SPLIT};
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Array, Float64Array, Int64Array, ListArray,
    StringArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Float32Type, Float64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::sync::Arc;
use tessera_pipeline::schema::SLIDE_ID;

/// Columns of the predictions table (`slide_id`, `split` and `label` are the bags' own:
/// [`SLIDE_ID`], [`SPLIT`], [`LABEL`]).
pub const LABEL_INDEX: &str = "label_index";
pub const PREDICTED_INDEX: &str = "predicted_index";
pub const PREDICTED: &str = "predicted";
pub const PROBS: &str = "probs";
pub const TIME: &str = "time";
pub const EVENT: &str = "event";
pub const RISK: &str = "risk";
pub const TARGET: &str = "target";
pub const PREDICTED_VALUE: &str = "predicted_value";

/// `slide_id: Utf8, split: Utf8, label: Utf8, label_index: Int64, predicted_index: Int64,
/// predicted: Utf8, probs: List<Float32>` (probabilities in class order, summing to 1).
pub fn predictions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(SLIDE_ID, DataType::Utf8, false),
        Field::new(SPLIT, DataType::Utf8, false),
        Field::new(LABEL, DataType::Utf8, false),
        Field::new(LABEL_INDEX, DataType::Int64, false),
        Field::new(PREDICTED_INDEX, DataType::Int64, false),
        Field::new(PREDICTED, DataType::Utf8, false),
        Field::new(PROBS, probs_type(), false),
        Field::new(TIME, DataType::Float64, true),
        Field::new(EVENT, DataType::Boolean, true),
        Field::new(RISK, DataType::Float64, true),
        Field::new(TARGET, DataType::Float64, true),
        Field::new(PREDICTED_VALUE, DataType::Float64, true),
    ]))
}

/// The survival / regression columns of a prediction (all `None` for classification).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TaskValues {
    /// Survival: time to event or censoring.
    pub time: Option<f64>,
    /// Survival: whether the event was observed.
    pub event: Option<bool>,
    /// Survival: predicted risk (higher: earlier event expected).
    pub risk: Option<f64>,
    /// Regression: the true value.
    pub target: Option<f64>,
    /// Regression: the predicted value, in the target's unit.
    pub predicted_value: Option<f64>,
}

fn probs_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Float32, true)))
}

/// One slide's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub slide_id: String,
    pub split: String,
    pub label: String,
    pub label_index: usize,
    pub predicted_index: usize,
    pub predicted: String,
    pub probs: Vec<f32>,
    /// Survival / regression columns.
    pub task: TaskValues,
}

impl Prediction {
    /// A prediction from class probabilities: the predicted class is the most probable one
    /// (the first on ties). Errors when the label is not one of `classes` or `probs` does
    /// not have one value per class.
    pub fn from_probs(
        slide_id: &str,
        split: &str,
        label: &str,
        classes: &[String],
        probs: Vec<f32>,
    ) -> Result<Self, MilError> {
        let bad = |message: String| MilError::Prediction {
            slide: slide_id.to_string(),
            message,
        };
        if probs.len() != classes.len() {
            return Err(bad(format!(
                "{} probabilities for {} classes",
                probs.len(),
                classes.len()
            )));
        }
        let label_index = classes.iter().position(|c| c == label).ok_or_else(|| {
            bad(format!(
                "label `{label}` is not one of the classes {classes:?}"
            ))
        })?;
        let predicted_index = probs
            .iter()
            .enumerate()
            .fold(None::<(usize, f32)>, |best, (i, &p)| match best {
                Some((_, b)) if b >= p => best,
                _ => Some((i, p)),
            })
            .map(|(i, _)| i)
            .unwrap_or(0);
        Ok(Prediction {
            slide_id: slide_id.to_string(),
            split: split.to_string(),
            label: label.to_string(),
            label_index,
            predicted_index,
            predicted: classes.get(predicted_index).cloned().unwrap_or_default(),
            probs,
            task: TaskValues::default(),
        })
    }

    /// A survival or regression prediction: `label` / `label_index` the slide's stratum,
    /// `outputs` the model's raw outputs, `task` the target and the score.
    pub fn for_task(
        slide_id: &str,
        split: &str,
        label: &str,
        label_index: usize,
        task: TaskValues,
        outputs: Vec<f32>,
    ) -> Self {
        Prediction {
            slide_id: slide_id.to_string(),
            split: split.to_string(),
            label: label.to_string(),
            label_index,
            predicted_index: label_index,
            predicted: label.to_string(),
            probs: outputs,
            task,
        }
    }
}

/// Rows as a batch of [`predictions_schema`].
pub fn to_batch(rows: &[Prediction]) -> Result<RecordBatch, MilError> {
    let strings = |f: fn(&Prediction) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let ints = |f: fn(&Prediction) -> usize| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| f(r) as i64),
        ))
    };
    let offsets = OffsetBuffer::from_lengths(rows.iter().map(|r| r.probs.len()));
    let values = Float32Array::from_iter_values(rows.iter().flat_map(|r| r.probs.iter().copied()));
    let probs = ListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, true)),
        offsets,
        Arc::new(values),
        None,
    )?;
    let floats = |f: fn(&TaskValues) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from_iter(rows.iter().map(|r| f(&r.task))))
    };
    Ok(RecordBatch::try_new(
        predictions_schema(),
        vec![
            strings(|r| &r.slide_id),
            strings(|r| &r.split),
            strings(|r| &r.label),
            ints(|r| r.label_index),
            ints(|r| r.predicted_index),
            strings(|r| &r.predicted),
            Arc::new(probs),
            floats(|t| t.time),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| r.task.event))),
            floats(|t| t.risk),
            floats(|t| t.target),
            floats(|t| t.predicted_value),
        ],
    )?)
}

/// Reads the rows of a predictions batch (extra columns are ignored).
pub fn from_batch(batch: &RecordBatch) -> Result<Vec<Prediction>, MilError> {
    const WHAT: &str = "the predictions table";
    let slide_id = utf8(batch, SLIDE_ID, WHAT)?;
    let split = utf8(batch, SPLIT, WHAT)?;
    let label = utf8(batch, LABEL, WHAT)?;
    let predicted = utf8(batch, PREDICTED, WHAT)?;
    let label_index = int64_values(batch, LABEL_INDEX, WHAT)?;
    let predicted_index = int64_values(batch, PREDICTED_INDEX, WHAT)?;
    let probs_col = batch
        .column_by_name(PROBS)
        .ok_or_else(|| MilError::MissingColumn {
            column: PROBS.into(),
            purpose: WHAT,
        })?;
    let probs = probs_col
        .as_list_opt::<i32>()
        .ok_or_else(|| MilError::WrongType {
            column: PROBS.into(),
            expected: "List<Float32>",
            found: probs_col.data_type().to_string(),
        })?;
    // Optional: predictions written before survival and regression lack them.
    let float = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<Float64Type>().cloned())
    };
    let (time, risk, target, predicted_value) = (
        float(TIME),
        float(RISK),
        float(TARGET),
        float(PREDICTED_VALUE),
    );
    let event = batch
        .column_by_name(EVENT)
        .and_then(|c| c.as_boolean_opt().cloned());
    let at = |a: &Option<Float64Array>, row: usize| {
        a.as_ref().filter(|a| a.is_valid(row)).map(|a| a.value(row))
    };
    let index = |v: i64, column: &str, row: usize| {
        usize::try_from(v).map_err(|_| MilError::Prediction {
            slide: slide_id.value(row).to_string(),
            message: format!("negative `{column}` {v}"),
        })
    };
    (0..batch.num_rows())
        .map(|row| {
            for (name, col) in [
                (SLIDE_ID, slide_id),
                (SPLIT, split),
                (LABEL, label),
                (PREDICTED, predicted),
            ] {
                if col.is_null(row) {
                    return Err(MilError::Null {
                        column: name.into(),
                        row,
                    });
                }
            }
            let values = probs.value(row);
            let values =
                values
                    .as_primitive_opt::<Float32Type>()
                    .ok_or_else(|| MilError::WrongType {
                        column: PROBS.into(),
                        expected: "List<Float32>",
                        found: probs_col.data_type().to_string(),
                    })?;
            Ok(Prediction {
                slide_id: slide_id.value(row).to_string(),
                split: split.value(row).to_string(),
                label: label.value(row).to_string(),
                label_index: index(label_index[row], LABEL_INDEX, row)?,
                predicted_index: index(predicted_index[row], PREDICTED_INDEX, row)?,
                predicted: predicted.value(row).to_string(),
                probs: values.values().to_vec(),
                task: TaskValues {
                    time: at(&time, row),
                    event: event
                        .as_ref()
                        .filter(|a| a.is_valid(row))
                        .map(|a| a.value(row)),
                    risk: at(&risk, row),
                    target: at(&target, row),
                    predicted_value: at(&predicted_value, row),
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    #[test]
    fn predictions_round_trip_through_a_batch() {
        let rows = vec![
            Prediction::from_probs("s1", "test", "b", &classes(), vec![0.2, 0.5, 0.3]).unwrap(),
            Prediction::from_probs("s2", "val", "a", &classes(), vec![0.1, 0.1, 0.8]).unwrap(),
        ];
        assert_eq!((rows[0].label_index, rows[0].predicted_index), (1, 1));
        assert_eq!(
            (rows[1].predicted_index, rows[1].predicted.as_str()),
            (2, "c")
        );
        let batch = to_batch(&rows).unwrap();
        assert_eq!(batch.schema(), predictions_schema());
        assert_eq!(from_batch(&batch).unwrap(), rows);
        assert_eq!(from_batch(&batch.slice(1, 1)).unwrap(), rows[1..]);
    }

    #[test]
    fn bad_predictions_name_the_slide() {
        let err =
            Prediction::from_probs("s9", "test", "z", &classes(), vec![0.2, 0.5, 0.3]).unwrap_err();
        assert!(
            err.to_string().contains("`s9`") && err.to_string().contains("`z`"),
            "{err}"
        );
        let err = Prediction::from_probs("s9", "test", "a", &classes(), vec![1.0]).unwrap_err();
        assert!(
            err.to_string().contains("1 probabilities for 3 classes"),
            "{err}"
        );
        // Ties go to the first class.
        let p = Prediction::from_probs("s", "test", "a", &classes(), vec![0.4, 0.4, 0.2]).unwrap();
        assert_eq!(p.predicted_index, 0);
    }
}
