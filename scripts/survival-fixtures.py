#!/usr/bin/env python3
"""Reference numbers for tessera-stats' survival and regression metrics.

Writes stages/stats/tests/fixtures/{survival,regression}.json: small random data sets (ties in
times and in risks, censoring, a set without events, one without censoring) and what the
established implementations compute on them:

- Harrell's C: lifelines.utils.concordance_index (which expects predicted *survival times*,
  so it gets -risk) and scikit-survival's concordance_index_censored (risk as is);
- Uno's C: scikit-survival's concordance_index_ipcw (censoring distribution from a reference
  set whose follow-up covers the test times), without and with tau;
- Kaplan-Meier: lifelines' KaplanMeierFitter at every unique time;
- log-rank: lifelines' logrank_test of the median split of the risk (risk > median);
- regression: numpy MAE/RMSE, scipy's pearsonr/spearmanr, scikit-learn's r2_score.

tests/survival_oracles.rs in the stats crate compares to 1e-9. Run from the repository root:

    python3 scripts/survival-fixtures.py

Needs numpy, scipy, scikit-learn, lifelines, scikit-survival (pip install lifelines
scikit-survival). The seed is fixed: rerunning rewrites identical files.
"""

import json
import os

import numpy as np
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from scipy import stats
from sklearn.metrics import r2_score
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.util import Surv

OUT = os.path.join(os.path.dirname(__file__), "..", "stages", "stats", "tests", "fixtures")


def survival_case(rng, n, event_rate, time_levels, risk_decimals):
    time = rng.integers(1, time_levels + 1, size=n).astype(float)
    event = rng.random(n) < event_rate
    # risk correlated with early events, plus noise; rounded so some risks tie
    risk = np.round(-0.05 * time + rng.normal(0, 0.5, size=n), risk_decimals)
    # the reference (training) set: more subjects, follow-up beyond every test time
    m = 3 * n
    ref_time = rng.integers(1, time_levels + 1, size=m).astype(float)
    ref_time[0] = time_levels + 1.0
    ref_event = rng.random(m) < event_rate
    ref_event[0] = False
    return time, event, risk, ref_time, ref_event


def survival_reference(time, event, risk, ref_time, ref_event):
    out = {
        "time": time.tolist(),
        "event": [bool(e) for e in event],
        "risk": risk.tolist(),
        "reference_time": ref_time.tolist(),
        "reference_event": [bool(e) for e in ref_event],
    }
    if event.any():
        out["harrell_lifelines"] = float(concordance_index(time, -risk, event))
        out["harrell_sksurv"] = float(concordance_index_censored(event, time, risk)[0])
        train = Surv.from_arrays(ref_event, ref_time)
        test = Surv.from_arrays(event, time)
        out["uno_sksurv"] = float(concordance_index_ipcw(train, test, risk)[0])
        tau = float(np.median(time))
        out["uno_tau"] = tau
        try:
            out["uno_sksurv_tau"] = float(concordance_index_ipcw(train, test, risk, tau=tau)[0])
        except Exception:  # no comparable pair before tau
            out["uno_sksurv_tau"] = None
    kmf = KaplanMeierFitter().fit(time, event)
    sf = kmf.survival_function_
    times = np.unique(time)
    out["km_times"] = times.tolist()
    out["km_survival"] = [float(sf.loc[t].iloc[0]) for t in times]
    group = risk > np.median(risk)
    out["group"] = [bool(g) for g in group]
    if group.any() and (~group).any():
        r = logrank_test(time[group], time[~group], event[group], event[~group])
        out["logrank_statistic"] = float(r.test_statistic)
        out["logrank_p"] = float(r.p_value)
    return out


def regression_case(rng, n, decimals):
    truth = np.round(rng.normal(10, 3, size=n), decimals)
    predicted = np.round(0.7 * truth + rng.normal(3, 1.5, size=n), decimals)
    return {
        "truth": truth.tolist(),
        "predicted": predicted.tolist(),
        "mae": float(np.mean(np.abs(truth - predicted))),
        "rmse": float(np.sqrt(np.mean((truth - predicted) ** 2))),
        "pearson": float(stats.pearsonr(truth, predicted)[0]),
        "spearman": float(stats.spearmanr(truth, predicted)[0]),
        "r2": float(r2_score(truth, predicted)),
    }


def main():
    rng = np.random.default_rng(20260214)
    cases = []
    for n, rate, levels, dec in [
        (8, 0.6, 5, 1),
        (20, 0.5, 8, 1),
        (40, 0.7, 12, 2),
        (100, 0.4, 30, 1),
        (150, 0.8, 60, 3),
    ]:
        cases.append(survival_reference(*survival_case(rng, n, rate, levels, dec)))
    # no censoring at all
    t, e, r, rt, re = survival_case(rng, 30, 1.0, 10, 1)
    cases.append(survival_reference(t, np.ones_like(e), r, rt, re))
    # every subject censored: no C-index, but Kaplan-Meier and (no) log-rank
    t, e, r, rt, re = survival_case(rng, 10, 0.0, 6, 1)
    cases.append(survival_reference(t, np.zeros_like(e), r, rt, re))
    regression = [regression_case(rng, n, d) for n, d in [(5, 1), (30, 0), (200, 2), (57, 1)]]
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "survival.json"), "w") as f:
        json.dump({"generator": "scripts/survival-fixtures.py", "cases": cases}, f, indent=1)
    with open(os.path.join(OUT, "regression.json"), "w") as f:
        json.dump({"generator": "scripts/survival-fixtures.py", "cases": regression}, f, indent=1)
    print(f"wrote {len(cases)} survival and {len(regression)} regression cases to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
