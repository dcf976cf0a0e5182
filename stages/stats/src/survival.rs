//! Survival metrics on right-censored data: Harrell's and Uno's concordance indices, the
//! Kaplan-Meier estimator and the two-group log-rank test. Each follows one established
//! implementation exactly, so tessera's numbers compare with the papers that used it:
//! - Harrell's C as lifelines' `concordance_index`: a pair is comparable when the shorter time
//!   is an event (`T_i < T_j`, or `T_i == T_j` with `j` censored: a censored subject was still
//!   at risk at that time); two events at the same time are not comparable; tied risks count
//!   one half;
//! - Uno's C as scikit-survival's `concordance_index_ipcw`: the same pairs, each weighted by
//!   `1 / G(T_i)^2`, `G` the Kaplan-Meier estimate of the censoring distribution of a reference
//!   (training) set, risks within `1e-8` tied;
//! - Kaplan-Meier and the log-rank test as lifelines' `KaplanMeierFitter` / `logrank_test`.
//!
//! Every function takes optional per-row multiplicities (a bootstrap resample, see
//! [`crate::bootstrap`]): a multiplicity `k` gives exactly the statistic of the data set with
//! the row repeated `k` times. The concordance indices are O(n^2) pairs: fine for the
//! hundreds to few thousands of slides of a test split.

use crate::error::StatsError;

/// Tolerance under which scikit-survival counts two risks as tied (`tied_tol`).
pub const UNO_TIED_TOL: f64 = 1e-8;

/// One split's survival outcome and predicted risk (higher risk: earlier event expected).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Time to event or to censoring.
    pub time: f64,
    /// `true` for an observed event, `false` for a censored time.
    pub event: bool,
}

fn weight(weights: Option<&[u32]>, i: usize) -> f64 {
    weights.map_or(1.0, |w| f64::from(w[i]))
}

fn check_lengths(n: usize, others: &[(usize, &str)]) -> Result<(), StatsError> {
    for (len, what) in others {
        if *len != n {
            return Err(StatsError::Survival(format!(
                "{len} {what} for {n} outcomes"
            )));
        }
    }
    Ok(())
}

/// Whether `(i, j)` is a comparable pair with `i` the earlier event (lifelines' and
/// scikit-survival's rule).
fn comparable(i: &Outcome, j: &Outcome) -> bool {
    i.event && (i.time < j.time || (i.time == j.time && !j.event))
}

/// Harrell's concordance index of `risk` (higher = worse prognosis); `None` without a
/// comparable pair. `weights`: per-row multiplicities.
pub fn harrell_c_index(
    outcomes: &[Outcome],
    risk: &[f64],
    weights: Option<&[u32]>,
) -> Result<Option<f64>, StatsError> {
    check_lengths(outcomes.len(), &[(risk.len(), "risks")])?;
    if let Some(w) = weights {
        check_lengths(outcomes.len(), &[(w.len(), "weights")])?;
    }
    Ok(weighted_concordance(outcomes, risk, weights, |_| 1.0, 0.0))
}

/// The concordance of comparable pairs, pair `(i, j)` weighted by `w_i w_j ipcw(i)`, risks
/// within `tol` tied.
fn weighted_concordance(
    outcomes: &[Outcome],
    risk: &[f64],
    weights: Option<&[u32]>,
    ipcw: impl Fn(usize) -> f64,
    tol: f64,
) -> Option<f64> {
    let (mut numerator, mut denominator) = (0.0, 0.0);
    for (i, oi) in outcomes.iter().enumerate() {
        let wi = weight(weights, i) * ipcw(i);
        if !oi.event || wi == 0.0 {
            continue;
        }
        let (mut pairs, mut score) = (0.0, 0.0);
        for (j, oj) in outcomes.iter().enumerate() {
            let wj = weight(weights, j);
            if j == i || wj == 0.0 || !comparable(oi, oj) {
                continue;
            }
            pairs += wj;
            let d = risk[i] - risk[j];
            if d.abs() <= tol {
                score += 0.5 * wj;
            } else if d > 0.0 {
                score += wj;
            }
        }
        numerator += wi * score;
        denominator += wi * pairs;
    }
    // A denominator of 0 means no comparable pair (weights are non-negative).
    (denominator > 0.0).then(|| numerator / denominator)
}

/// A step function `S(t)` from the Kaplan-Meier estimator: `S` at each unique observed time.
#[derive(Debug, Clone, PartialEq)]
pub struct KaplanMeier {
    /// Unique observed times (events and censorings), increasing.
    pub times: Vec<f64>,
    /// `S(t)` just after each time (right-continuous).
    pub survival: Vec<f64>,
    /// Subjects at risk just before each time.
    pub at_risk: Vec<f64>,
    /// Events at each time.
    pub events: Vec<f64>,
}

