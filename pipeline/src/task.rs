//! What an experiment predicts: a class (`label`), a time to event (`time`, `event`) or a
//! number (`target`). The task is a property of the dataset, so it is declared once at the top
//! of the experiment (`task: survival`) next to `dataset:`, every stage sees it in its
//! [`crate::BuildContext`], and the dataset CSV is checked against it when the experiment is
//! loaded, before any work: a missing column, a value that is not a number or an `event` that
//! is not 0/1 is an error naming the file and the line; a slide without a value is reported
//! (with its line) and left out by the stages that need it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The prediction task of an experiment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// A class per slide: the CSV's `label` column.
    #[default]
    Classification,
    /// Time to an event per slide: the CSV's `time` (any unit, >= 0) and `event` (1 = the
    /// event was observed at `time`, 0 = censored: still event-free at `time`).
    Survival,
    /// A number per slide: the CSV's `target` column.
    Regression,
}

/// The CSV column of a survival time.
pub const TIME: &str = "time";
/// The CSV column of a survival event indicator.
pub const EVENT: &str = "event";
/// The CSV column of a regression target.
pub const TARGET: &str = "target";

/// What a slide's dataset row says it should be predicted as.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SlideTarget {
    /// Survival: time and whether the event was observed.
    Survival { time: f64, event: bool },
    /// Regression: the value.
    Value(f64),
}

impl Task {
    /// The name used in the YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Survival => "survival",
            Task::Regression => "regression",
        }
    }

    /// The CSV columns this task reads its targets from (`label` is optional everywhere, as
    /// read by [`crate::slide::read_dataset`]; classification checks labels in its stages).
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            Task::Classification => &[],
            Task::Survival => &[TIME, EVENT],
            Task::Regression => &[TARGET],
        }
    }

    /// Checks one CSV row's target columns (`values`: column -> text as written). `Ok(None)`:
    /// a valid target or classification; `Ok(Some(column))`: the row has no value in `column`
    /// (the slide is reported and skipped); `Err`: a value that is not valid.
    pub fn check_row(
        self,
        values: &BTreeMap<String, String>,
    ) -> Result<Option<&'static str>, String> {
        for &column in self.columns() {
            if values.get(column).is_none_or(|v| v.trim().is_empty()) {
                return Ok(Some(column));
            }
        }
        self.target(values).map(|_| None)
    }

    /// The target of a row whose columns passed [`Task::check_row`]; `Ok(None)` for
    /// classification or a missing value.
    pub fn target(self, values: &BTreeMap<String, String>) -> Result<Option<SlideTarget>, String> {
        let value = |column: &str| {
            values
                .get(column)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        match self {
            Task::Classification => Ok(None),
            Task::Survival => {
                let (Some(time), Some(event)) = (value(TIME), value(EVENT)) else {
                    return Ok(None);
                };
                let time = number(TIME, time)?;
                if time < 0.0 {
                    return Err(format!(
                        "`{TIME}` {time} is negative; survival times are >= 0"
                    ));
                }
                let event = match event {
                    "1" | "1.0" => true,
                    "0" | "0.0" => false,
                    other => {
                        return Err(format!(
                            "`{EVENT}` `{other}` is not 0 (censored) or 1 (event observed)"
                        ))
                    }
                };
                Ok(Some(SlideTarget::Survival { time, event }))
            }
            Task::Regression => match value(TARGET) {
                None => Ok(None),
                Some(v) => Ok(Some(SlideTarget::Value(number(TARGET, v)?))),
            },
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn number(column: &str, text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| format!("`{column}` `{text}` is not a number"))
}

/// A slide's target, read from the dataset row kept in [`crate::Slide::extra`]; `None` for
/// classification and for a slide without a value (reported when the dataset was read).
pub fn slide_target(task: Task, slide: &crate::Slide) -> Option<SlideTarget> {
    task.target(&slide.extra).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn survival_rows_are_checked() {
        let t = Task::Survival;
        assert_eq!(
            t.target(&row(&[("time", "12.5"), ("event", "1")])).unwrap(),
            Some(SlideTarget::Survival {
                time: 12.5,
                event: true
            })
        );
        assert_eq!(
            t.check_row(&row(&[("time", ""), ("event", "1")])).unwrap(),
            Some("time")
        );
        assert_eq!(t.check_row(&row(&[("time", "3")])).unwrap(), Some("event"));
        let err = t
            .check_row(&row(&[("time", "abc"), ("event", "1")]))
            .unwrap_err();
        assert!(err.contains("`time` `abc` is not a number"), "{err}");
        let err = t
            .check_row(&row(&[("time", "3"), ("event", "yes")]))
            .unwrap_err();
        assert!(err.contains("not 0 (censored) or 1"), "{err}");
        assert!(t
            .check_row(&row(&[("time", "-1"), ("event", "0")]))
            .is_err());
    }

    #[test]
    fn regression_and_classification_rows() {
        assert_eq!(
            Task::Regression
                .target(&row(&[("target", "-0.5")]))
                .unwrap(),
            Some(SlideTarget::Value(-0.5))
        );
        assert!(Task::Regression
            .check_row(&row(&[("target", "inf")]))
            .is_err());
        assert_eq!(Task::Classification.check_row(&row(&[])).unwrap(), None);
    }
}
