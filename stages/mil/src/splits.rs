//! Which slides train, validate and test a model, and the class list everybody indexes by.
//!
//! A dataset CSV with a `split` column is used as written. Otherwise slides are split by
//! patient (`case_id`; the slide itself when absent) so no patient is on two sides, stratified
//! by label so every split keeps the class proportions, either by fractions or as one fold of
//! a k-fold cross-validation. Survival datasets are stratified by the event indicator (every
//! split keeps the event rate), regression datasets form one stratum; their slides without a
//! target take no part (`sample` leaves them out).

use crate::error::MilError;
use crate::seeding::stream_rng;
use rand::seq::SliceRandom;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use tessera_pipeline::{slide_target, SlideHandle, SlideTarget, Task};

/// The role of a slide in an experiment.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    /// The name used in the dataset CSV and in the `split` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    /// Parses `train` / `val` / `test` (case-insensitive; `valid`, `validation` accepted).
    pub fn parse(s: &str) -> Option<Split> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" => Some(Split::Train),
            "val" | "valid" | "validation" => Some(Split::Val),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to split a dataset whose CSV has no `split` column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SplitParams {
    /// Fraction of the slides (whole patients at a time, per class) held out for validation.
    pub val_fraction: f64,
    /// Fraction of the slides (whole patients at a time, per class) held out for testing.
    /// Ignored with `folds`: the test set is then fold `fold`.
    pub test_fraction: f64,
    /// k-fold cross-validation: split the patients of every class into `folds` folds and test
    /// on fold `fold` (validation is then `val_fraction` of the remaining patients). 0 = no
    /// cross-validation.
    pub folds: usize,
    /// Which fold is the test set (0-based), with `folds`.
    pub fold: usize,
}

impl Default for SplitParams {
    fn default() -> Self {
        SplitParams {
            val_fraction: 0.15,
            test_fraction: 0.15,
            folds: 0,
            fold: 0,
        }
    }
}

