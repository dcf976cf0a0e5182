//! tessera-stats against established implementations: lifelines, scikit-survival, scipy and
//! scikit-learn, on the fixtures written by `scripts/survival-fixtures.py` (random data with
//! tied times, tied risks and censoring). Every number must agree to 1e-9.

use serde_json::Value;
use tessera_stats::{
    harrell_c_index, kaplan_meier, logrank_test, uno_c_index, Outcome, RegressionMetrics,
};

const TOL: f64 = 1e-9;

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/survival-fixtures.py)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn bools(v: &Value, key: &str) -> Vec<bool> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_bool().unwrap())
        .collect()
}

fn outcomes(times: &[f64], events: &[bool]) -> Vec<Outcome> {
    times
        .iter()
        .zip(events)
        .map(|(&time, &event)| Outcome { time, event })
        .collect()
}

fn close(what: &str, case: usize, ours: f64, theirs: f64, worst: &mut f64) {
    let d = (ours - theirs).abs();
    *worst = worst.max(d);
    assert!(d <= TOL, "case {case}: {what} {ours} vs reference {theirs}");
}

#[test]
fn survival_metrics_match_lifelines_and_scikit_survival() {
    let data = fixture("survival.json");
    let cases = data["cases"].as_array().unwrap();
    let (mut harrell, mut uno, mut km_diff, mut logrank) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut compared = [0usize; 4];
    for (k, case) in cases.iter().enumerate() {
        let o = outcomes(&floats(case, "time"), &bools(case, "event"));
        let reference = outcomes(
            &floats(case, "reference_time"),
            &bools(case, "reference_event"),
        );
        let risk = floats(case, "risk");
        let c = harrell_c_index(&o, &risk, None).unwrap();
        match case.get("harrell_lifelines").and_then(Value::as_f64) {
            Some(expected) => {
                let c = c.expect("a C-index where lifelines has one");
                close("Harrell (lifelines)", k, c, expected, &mut harrell);
                close(
                    "Harrell (sksurv)",
                    k,
                    c,
                    case["harrell_sksurv"].as_f64().unwrap(),
                    &mut harrell,
                );
                compared[0] += 1;
                let u = uno_c_index(&reference, &o, &risk, None, None)
                    .unwrap()
                    .unwrap();
                close("Uno", k, u, case["uno_sksurv"].as_f64().unwrap(), &mut uno);
                let tau = case["uno_tau"].as_f64().unwrap();
                let u_tau = uno_c_index(&reference, &o, &risk, Some(tau), None).unwrap();
                match case["uno_sksurv_tau"].as_f64() {
                    Some(expected) => close("Uno (tau)", k, u_tau.unwrap(), expected, &mut uno),
                    None => assert_eq!(u_tau, None, "case {k}"),
                }
                compared[1] += 1;
            }
            None => assert_eq!(c, None, "case {k}: no event, no C-index"),
        }
        let km = kaplan_meier(&o, None, false);
        assert_eq!(km.times, floats(case, "km_times"), "case {k}");
        for (ours, theirs) in km.survival.iter().zip(floats(case, "km_survival")) {
            close("Kaplan-Meier", k, *ours, theirs, &mut km_diff);
        }
        compared[2] += 1;
        let test = logrank_test(&o, &bools(case, "group")).unwrap();
        match (test, case.get("logrank_p").and_then(Value::as_f64)) {
            (Some(t), Some(p)) => {
                close("log-rank p", k, t.p_value, p, &mut logrank);
                close(
                    "log-rank statistic",
                    k,
                    t.statistic,
                    case["logrank_statistic"].as_f64().unwrap(),
                    &mut logrank,
                );
                compared[3] += 1;
            }
            // No event: lifelines reports p = 1, tessera no test.
            (None, Some(p)) => assert_eq!(p, 1.0, "case {k}"),
            (t, p) => panic!("case {k}: log-rank {t:?} vs reference {p:?}"),
        }
    }
    assert!(compared.iter().all(|&n| n >= 5), "{compared:?}");
    println!(
        "max |diff|: Harrell {harrell:.1e}, Uno {uno:.1e}, Kaplan-Meier {km_diff:.1e}, log-rank {logrank:.1e}"
    );
}

#[test]
fn regression_metrics_match_scipy_and_scikit_learn() {
    let data = fixture("regression.json");
    let mut worst = 0.0f64;
    for (k, case) in data["cases"].as_array().unwrap().iter().enumerate() {
        let m =
            RegressionMetrics::compute(&floats(case, "truth"), &floats(case, "predicted"), None)
                .unwrap()
                .unwrap();
        close("MAE", k, m.mae, case["mae"].as_f64().unwrap(), &mut worst);
        close(
            "RMSE",
            k,
            m.rmse,
            case["rmse"].as_f64().unwrap(),
            &mut worst,
        );
        close(
            "Pearson",
            k,
            m.pearson.unwrap(),
            case["pearson"].as_f64().unwrap(),
            &mut worst,
        );
        close(
            "Spearman",
            k,
            m.spearman.unwrap(),
            case["spearman"].as_f64().unwrap(),
            &mut worst,
        );
        close("R2", k, m.r2, case["r2"].as_f64().unwrap(), &mut worst);
    }
    println!("max |diff| of the regression metrics: {worst:.1e}");
}
