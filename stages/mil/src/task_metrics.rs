//! `metrics.json` of survival and regression runs: per split, the task's metrics
//! ([`tessera_stats::TaskMetrics`]: Harrell's and Uno's C-index; MAE, RMSE, Pearson r,
//! Spearman rho, R^2) with their bootstrap intervals (slides resampled within the event /
//! censored strata for survival, as one stratum for regression), and for survival the number
//! of events and the log-rank p-value of the median split of the split's predicted risk (the
//! high- against the low-risk half, as the Kaplan-Meier figure of `tessera report` draws it).

use crate::error::MilError;
use crate::evaluate::MetricsReport;
use crate::predictions::Prediction;
use crate::splits::Split;
use serde_json::{json, Map, Value};
use tessera_pipeline::Task;
use tessera_stats::{
    intervals_of, logrank_test, BootstrapConfig, Outcome, RegressionRows, SurvivalRows, TaskMetrics,
};

/// Splits reported, in order of preference for the top level.
const REPORTED: [Split; 3] = [Split::Test, Split::Val, Split::Train];

fn missing(p: &Prediction, what: &str) -> MilError {
    MilError::Prediction {
        slide: p.slide_id.clone(),
        message: format!(
            "a {what} prediction without its `{}` column",
            match what {
                "survival" => "time`/`event`/`risk",
                _ => "target`/`predicted_value",
            }
        ),
    }
}

/// A split's survival rows.
pub fn survival_rows(
    rows: &[&Prediction],
    reference: Option<&[Outcome]>,
) -> Result<SurvivalRows, MilError> {
    let mut outcomes = Vec::with_capacity(rows.len());
    let mut risk = Vec::with_capacity(rows.len());
    for p in rows {
        match (p.task.time, p.task.event, p.task.risk) {
            (Some(time), Some(event), Some(r)) => {
                outcomes.push(Outcome { time, event });
                risk.push(r);
            }
            _ => return Err(missing(p, "survival")),
        }
    }
    Ok(SurvivalRows {
        outcomes,
        risk,
        reference: reference.map(<[Outcome]>::to_vec),
    })
}

/// A split's regression rows.
pub fn regression_rows(rows: &[&Prediction]) -> Result<RegressionRows, MilError> {
    let mut truth = Vec::with_capacity(rows.len());
    let mut predicted = Vec::with_capacity(rows.len());
    for p in rows {
        match (p.task.target, p.task.predicted_value) {
            (Some(t), Some(v)) => {
                truth.push(t);
                predicted.push(v);
            }
            _ => return Err(missing(p, "regression")),
        }
    }
    Ok(RegressionRows { truth, predicted })
}

/// The high-risk flags of the median split of `risk` (strictly above the median).
pub fn median_split(risk: &[f64]) -> Vec<bool> {
    let mut sorted = risk.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    risk.iter().map(|&r| r > median).collect()
}

fn stats_error(e: tessera_stats::StatsError) -> MilError {
    MilError::Metrics(e.to_string())
}

/// One split's metrics (and intervals), plus warnings.
fn split_json(
    metrics: &dyn TaskMetrics,
    split: Split,
    bootstrap: Option<&BootstrapConfig>,
) -> Result<(Map<String, Value>, Vec<String>), MilError> {
    let mut json = Map::new();
    let mut warnings = Vec::new();
    json.insert("n".into(), json!(metrics.len()));
    let values = metrics.values(None).map_err(stats_error)?;
    for (name, v) in metrics.names().iter().zip(&values) {
        json.insert((*name).into(), json!(v));
    }
    if let Some(config) = bootstrap {
        if config.resamples > 0 {
            let intervals = intervals_of(&metrics.clusters(), config, metrics.names().len(), |w| {
                metrics.values(Some(w))
            })
            .map_err(stats_error)?;
            let mut ci = Map::new();
            let mut undefined = Vec::new();
            for (name, interval) in metrics.names().iter().zip(intervals) {
                if interval.is_none() {
                    undefined.push(*name);
                }
                ci.insert((*name).into(), json!(interval.map(|(lo, hi)| [lo, hi])));
            }
            if !undefined.is_empty() {
                warnings.push(format!(
                    "`evaluate` parameter `bootstrap`: no confidence interval for {} of the {} split (null in metrics.json): undefined in some resamples",
                    undefined.join(", "),
                    split.as_str()
                ));
            }
            json.insert("ci".into(), Value::Object(ci));
        }
        json.insert(
            "bootstrap".into(),
            json!({"resamples": config.resamples, "level": config.level, "seed": config.seed, "stratified": true}),
        );
    }
    Ok((json, warnings))
}