impl SplitParams {
    /// Checks the fractions and the fold; the error names the field (relative to the params).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let frac = |name: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err((name.to_string(), format!("must be in [0, 1), got {v}")))
            }
        };
        frac("val_fraction", self.val_fraction)?;
        if self.folds == 0 {
            frac("test_fraction", self.test_fraction)?;
            if self.val_fraction + self.test_fraction >= 1.0 {
                return Err((
                    "test_fraction".into(),
                    format!(
                        "val_fraction + test_fraction = {} leaves no training slides",
                        self.val_fraction + self.test_fraction
                    ),
                ));
            }
        } else {
            if self.folds < 2 {
                return Err((
                    "folds".into(),
                    "needs at least 2 folds (or 0 for none)".into(),
                ));
            }
            if self.fold >= self.folds {
                return Err((
                    "fold".into(),
                    format!(
                        "fold {} does not exist with {} folds (0-based)",
                        self.fold, self.folds
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The classes of a dataset: its sorted unique labels. Class index `c` everywhere (model
/// outputs, `label_index`, `probs`) refers to `classes(slides)[c]`.
pub fn classes(slides: &[SlideHandle]) -> Vec<String> {
    slides
        .iter()
        .filter_map(|s| s.label.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The classes of a task, the order of `label_index` and of the model's outputs for
/// classification: [`classes`]; survival: `censored`, `event` (the strata, so `label_index`
/// is the event indicator); regression: `value`.
pub fn task_classes(task: Task, slides: &[SlideHandle]) -> Vec<String> {
    match task {
        Task::Classification => classes(slides),
        Task::Survival => vec![CENSORED.into(), EVENT.into()],
        Task::Regression => vec![VALUE.into()],
    }
}

/// Survival stratum of a censored slide.
pub const CENSORED: &str = "censored";
/// Survival stratum of a slide whose event was observed.
pub const EVENT: &str = "event";
/// The one stratum of regression.
pub const VALUE: &str = "value";

/// The stratum of a slide for its task (the `label` column `sample` writes): the label, the
/// event indicator (`event` / `censored`), or `value`; `None` without a label / target.
pub fn stratum(task: Task, slide: &SlideHandle) -> Option<String> {
    match task {
        Task::Classification => slide.label.clone(),
        _ => slide_target(task, slide).map(|t| match t {
            SlideTarget::Survival { event: true, .. } => EVENT.to_string(),
            SlideTarget::Survival { event: false, .. } => CENSORED.to_string(),
            SlideTarget::Value(_) => VALUE.to_string(),
        }),
    }
}

/// The split of every slide (in `slides` order). Deterministic in `seed`.
pub fn assign(
    slides: &[SlideHandle],
    seed: u64,
    params: &SplitParams,
) -> Result<Vec<Split>, MilError> {
    assign_for(Task::Classification, slides, seed, params)
}

/// [`assign`] for a task: stratified by [`stratum`]. Classification needs every slide's
/// label; survival and regression slides without a target are left out of the grouping (they
/// are marked `train` and never sampled).
pub fn assign_for(
    task: Task,
    slides: &[SlideHandle],
    seed: u64,
    params: &SplitParams,
) -> Result<Vec<Split>, MilError> {
    let given = slides.iter().filter(|s| s.split.is_some()).count();
    if given > 0 {
        return from_csv(slides, given);
    }
    params
        .validate()
        .map_err(|(field, message)| MilError::Split(format!("{field}: {message}")))?;
    if task == Task::Classification {
        if let Some(s) = slides.iter().find(|s| s.label.is_none()) {
            return Err(MilError::NoLabel {
                slide: s.id.clone(),
            });
        }
    }
    let keys: Vec<Option<String>> = slides.iter().map(|s| stratum(task, s)).collect();
    let groups = patient_groups(slides, &keys);
    let mut splits = vec![Split::Train; slides.len()];
    for (label, mut members) in strata(&keys, &groups) {
        members.shuffle(&mut stream_rng(seed, "splits", None, &label));
        let sizes: Vec<usize> = members.iter().map(|g| groups[*g].len()).collect();
        let stratum: Vec<Split> = if params.folds >= 2 {
            fold_assignment(&sizes, params)
        } else {
            fraction_assignment(&sizes, params.val_fraction, params.test_fraction)
        };
        for (group, split) in members.iter().zip(stratum) {
            for &slide in &groups[*group] {
                splits[slide] = split;
            }
        }
    }
    Ok(splits)
}

/// Splits written in the dataset CSV; all or none of the slides must have one.
fn from_csv(slides: &[SlideHandle], given: usize) -> Result<Vec<Split>, MilError> {
    if given < slides.len() {
        let missing: Vec<&str> = slides
            .iter()
            .filter(|s| s.split.is_none())
            .map(|s| s.id.as_str())
            .take(5)
            .collect();
        return Err(MilError::Split(format!(
            "the dataset CSV gives a split for {given} of {} slides; fill the `split` column for \
             every slide or for none (missing e.g. for {})",
            slides.len(),
            missing.join(", ")
        )));
    }
    slides
        .iter()
        .map(|s| {
            let text = s.split.as_deref().unwrap_or_default();
            Split::parse(text).ok_or_else(|| {
                MilError::Split(format!(
                    "slide `{}`: split `{text}` is not train, val or test",
                    s.id
                ))
            })
        })
        .collect()
}

/// Slides with a stratum grouped by patient, in a deterministic order (by patient key).
fn patient_groups(slides: &[SlideHandle], keys: &[Option<String>]) -> Vec<Vec<usize>> {
    let mut by_case: BTreeMap<(bool, &str), Vec<usize>> = BTreeMap::new();
    for (i, s) in slides.iter().enumerate() {
        if keys[i].is_none() {
            continue;
        }
        // A slide without a case is its own patient; the flag keeps a slide id that happens
        // to equal another slide's case id from joining that patient.
        let key = match &s.case_id {
            Some(case) => (true, case.as_str()),
            None => (false, s.id.as_str()),
        };
        by_case.entry(key).or_default().push(i);
    }
    by_case.into_values().collect()
}

/// Patient groups by their majority stratum (ties: the smallest).
fn strata(keys: &[Option<String>], groups: &[Vec<usize>]) -> BTreeMap<String, Vec<usize>> {
    let mut strata: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (g, members) in groups.iter().enumerate() {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for &i in members {
            *counts
                .entry(keys[i].as_deref().unwrap_or_default())
                .or_default() += 1;
        }
        let best = counts.values().copied().max().unwrap_or(0);
        let label = counts
            .iter()
            .find(|(_, c)| **c == best)
            .map(|(l, _)| *l)
            .unwrap_or_default();
        strata.entry(label.to_string()).or_default().push(g);
    }
    strata
}

/// Assigns groups (of `sizes` slides, in order) greedily to the split furthest below its
/// target number of slides; ties go to train, then test, then validation.
fn fraction_assignment(sizes: &[usize], val_fraction: f64, test_fraction: f64) -> Vec<Split> {
    let total: usize = sizes.iter().sum();
    let targets = [
        (
            Split::Train,
            (1.0 - val_fraction - test_fraction) * total as f64,
        ),
        (Split::Test, test_fraction * total as f64),
        (Split::Val, val_fraction * total as f64),
    ];
    greedy(sizes, &targets)
}

fn greedy(sizes: &[usize], targets: &[(Split, f64)]) -> Vec<Split> {
    let mut assigned = vec![0.0f64; targets.len()];
    sizes
        .iter()
        .map(|&size| {
            let mut best: Option<usize> = None;
            for (k, (_, target)) in targets.iter().enumerate() {
                if *target <= 0.0 {
                    continue;
                }
                let deficit = target - assigned[k];
                if best.is_none_or(|b| deficit > targets[b].1 - assigned[b]) {
                    best = Some(k);
                }
            }
            let k = best.unwrap_or(0);
            assigned[k] += size as f64;
            targets[k].0
        })
        .collect()
}

/// k-fold: groups go round to the fold with the fewest slides so far; fold `fold` tests, and
/// validation takes `val_fraction` of the whole stratum from the other folds.
fn fold_assignment(sizes: &[usize], params: &SplitParams) -> Vec<Split> {
    let mut fold_slides = vec![0usize; params.folds];
    let folds: Vec<usize> = sizes
        .iter()
        .map(|&size| {
            let f = (0..params.folds)
                .min_by_key(|&f| (fold_slides[f], f))
                .unwrap_or(0);
            fold_slides[f] += size;
            f
        })
        .collect();
    let total: usize = sizes.iter().sum();
    let rest: Vec<usize> = sizes
        .iter()
        .zip(&folds)
        .filter(|(_, f)| **f != params.fold)
        .map(|(s, _)| *s)
        .collect();
    let rest_total: usize = rest.iter().sum();
    let val_target = (params.val_fraction * total as f64).min(rest_total as f64);
    let targets = [
        (Split::Train, rest_total as f64 - val_target),
        (Split::Val, val_target),
    ];
    let mut rest_splits = greedy(&rest, &targets).into_iter();
    folds
        .iter()
        .map(|&f| {
            if f == params.fold {
                Split::Test
            } else {
                rest_splits.next().unwrap_or(Split::Train)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;
    use tessera_pipeline::Slide;

    fn slide(
        i: usize,
        label: Option<&str>,
        case: Option<String>,
        split: Option<&str>,
    ) -> SlideHandle {
        Arc::new(Slide {
            index: i,
            id: format!("s{i}"),
            path: None,
            label: label.map(str::to_string),
            split: split.map(str::to_string),
            case_id: case,
            mpp: None,
            extra: Default::default(),
        })
    }

    /// 40 patients with 1 to 3 slides each, 60% of them `A`, the rest `B`.
    fn grouped_dataset() -> Vec<SlideHandle> {
        let mut slides = Vec::new();
        for case in 0..40 {
            let label = if case % 5 < 3 { "A" } else { "B" };
            for _ in 0..(1 + case % 3) {
                slides.push(slide(
                    slides.len(),
                    Some(label),
                    Some(format!("p{case}")),
                    None,
                ));
            }
        }
        slides
    }

    fn count(slides: &[SlideHandle], splits: &[Split], split: Split, label: &str) -> usize {
        slides
            .iter()
            .zip(splits)
            .filter(|(s, sp)| **sp == split && s.label.as_deref() == Some(label))
            .count()
    }

    #[test]
    fn classes_are_sorted_unique_labels() {
        let slides = vec![
            slide(0, Some("luad"), None, None),
            slide(1, Some("brca"), None, None),
            slide(2, None, None, None),
            slide(3, Some("luad"), None, None),
        ];
        assert_eq!(classes(&slides), ["brca", "luad"]);
    }

    #[test]
    fn csv_splits_are_used_as_written() {
        let slides = vec![
            slide(0, Some("A"), None, Some("test")),
            slide(1, Some("A"), None, Some("train")),
            slide(2, None, None, Some("val")),
        ];
        let splits = assign(&slides, 1, &SplitParams::default()).unwrap();
        assert_eq!(splits, [Split::Test, Split::Train, Split::Val]);
    }

    #[test]
    fn partial_csv_splits_and_missing_labels_are_errors_naming_slides() {
        let slides = vec![
            slide(0, Some("A"), None, Some("test")),
            slide(1, Some("A"), None, None),
        ];
        let err = assign(&slides, 1, &SplitParams::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 of 2") && err.contains("s1"), "{err}");
        let slides = vec![slide(0, Some("A"), None, None), slide(1, None, None, None)];
        let err = assign(&slides, 1, &SplitParams::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`s1`") && err.contains("label"), "{err}");
    }

    #[test]
    fn no_patient_is_in_two_splits() {
        let slides = grouped_dataset();
        for seed in 0..5 {
            for params in [
                SplitParams::default(),
                SplitParams {
                    folds: 5,
                    fold: 2,
                    ..Default::default()
                },
            ] {
                let splits = assign(&slides, seed, &params).unwrap();
                let mut by_case: HashMap<&str, Split> = HashMap::new();
                for (s, sp) in slides.iter().zip(&splits) {
                    let case = s.case_id.as_deref().unwrap();
                    assert_eq!(
                        *by_case.entry(case).or_insert(*sp),
                        *sp,
                        "patient {case} split"
                    );
                }
                assert!(splits.contains(&Split::Test) && splits.contains(&Split::Val));
            }
        }
    }

    #[test]
    fn splits_are_stratified_by_label() {
        // 100 single-slide patients: 60 A, 40 B -> test 9 A + 6 B, val 9 A + 6 B.
        let slides: Vec<_> = (0..100)
            .map(|i| slide(i, Some(if i < 60 { "A" } else { "B" }), None, None))
            .collect();
        let splits = assign(&slides, 3, &SplitParams::default()).unwrap();
        assert_eq!(count(&slides, &splits, Split::Test, "A"), 9);
        assert_eq!(count(&slides, &splits, Split::Test, "B"), 6);
        assert_eq!(count(&slides, &splits, Split::Val, "A"), 9);
        assert_eq!(count(&slides, &splits, Split::Val, "B"), 6);
        // With patients of several slides the proportions hold within one patient.
        let slides = grouped_dataset();
        let splits = assign(&slides, 3, &SplitParams::default()).unwrap();
        for label in ["A", "B"] {
            let total = slides
                .iter()
                .filter(|s| s.label.as_deref() == Some(label))
                .count();
            let test = count(&slides, &splits, Split::Test, label) as f64;
            assert!(
                (test - 0.15 * total as f64).abs() <= 3.0,
                "{label}: {test} of {total}"
            );
        }
    }

    #[test]
    fn survival_splits_are_stratified_by_event_and_skip_slides_without_a_target() {
        // 100 slides: 30 events, 70 censored, 5 without a time.
        let slides: Vec<SlideHandle> = (0..105)
            .map(|i| {
                let mut extra = std::collections::BTreeMap::new();
                let time = if i < 100 {
                    format!("{}", i + 1)
                } else {
                    String::new()
                };
                extra.insert("time".to_string(), time);
                extra.insert(
                    "event".to_string(),
                    if i < 30 { "1" } else { "0" }.to_string(),
                );
                Arc::new(Slide {
                    index: i,
                    id: format!("s{i}"),
                    path: None,
                    label: None,
                    split: None,
                    case_id: None,
                    mpp: None,
                    extra,
                })
            })
            .collect();
        let splits = assign_for(Task::Survival, &slides, 3, &SplitParams::default()).unwrap();
        let events = |split: Split| (0..30).filter(|&i| splits[i] == split).count();
        let censored = |split: Split| (30..100).filter(|&i| splits[i] == split).count();
        // 15% of each stratum: 4.5 events and 10.5 censored slides per held-out split.
        for split in [Split::Test, Split::Val] {
            assert!(
                (4..=5).contains(&events(split)),
                "{split}: {}",
                events(split)
            );
            assert!(
                (10..=11).contains(&censored(split)),
                "{split}: {}",
                censored(split)
            );
        }
        assert_eq!(stratum(Task::Survival, &slides[0]).as_deref(), Some(EVENT));
        assert_eq!(stratum(Task::Survival, &slides[102]), None);
        // Classification of the same slides needs labels.
        assert!(assign(&slides, 3, &SplitParams::default()).is_err());
    }

    #[test]
    fn splits_are_deterministic_in_the_seed() {
        let slides = grouped_dataset();
        let params = SplitParams::default();
        let a = assign(&slides, 11, &params).unwrap();
        assert_eq!(a, assign(&slides, 11, &params).unwrap());
        assert_ne!(a, assign(&slides, 12, &params).unwrap());
    }

    #[test]
    fn every_patient_is_tested_in_exactly_one_fold() {
        let slides = grouped_dataset();
        let mut tested = vec![0usize; slides.len()];
        for fold in 0..4 {
            let params = SplitParams {
                folds: 4,
                fold,
                val_fraction: 0.1,
                ..Default::default()
            };
            let splits = assign(&slides, 5, &params).unwrap();
            let n_test = splits.iter().filter(|s| **s == Split::Test).count();
            assert!(
                (n_test as f64 - slides.len() as f64 / 4.0).abs() <= 3.0,
                "fold {fold}: {n_test}"
            );
            for (i, s) in splits.iter().enumerate() {
                tested[i] += usize::from(*s == Split::Test);
            }
        }
        assert!(tested.iter().all(|&t| t == 1), "{tested:?}");
    }

    #[test]
    fn params_are_validated() {
        let bad = SplitParams {
            val_fraction: 0.5,
            test_fraction: 0.5,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "test_fraction");
        let bad = SplitParams {
            folds: 3,
            fold: 3,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "fold");
        assert!(SplitParams {
            folds: 1,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SplitParams::default().validate().is_ok());
    }
}