impl KaplanMeier {
    /// The estimate at `t` (1 before the first time).
    pub fn at(&self, t: f64) -> f64 {
        match self.times.iter().rposition(|&u| u <= t) {
            Some(k) => self.survival[k],
            None => 1.0,
        }
    }
}

/// Unique times with, per time, the weighted number of events and of all exits.
fn counts(outcomes: &[Outcome], weights: Option<&[u32]>) -> Vec<(f64, f64, f64)> {
    let mut order: Vec<usize> = (0..outcomes.len())
        .filter(|&i| weight(weights, i) > 0.0)
        .collect();
    order.sort_by(|&a, &b| outcomes[a].time.total_cmp(&outcomes[b].time));
    let mut out: Vec<(f64, f64, f64)> = Vec::new();
    for i in order {
        let (t, w) = (outcomes[i].time, weight(weights, i));
        let d = if outcomes[i].event { w } else { 0.0 };
        match out.last_mut() {
            Some(last) if last.0 == t => {
                last.1 += d;
                last.2 += w;
            }
            _ => out.push((t, d, w)),
        }
    }
    out
}

/// The Kaplan-Meier estimate of the survival function (lifelines' `KaplanMeierFitter`,
/// without its time 0 row). `reverse`: of the censoring distribution instead (censorings are
/// the events; events at a time leave the risk set before the censorings at that time, as
/// scikit-survival's `kaplan_meier_estimator(reverse=True)`).
pub fn kaplan_meier(outcomes: &[Outcome], weights: Option<&[u32]>, reverse: bool) -> KaplanMeier {
    let counts = counts(outcomes, weights);
    let mut at_risk: f64 = counts.iter().map(|c| c.2).sum();
    let mut km = KaplanMeier {
        times: Vec::with_capacity(counts.len()),
        survival: Vec::with_capacity(counts.len()),
        at_risk: Vec::with_capacity(counts.len()),
        events: Vec::with_capacity(counts.len()),
    };
    let mut s = 1.0;
    for (t, d, exits) in counts {
        let (n, e) = if reverse {
            (at_risk - d, exits - d)
        } else {
            (at_risk, d)
        };
        if e > 0.0 && n > 0.0 {
            s *= 1.0 - e / n;
        }
        km.times.push(t);
        km.survival.push(s);
        km.at_risk.push(n);
        km.events.push(e);
        at_risk -= exits;
    }
    km
}

/// Uno's concordance index (scikit-survival's `concordance_index_ipcw`): Harrell's pairs
/// weighted by `1 / G(T_i)^2`, `G` the censoring distribution of `reference` (the training
/// outcomes; every time of `outcomes` with an event must lie within its follow-up). Events at
/// or after `tau` do not count as the earlier member of a pair. `None` without a comparable
/// pair.
pub fn uno_c_index(
    reference: &[Outcome],
    outcomes: &[Outcome],
    risk: &[f64],
    tau: Option<f64>,
    weights: Option<&[u32]>,
) -> Result<Option<f64>, StatsError> {
    check_lengths(outcomes.len(), &[(risk.len(), "risks")])?;
    if let Some(w) = weights {
        check_lengths(outcomes.len(), &[(w.len(), "weights")])?;
    }
    let censoring = censoring_distribution(reference);
    let mut ipcw = vec![0.0; outcomes.len()];
    for (i, o) in outcomes.iter().enumerate() {
        if !o.event || tau.is_some_and(|tau| o.time >= tau) {
            continue;
        }
        let g = censoring.at(o.time)?;
        if g <= 0.0 {
            return Err(StatsError::Survival(format!(
                "the censoring distribution is 0 at time {}: Uno's C is undefined there (use a tau before it)",
                o.time
            )));
        }
        ipcw[i] = 1.0 / (g * g);
    }
    Ok(weighted_concordance(
        outcomes,
        risk,
        weights,
        |i| ipcw[i],
        UNO_TIED_TOL,
    ))
}

/// `G(t)`: the censoring distribution estimated on a reference set.
struct Censoring {
    /// `None` when nothing was censored: `G = 1` everywhere.
    km: Option<KaplanMeier>,
}

fn censoring_distribution(reference: &[Outcome]) -> Censoring {
    Censoring {
        km: reference
            .iter()
            .any(|o| !o.event)
            .then(|| kaplan_meier(reference, None, true)),
    }
}

impl Censoring {
    fn at(&self, t: f64) -> Result<f64, StatsError> {
        let Some(km) = &self.km else {
            return Ok(1.0);
        };
        let last = km.times.last().copied().unwrap_or(f64::NEG_INFINITY);
        let g_last = km.survival.last().copied().unwrap_or(1.0);
        if t > last {
            if g_last > 0.0 {
                return Err(StatsError::Survival(format!(
                    "time {t} lies beyond the reference set's follow-up ({last}): the censoring distribution is unknown there"
                )));
            }
            return Ok(0.0);
        }
        Ok(km.at(t))
    }
}