/// `metrics.json` of a survival or regression run: like classification's
/// ([`crate::evaluate::metrics_report`]) every split under its name and the test split's
/// metrics at the top level, with `task`. `reference`: the outcomes Uno's C-index estimates
/// the censoring distribution on (the whole dataset's).
pub fn task_metrics_report(
    task: Task,
    predictions: &[Prediction],
    reference: Option<&[Outcome]>,
    bootstrap: Option<&BootstrapConfig>,
) -> Result<MetricsReport, MilError> {
    let mut report = Map::new();
    let mut warnings = Vec::new();
    let mut top: Option<(Split, Map<String, Value>)> = None;
    for split in REPORTED {
        let rows: Vec<&Prediction> = predictions
            .iter()
            .filter(|p| Split::parse(&p.split) == Some(split))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let (mut json, w) = match task {
            Task::Survival => {
                let survival = survival_rows(&rows, reference)?;
                let (mut json, w) = split_json(&survival, split, bootstrap)?;
                let events = survival.outcomes.iter().filter(|o| o.event).count();
                json.insert("n_events".into(), json!(events));
                let groups = median_split(&survival.risk);
                let logrank = logrank_test(&survival.outcomes, &groups).map_err(stats_error)?;
                json.insert("logrank_p".into(), json!(logrank.map(|l| l.p_value)));
                json.insert(
                    "logrank_statistic".into(),
                    json!(logrank.map(|l| l.statistic)),
                );
                (json, w)
            }
            _ => split_json(&regression_rows(&rows)?, split, bootstrap)?,
        };
        json.insert("task".into(), json!(task.as_str()));
        warnings.extend(w);
        if top.is_none() {
            top = Some((split, json.clone()));
        }
        report.insert(split.as_str().to_string(), Value::Object(json));
    }
    let Some((split, mut out)) = top else {
        return Ok(MetricsReport {
            json: json!({ "n": 0, "task": task.as_str() }),
            warnings,
        });
    };
    out.insert("split".into(), json!(split.as_str()));
    out.extend(report);
    Ok(MetricsReport {
        json: Value::Object(out),
        warnings,
    })
}

/// A one-line summary of a survival or regression run's top-level metrics, for the log.
pub fn task_summary(metrics: &Value) -> String {
    let number = |k: &str| {
        metrics
            .get(k)
            .and_then(Value::as_f64)
            .map_or("n/a".to_string(), |v| format!("{v:.4}"))
    };
    let names: &[&str] = match metrics.get("task").and_then(Value::as_str) {
        Some("survival") => &["c_index", "c_index_uno", "logrank_p"],
        _ => &["mae", "rmse", "pearson", "spearman", "r2"],
    };
    let mut parts: Vec<String> = names.iter().map(|k| format!("{k}={}", number(k))).collect();
    if let Some(ci) = metrics
        .get("ci")
        .and_then(|c| c.get(names[0]))
        .and_then(Value::as_array)
    {
        if let (Some(lo), Some(hi)) = (
            ci.first().and_then(Value::as_f64),
            ci.get(1).and_then(Value::as_f64),
        ) {
            parts.push(format!("({} CI [{lo:.4}, {hi:.4}])", names[0]));
        }
    }
    format!(
        "{} n={}: {}",
        metrics
            .get("split")
            .and_then(Value::as_str)
            .unwrap_or("none"),
        metrics.get("n").and_then(Value::as_u64).unwrap_or(0),
        parts.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predictions::TaskValues;

    fn surv(id: &str, split: &str, time: f64, event: bool, risk: f64) -> Prediction {
        Prediction::for_task(
            id,
            split,
            if event { "event" } else { "censored" },
            usize::from(event),
            TaskValues {
                time: Some(time),
                event: Some(event),
                risk: Some(risk),
                ..Default::default()
            },
            vec![risk as f32],
        )
    }

    #[test]
    fn survival_report_has_c_index_logrank_and_intervals() {
        let rows: Vec<Prediction> = (0..30)
            .map(|i| {
                let t = f64::from(i + 1);
                surv(
                    &format!("s{i}"),
                    "test",
                    t,
                    i % 3 != 0,
                    -t + if i % 4 == 0 { 5.0 } else { 0.0 },
                )
            })
            .collect();
        let reference: Vec<Outcome> = rows
            .iter()
            .map(|p| Outcome {
                time: p.task.time.unwrap(),
                event: p.task.event.unwrap(),
            })
            .collect();
        let config = BootstrapConfig {
            resamples: 200,
            level: 0.95,
            seed: 1,
        };
        let report =
            task_metrics_report(Task::Survival, &rows, Some(&reference), Some(&config)).unwrap();
        let m = &report.json;
        assert_eq!(m["split"], "test");
        let c = m["c_index"].as_f64().unwrap();
        assert!(c > 0.8, "{m}");
        let ci = m["ci"]["c_index"].as_array().unwrap();
        assert!(ci[0].as_f64().unwrap() <= c && c <= ci[1].as_f64().unwrap());
        assert!(m["logrank_p"].as_f64().unwrap() < 0.05, "{m}");
        assert_eq!(m["n_events"], 20);
        assert!(task_summary(m).contains("c_index="));
    }

    #[test]
    fn regression_report_has_every_metric() {
        let rows: Vec<Prediction> = (0..20)
            .map(|i| {
                let t = f64::from(i);
                Prediction::for_task(
                    &format!("r{i}"),
                    if i < 10 { "val" } else { "test" },
                    "value",
                    0,
                    TaskValues {
                        target: Some(t),
                        predicted_value: Some(t + 0.5),
                        ..Default::default()
                    },
                    vec![0.0],
                )
            })
            .collect();
        let report = task_metrics_report(Task::Regression, &rows, None, None).unwrap();
        let m = &report.json;
        assert_eq!(m["split"], "test");
        assert!((m["mae"].as_f64().unwrap() - 0.5).abs() < 1e-12);
        assert!((m["val"]["pearson"].as_f64().unwrap() - 1.0).abs() < 1e-12);
        assert!(m.get("ci").is_none());
    }

    #[test]
    fn median_split_puts_half_above() {
        assert_eq!(
            median_split(&[1.0, 4.0, 2.0, 3.0]),
            [false, true, false, true]
        );
        assert_eq!(median_split(&[1.0, 2.0, 3.0]), [false, false, true]);
    }
}