/// The two-group log-rank test (lifelines' `logrank_test`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogRank {
    /// The chi-squared statistic (1 degree of freedom).
    pub statistic: f64,
    /// Its upper-tail p-value.
    pub p_value: f64,
}

/// Log-rank test of `group` (true / false) on `outcomes`; `None` when a group is empty or
/// there is no event.
pub fn logrank_test(outcomes: &[Outcome], group: &[bool]) -> Result<Option<LogRank>, StatsError> {
    check_lengths(outcomes.len(), &[(group.len(), "group flags")])?;
    if group.iter().all(|&g| g) || group.iter().all(|&g| !g) {
        return Ok(None);
    }
    let mut order: Vec<usize> = (0..outcomes.len()).collect();
    order.sort_by(|&a, &b| outcomes[a].time.total_cmp(&outcomes[b].time));
    let mut n = outcomes.len() as f64;
    let mut n1 = group.iter().filter(|&&g| g).count() as f64;
    let (mut observed_minus_expected, mut variance) = (0.0, 0.0);
    let mut k = 0;
    while k < order.len() {
        let t = outcomes[order[k]].time;
        let (mut d, mut d1, mut exits, mut exits1) = (0.0, 0.0, 0.0, 0.0);
        while k < order.len() && outcomes[order[k]].time == t {
            let i = order[k];
            let in1 = group[i];
            if outcomes[i].event {
                d += 1.0;
                if in1 {
                    d1 += 1.0;
                }
            }
            exits += 1.0;
            if in1 {
                exits1 += 1.0;
            }
            k += 1;
        }
        if d > 0.0 {
            observed_minus_expected += d1 - d * n1 / n;
            if n > 1.0 {
                variance += d * (n1 / n) * (1.0 - n1 / n) * (n - d) / (n - 1.0);
            }
        }
        n -= exits;
        n1 -= exits1;
    }
    if variance <= 0.0 {
        return Ok(None);
    }
    let statistic = observed_minus_expected * observed_minus_expected / variance;
    Ok(Some(LogRank {
        statistic,
        p_value: chi2_sf_1(statistic),
    }))
}

/// Upper tail of the chi-squared distribution with one degree of freedom.
pub fn chi2_sf_1(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    libm::erfc((x / 2.0).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(time: f64, event: bool) -> Outcome {
        Outcome { time, event }
    }

    #[test]
    fn harrell_counts_pairs_by_hand() {
        // Pairs with an earlier event: (0,1) (0,2) (0,3) (2,1)? 2 is censored: no. (1,3): yes.
        let outcomes = [o(1.0, true), o(2.0, true), o(3.0, false), o(4.0, false)];
        // Risks: 0 highest (concordant with 1,2,3), 1 vs 2: risk 0.5 < 0.7 discordant,
        // 1 vs 3: 0.5 == 0.5 tie.
        let risk = [0.9, 0.5, 0.7, 0.5];
        let c = harrell_c_index(&outcomes, &risk, None).unwrap().unwrap();
        assert!((c - (3.0 + 0.0 + 0.5) / 5.0).abs() < 1e-12, "{c}");
        // A multiplicity of 2 is the row repeated.
        let w = [1, 2, 1, 1];
        let repeated = [
            outcomes[0],
            outcomes[1],
            outcomes[1],
            outcomes[2],
            outcomes[3],
        ];
        let repeated_risk = [0.9, 0.5, 0.5, 0.7, 0.5];
        assert_eq!(
            harrell_c_index(&outcomes, &risk, Some(&w)).unwrap(),
            harrell_c_index(&repeated, &repeated_risk, None).unwrap()
        );
        assert_eq!(
            harrell_c_index(&[o(1.0, false)], &[0.0], None).unwrap(),
            None
        );
    }

    #[test]
    fn chi2_tail_matches_known_values() {
        // chi2(1).sf(3.841458820694124) = 0.05
        assert!((chi2_sf_1(3.841458820694124) - 0.05).abs() < 1e-12);
        assert_eq!(chi2_sf_1(0.0), 1.0);
    }

    #[test]
    fn kaplan_meier_by_hand() {
        let km = kaplan_meier(
            &[o(1.0, true), o(2.0, false), o(3.0, true), o(3.0, true)],
            None,
            false,
        );
        assert_eq!(km.times, [1.0, 2.0, 3.0]);
        assert!((km.survival[0] - 0.75).abs() < 1e-15);
        assert!((km.survival[1] - 0.75).abs() < 1e-15);
        assert!(km.survival[2].abs() < 1e-15);
        assert_eq!(km.at(0.5), 1.0);
        assert_eq!(km.at(2.5), km.survival[1]);
    }
}
