//! The training objective of the experiment's task: what the model's outputs mean, the loss
//! that trains them ([`task_loss`], one function for the main outputs and for any auxiliary
//! outputs a model trains with the task's own loss), the score a prediction is judged by, and
//! the loss of the best constant predictor (what a model that learned nothing reaches).
//!
//! - **classification**: one logit per class, cross-entropy ([`super::epochs::loss`]).
//! - **survival, `nll`**: the discrete-time negative log-likelihood of Zadeh & Schmid (2021) as
//!   Patch-GCN and PORPOISE train it (mahmoodlab, `utils/utils.py` `nll_loss`): the follow-up
//!   is cut into `survival_bins` bins at the quantiles of the **uncensored training** times
//!   (bins closed on the left, the first and last open-ended), the model gives one logit per
//!   bin, hazards `h = sigmoid(logits)`, survival `S_k = prod_{j<=k} (1 - h_j)`; a slide with
//!   an event in bin `y` contributes `-log S_{y-1} - log h_y` (`S_{-1} = 1`), a slide censored
//!   in bin `y` `-log S_y` (it survived bin `y`); `survival_alpha` up-weights the uncensored
//!   term as `(1 - alpha) * nll + alpha * uncensored`; probabilities clamped at 1e-7 inside the
//!   logs, as there. The predicted risk is `-sum_k S_k` (higher: earlier event).
//! - **survival, `cox`**: the negative Cox partial log-likelihood of one output `theta` (the
//!   log relative hazard, also the risk) with Breslow's handling of tied times: for every
//!   event `i`, `-(theta_i - log sum_{j: T_j >= T_i} exp theta_j)`, averaged over the batch's
//!   events (0 for a batch without one). The risk sets are the batch's slides, so larger
//!   `batch_size` gives a better approximation of the cohort's partial likelihood.
//! - **regression**: one output, the target standardised by the training slides' mean and
//!   standard deviation (so the defaults fit any unit); `mse` or `huber` (`huber_delta`, in
//!   standard deviations; torch's `HuberLoss`). Predictions are mapped back to the target's
//!   unit.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tessera_pipeline::{SlideTarget, Task};

use crate::models::{Bag, Split};

/// Probabilities are clamped at this inside the logs of the discrete-time NLL (Patch-GCN's
/// `eps`).
pub const NLL_EPS: f64 = 1e-7;

/// The survival loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SurvivalLoss {
    /// Discrete-time negative log-likelihood over `survival_bins` time bins (Patch-GCN,
    /// PORPOISE).
    Nll,
    /// Cox partial likelihood (Breslow ties) of one output, risk sets within each batch (the
    /// default: see `TrainParams::survival_loss`).
    #[default]
    Cox,
}

/// The regression loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegressionLoss {
    /// Mean squared error of the standardised target.
    #[default]
    Mse,
    /// Huber loss of the standardised target (quadratic within `huber_delta`, linear beyond).
    Huber,
}

/// The task settings of the `train` stage's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectiveConfig {
    pub survival_loss: SurvivalLoss,
    pub survival_bins: usize,
    pub survival_alpha: f64,
    pub regression_loss: RegressionLoss,
    pub huber_delta: f64,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig {
            survival_loss: SurvivalLoss::Cox,
            survival_bins: 4,
            survival_alpha: 0.0,
            regression_loss: RegressionLoss::Mse,
            huber_delta: 1.0,
        }
    }
}

/// Why an objective cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    #[error("slide `{0}` has no target in the dataset (task {1})")]
    NoTarget(String, Task),
    #[error("no uncensored training slide: the time bins of the `nll` survival loss are quantiles of the training slides' event times (use `survival_loss: cox`, or give the training split events)")]
    NoEvents,
    #[error("no training slide with a target")]
    NoTraining,
}

/// What the model is trained for, fitted on the training slides.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    /// Cross-entropy over the classes (targets are the bags' `label_index`).
    Classification,
    /// Time-to-event, targets by slide id.
    Survival {
        loss: SurvivalLoss,
        targets: HashMap<String, (f64, bool)>,
        /// Interior bin edges (`nll`; empty for `cox`), increasing.
        cuts: Vec<f64>,
        n_bins: usize,
        alpha: f64,
    },
    /// A number, targets by slide id, standardised with the training mean and std.
    Regression {
        loss: RegressionLoss,
        targets: HashMap<String, f64>,
        mean: f64,
        std: f64,
        huber_delta: f64,
    },
}

/// Linear-interpolation quantile of sorted values (numpy's default, which pandas' `qcut`
/// uses for Patch-GCN's bins).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    sorted[below] + (sorted[above] - sorted[below]) * (position - below as f64)
}

impl Objective {
    /// The objective of `task`, fitted on the training slides among `train_ids` (bins of the
    /// event times, target mean and std); `targets` holds every slide's target.
    pub fn fit(
        task: Task,
        config: &ObjectiveConfig,
        targets: &HashMap<String, SlideTarget>,
        train_ids: &[&str],
    ) -> Result<Objective, ObjectiveError> {
        match task {
            Task::Classification => Ok(Objective::Classification),
            Task::Survival => {
                let targets: HashMap<String, (f64, bool)> = targets
                    .iter()
                    .filter_map(|(id, t)| match t {
                        SlideTarget::Survival { time, event } => {
                            Some((id.clone(), (*time, *event)))
                        }
                        SlideTarget::Value(_) => None,
                    })
                    .collect();
                let cuts = match config.survival_loss {
                    SurvivalLoss::Cox => Vec::new(),
                    SurvivalLoss::Nll => {
                        let mut times: Vec<f64> = train_ids
                            .iter()
                            .filter_map(|id| targets.get(*id))
                            .filter(|(_, event)| *event)
                            .map(|(time, _)| *time)
                            .collect();
                        if times.is_empty() {
                            return Err(ObjectiveError::NoEvents);
                        }
                        times.sort_by(f64::total_cmp);
                        let n = config.survival_bins.max(1);
                        let mut cuts: Vec<f64> = (1..n)
                            .map(|k| quantile(&times, k as f64 / n as f64))
                            .collect();
                        cuts.dedup();
                        cuts
                    }
                };
                Ok(Objective::Survival {
                    loss: config.survival_loss,
                    targets,
                    cuts,
                    n_bins: config.survival_bins.max(1),
                    alpha: config.survival_alpha,
                })
            }
            Task::Regression => {
                let targets: HashMap<String, f64> = targets
                    .iter()
                    .filter_map(|(id, t)| match t {
                        SlideTarget::Value(v) => Some((id.clone(), *v)),
                        SlideTarget::Survival { .. } => None,
                    })
                    .collect();
                let values: Vec<f64> = train_ids
                    .iter()
                    .filter_map(|id| targets.get(*id))
                    .copied()
                    .collect();
                if values.is_empty() {
                    return Err(ObjectiveError::NoTraining);
                }
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>()
                    / values.len() as f64;
                Ok(Objective::Regression {
                    loss: config.regression_loss,
                    targets,
                    mean,
                    std: if var > 0.0 { var.sqrt() } else { 1.0 },
                    huber_delta: config.huber_delta,
                })
            }
        }
    }

    /// The task this objective trains.
    pub fn task(&self) -> Task {
        match self {
            Objective::Classification => Task::Classification,
            Objective::Survival { .. } => Task::Survival,
            Objective::Regression { .. } => Task::Regression,
        }
    }

    /// The model's number of outputs: classes, time bins (`nll`), or 1 (`cox`, regression).
    pub fn width(task: Task, config: &ObjectiveConfig, n_classes: usize) -> usize {
        match (task, config.survival_loss) {
            (Task::Classification, _) => n_classes,
            (Task::Survival, SurvivalLoss::Nll) => config.survival_bins.max(1),
            (Task::Survival, SurvivalLoss::Cox) | (Task::Regression, _) => 1,
        }
    }

    /// Names of the model's outputs, stored as the checkpoint's `classes` (heatmaps name
    /// their score columns by them): the classes; `hazard_0..` per time bin (`nll`); `risk`
    /// (`cox`); `value` (regression, standardised).
    pub fn output_names(task: Task, config: &ObjectiveConfig, classes: &[String]) -> Vec<String> {
        match (task, config.survival_loss) {
            (Task::Classification, _) => classes.to_vec(),
            (Task::Survival, SurvivalLoss::Nll) => (0..config.survival_bins.max(1))
                .map(|k| format!("hazard_{k}"))
                .collect(),
            (Task::Survival, SurvivalLoss::Cox) => vec!["risk".into()],
            (Task::Regression, _) => vec!["value".into()],
        }
    }

    /// The discrete time bin of `time` (`nll`): the number of cuts at or below it.
    pub fn bin(&self, time: f64) -> usize {
        match self {
            Objective::Survival { cuts, n_bins, .. } => {
                cuts.iter().filter(|&&c| c <= time).count().min(n_bins - 1)
            }
            _ => 0,
        }
    }

    fn survival_of(&self, slide: &str) -> Result<(f64, bool), ObjectiveError> {
        match self {
            Objective::Survival { targets, .. } => targets
                .get(slide)
                .copied()
                .ok_or_else(|| ObjectiveError::NoTarget(slide.to_string(), Task::Survival)),
            _ => Err(ObjectiveError::NoTarget(slide.to_string(), self.task())),
        }
    }

    /// A slide's (time, event), for survival.
    pub fn survival_target(&self, slide: &str) -> Option<(f64, bool)> {
        self.survival_of(slide).ok()
    }

    /// A slide's target in its own unit, for regression.
    pub fn regression_target(&self, slide: &str) -> Option<f64> {
        match self {
            Objective::Regression { targets, .. } => targets.get(slide).copied(),
            _ => None,
        }
    }

    /// The standardised regression target of a slide.
    fn standardized(&self, slide: &str) -> Result<f64, ObjectiveError> {
        match self {
            Objective::Regression {
                targets, mean, std, ..
            } => targets
                .get(slide)
                .map(|v| (v - mean) / std)
                .ok_or_else(|| ObjectiveError::NoTarget(slide.to_string(), Task::Regression)),
            _ => Err(ObjectiveError::NoTarget(slide.to_string(), self.task())),
        }
    }

    /// The score a slide's outputs give: survival risk (higher = earlier event expected;
    /// `nll`: `-sum_k S_k`, `cox`: the output) or the regression prediction in the target's
    /// unit; `None` for classification.
    pub fn score(&self, outputs: &[f32]) -> Option<f64> {
        match self {
            Objective::Classification => None,
            Objective::Survival {
                loss: SurvivalLoss::Cox,
                ..
            } => outputs.first().map(|&v| f64::from(v)),
            Objective::Survival {
                loss: SurvivalLoss::Nll,
                ..
            } => {
                let mut s = 1.0;
                let mut total = 0.0;
                for &logit in outputs {
                    let h = 1.0 / (1.0 + (-f64::from(logit)).exp());
                    s *= 1.0 - h;
                    total += s;
                }
                Some(-total)
            }
            Objective::Regression { mean, std, .. } => {
                outputs.first().map(|&v| mean + std * f64::from(v))
            }
        }
    }

    /// The training loss of the best constant predictor on `bags`' training split: the class
    /// prior's entropy (classification, see `Trainer::constant_loss`), the NLL of the training
    /// cohort's own discrete hazards (`nll`: events in a bin over slides reaching it), the
    /// loss of predicting the training mean (regression). `None` for `cox`, whose batch-wise
    /// loss has no fixed constant value (its "learned nothing" check is the validation
    /// C-index), and for classification (computed by the trainer).
    pub fn constant_loss(&self, bags: &[Bag]) -> Option<f64> {
        let train: Vec<&Bag> = bags.iter().filter(|b| b.split == Split::Train).collect();
        if train.is_empty() {
            return None;
        }
        match self {
            Objective::Classification
            | Objective::Survival {
                loss: SurvivalLoss::Cox,
                ..
            } => None,
            Objective::Survival { n_bins, alpha, .. } => {
                let rows: Vec<(usize, bool)> = train
                    .iter()
                    .filter_map(|b| self.survival_target(&b.slide_id))
                    .map(|(t, e)| (self.bin(t), e))
                    .collect();
                if rows.is_empty() {
                    return None;
                }
                let hazards: Vec<f64> = (0..*n_bins)
                    .map(|k| {
                        let reaching = rows.iter().filter(|(y, _)| *y >= k).count();
                        let events = rows.iter().filter(|(y, e)| *y == k && *e).count();
                        if reaching == 0 {
                            0.5
                        } else {
                            events as f64 / reaching as f64
                        }
                    })
                    .collect();
                let total: f64 = rows
                    .iter()
                    .map(|&(y, e)| nll_of(&hazards, y, e, *alpha))
                    .sum();
                Some(total / rows.len() as f64)
            }
            Objective::Regression {
                loss, huber_delta, ..
            } => {
                let z: Vec<f64> = train
                    .iter()
                    .filter_map(|b| self.standardized(&b.slide_id).ok())
                    .collect();
                if z.is_empty() {
                    return None;
                }
                let total: f64 = z.iter().map(|&d| point_loss(*loss, *huber_delta, d)).sum();
                Some(total / z.len() as f64)
            }
        }
    }

    /// The loss of predicting the training mean on `bags` (regression's reference on
    /// validation), `None` for the other tasks.
    pub fn mean_predictor_loss(&self, bags: &[&Bag]) -> Option<f64> {
        match self {
            Objective::Regression {
                loss, huber_delta, ..
            } => {
                let z: Vec<f64> = bags
                    .iter()
                    .filter_map(|b| self.standardized(&b.slide_id).ok())
                    .collect();
                (!z.is_empty()).then(|| {
                    z.iter()
                        .map(|&d| point_loss(*loss, *huber_delta, d))
                        .sum::<f64>()
                        / z.len() as f64
                })
            }
            _ => None,
        }
    }
}

/// One residual's regression loss (f64, for the reference values).
fn point_loss(loss: RegressionLoss, delta: f64, d: f64) -> f64 {
    match loss {
        RegressionLoss::Mse => d * d,
        RegressionLoss::Huber => {
            let a = d.abs();
            if a <= delta {
                0.5 * d * d
            } else {
                delta * (a - 0.5 * delta)
            }
        }
    }
}

/// One slide's discrete-time NLL from hazards (f64, as [`nll_loss`] computes it).
pub fn nll_of(hazards: &[f64], bin: usize, event: bool, alpha: f64) -> f64 {
    let clamp = |p: f64| p.max(NLL_EPS).ln();
    let survival_before: f64 = hazards[..bin].iter().map(|h| 1.0 - h).product();
    let survival_through = survival_before * (1.0 - hazards[bin]);
    let uncensored = if event {
        -(clamp(survival_before) + clamp(hazards[bin]))
    } else {
        0.0
    };
    let censored = if event { 0.0 } else { -clamp(survival_through) };
    (1.0 - alpha) * (censored + uncensored) + alpha * uncensored
}

/// The loss of `outputs` `[B, width]` against the targets of `bags` for the objective: the
/// cross-entropy (with optional per-class `class_weights`) for classification, the survival
/// or regression loss otherwise (class weights do not apply). Models with auxiliary outputs
/// trained by the task's own loss call it once per set of outputs.
pub fn task_loss(
    objective: &Objective,
    outputs: &Tensor,
    bags: &[&Bag],
    class_weights: Option<&[f32]>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let missing = |e: ObjectiveError| candle_core::Error::Msg(e.to_string());
    match objective {
        Objective::Classification => super::epochs::loss(outputs, bags, class_weights, device),
        Objective::Survival {
            loss: SurvivalLoss::Nll,
            alpha,
            ..
        } => {
            let mut bins = Vec::with_capacity(bags.len());
            let mut events = Vec::with_capacity(bags.len());
            for b in bags {
                let (time, event) = objective.survival_of(&b.slide_id).map_err(missing)?;
                bins.push(objective.bin(time) as u32);
                events.push(if event { 1f32 } else { 0.0 });
            }
            nll_loss(outputs, &bins, &events, *alpha, device)
        }
        Objective::Survival {
            loss: SurvivalLoss::Cox,
            ..
        } => {
            let mut times = Vec::with_capacity(bags.len());
            let mut events = Vec::with_capacity(bags.len());
            for b in bags {
                let (time, event) = objective.survival_of(&b.slide_id).map_err(missing)?;
                times.push(time);
                events.push(event);
            }
            cox_loss(outputs, &times, &events, device)
        }
        Objective::Regression {
            loss, huber_delta, ..
        } => {
            let z = bags
                .iter()
                .map(|b| objective.standardized(&b.slide_id).map(|v| v as f32))
                .collect::<Result<Vec<f32>, _>>()
                .map_err(missing)?;
            regression_loss(outputs, &z, *loss, *huber_delta, device)
        }
    }
}

/// Discrete-time survival NLL (see the module docs) of `logits [B, n_bins]`, each slide's bin
/// and event (1.0 observed, 0.0 censored).
pub fn nll_loss(
    logits: &Tensor,
    bins: &[u32],
    events: &[f32],
    alpha: f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = bins.len();
    let logits = logits.to_dtype(DType::F32)?;
    let hazards = candle_nn::ops::sigmoid(&logits)?;
    // log(1 - h) = -softplus(logit), finite where 1 - h rounds to 0 in f32.
    let log_survive = softplus(&logits)?.neg()?;
    let survival = log_survive.cumsum(D::Minus1)?.exp()?;
    let ones = Tensor::ones((n, 1), DType::F32, device)?;
    let padded = Tensor::cat(&[&ones, &survival], 1)?;
    let y = Tensor::from_vec(bins.to_vec(), (n, 1), device)?;
    let y_next = Tensor::from_vec(
        bins.iter().map(|b| b + 1).collect::<Vec<u32>>(),
        (n, 1),
        device,
    )?;
    let log_clamped =
        |t: Tensor| -> candle_core::Result<Tensor> { t.clamp(NLL_EPS as f32, f32::MAX)?.log() };
    let s_before = log_clamped(padded.gather(&y, 1)?)?;
    let h_at = log_clamped(hazards.gather(&y, 1)?)?;
    let s_through = log_clamped(padded.gather(&y_next, 1)?)?;
    let c = Tensor::from_vec(events.to_vec(), (n, 1), device)?;
    let censored_flag = c.affine(-1.0, 1.0)?;
    let uncensored = ((s_before + h_at)? * &c)?.neg()?;
    let censored = (s_through * censored_flag)?.neg()?;
    let total = (censored + &uncensored)?;
    let per_slide = ((total * (1.0 - alpha))? + (uncensored * alpha)?)?;
    per_slide.mean_all()
}

/// `log(1 + exp(x))`, stable for large `|x|`.
fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    // max(x, 0) + log(1 + exp(-|x|))
    let relu = x.relu()?;
    let tail = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    relu + tail
}

/// Negative Cox partial log-likelihood (Breslow ties) of `theta [B, 1]` (or `[B]`), averaged
/// over the events; 0 (with a gradient of 0) without an event.
pub fn cox_loss(
    theta: &Tensor,
    times: &[f64],
    events: &[bool],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = times.len();
    let theta = theta.to_dtype(DType::F32)?.reshape(n)?;
    let n_events = events.iter().filter(|&&e| e).count();
    if n_events == 0 {
        return theta.sum_all()? * 0.0;
    }
    // Risk set of i: every j with T_j >= T_i (ties included: Breslow).
    let mut mask = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            if times[j] >= times[i] {
                mask[i * n + j] = 1.0;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (n, n), device)?;
    let shift = theta.max(0)?.detach();
    let shifted = theta.broadcast_sub(&shift)?;
    let sums = mask.broadcast_mul(&shifted.exp()?.unsqueeze(0)?)?.sum(1)?;
    let log_risk = sums.log()?.broadcast_add(&shift)?;
    let e = Tensor::from_vec(
        events
            .iter()
            .map(|&e| if e { 1f32 } else { 0.0 })
            .collect::<Vec<_>>(),
        n,
        device,
    )?;
    let partial = ((theta - log_risk)? * e)?.sum_all()?;
    partial.neg()? / n_events as f64
}

/// MSE or Huber loss of `outputs [B, 1]` against standardised targets `z`.
pub fn regression_loss(
    outputs: &Tensor,
    z: &[f32],
    loss: RegressionLoss,
    delta: f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = z.len();
    let pred = outputs.to_dtype(DType::F32)?.reshape(n)?;
    let diff = (pred - Tensor::from_vec(z.to_vec(), n, device)?)?;
    match loss {
        RegressionLoss::Mse => diff.sqr()?.mean_all(),
        RegressionLoss::Huber => {
            let a = diff.abs()?;
            let quadratic = a.clamp(0f32, delta as f32)?;
            let linear = (&a - &quadratic)?;
            ((quadratic.sqr()? * 0.5)? + (linear * delta)?)?.mean_all()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(t: Tensor) -> f64 {
        f64::from(t.to_scalar::<f32>().unwrap())
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn nll_matches_the_hand_computed_likelihood() {
        let dev = Device::Cpu;
        let logits = [
            [0.3f32, -1.2, 0.8, 0.1],
            [-0.5, 0.4, -2.0, 1.5],
            [2.0, 0.0, -0.7, -0.3],
        ];
        let flat: Vec<f32> = logits.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (3, 4), &dev).unwrap();
        // slide 0: event in bin 2; slide 1: censored in bin 1; slide 2: event in bin 0.
        let (bins, events) = ([2u32, 1, 0], [1f32, 0.0, 1.0]);
        for alpha in [0.0, 0.4] {
            let ours = scalar(nll_loss(&t, &bins, &events, alpha, &dev).unwrap());
            let h: Vec<Vec<f64>> = logits
                .iter()
                .map(|r| r.iter().map(|&v| sigmoid(f64::from(v))).collect())
                .collect();
            // By hand: event in bin 2: -log((1-h0)(1-h1)) - log h2.
            let s0 = -((1.0 - h[0][0]) * (1.0 - h[0][1])).ln() - h[0][2].ln();
            // Censored in bin 1: -log((1-h0)(1-h1)).
            let s1 = -((1.0 - h[1][0]) * (1.0 - h[1][1])).ln();
            // Event in bin 0: -log h0.
            let s2 = -h[2][0].ln();
            let expected = ((1.0 - alpha) * (s0 + s1 + s2) + alpha * (s0 + s2)) / 3.0;
            assert!(
                (ours - expected).abs() < 1e-5,
                "alpha {alpha}: {ours} vs {expected}"
            );
            assert!(
                (nll_of(&h[0], 2, true, alpha) - ((1.0 - alpha) * s0 + alpha * s0)).abs() < 1e-12
            );
        }
    }

    #[test]
    fn gradient_descent_on_the_nll_ranks_early_events_as_high_risk() {
        let dev = Device::Cpu;
        let logits = candle_core::Var::zeros((3, 4), DType::F32, &dev).unwrap();
        // Early event (bin 0), event in bin 2, censored in the last bin.
        let (bins, events) = ([0u32, 2, 3], [1f32, 1.0, 0.0]);
        for _ in 0..200 {
            let loss = nll_loss(logits.as_tensor(), &bins, &events, 0.0, &dev).unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(logits.as_tensor()).unwrap();
            logits
                .set(&(logits.as_tensor() - (g * 0.5).unwrap()).unwrap())
                .unwrap();
        }
        let rows = logits.as_tensor().to_vec2::<f32>().unwrap();
        let o = Objective::Survival {
            loss: SurvivalLoss::Nll,
            targets: HashMap::new(),
            cuts: vec![1.0, 2.0, 3.0],
            n_bins: 4,
            alpha: 0.0,
        };
        let risk: Vec<f64> = rows.iter().map(|r| o.score(r).unwrap()).collect();
        assert!(
            risk[0] > risk[1] && risk[1] > risk[2],
            "{risk:?} from {rows:?}"
        );
    }

    #[test]
    fn cox_matches_the_hand_computed_partial_likelihood_with_tied_times() {
        let dev = Device::Cpu;
        let theta = [0.5f64, -0.3, 1.2, 0.0];
        let times = [2.0, 2.0, 5.0, 1.0];
        let events = [true, true, false, false];
        let t = Tensor::from_vec(
            theta.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (4, 1),
            &dev,
        )
        .unwrap();
        let ours = scalar(cox_loss(&t, &times, &events, &dev).unwrap());
        // Breslow: both events at t=2 share the risk set {0, 1, 2}.
        let risk: f64 = [0usize, 1, 2].iter().map(|&j| theta[j].exp()).sum();
        let expected = -((theta[0] - risk.ln()) + (theta[1] - risk.ln())) / 2.0;
        assert!((ours - expected).abs() < 1e-6, "{ours} vs {expected}");
        let none = cox_loss(&t, &times, &[false; 4], &dev).unwrap();
        assert_eq!(scalar(none), 0.0);
        // Large log-hazards stay finite (shifted log-sum-exp).
        let big = Tensor::from_vec(vec![90f32, 88.0, 95.0, 80.0], (4, 1), &dev).unwrap();
        assert!(scalar(cox_loss(&big, &times, &events, &dev).unwrap()).is_finite());
    }

    #[test]
    fn regression_losses_by_hand() {
        let dev = Device::Cpu;
        let out = Tensor::from_vec(vec![0.5f32, -1.0, 3.0], (3, 1), &dev).unwrap();
        let z = [0.0f32, 0.0, 0.5];
        let mse = scalar(regression_loss(&out, &z, RegressionLoss::Mse, 1.0, &dev).unwrap());
        assert!((mse - (0.25 + 1.0 + 6.25) / 3.0).abs() < 1e-6);
        let huber = scalar(regression_loss(&out, &z, RegressionLoss::Huber, 1.0, &dev).unwrap());
        assert!(
            (huber - (0.125 + 0.5 + (2.5 - 0.5)) / 3.0).abs() < 1e-6,
            "{huber}"
        );
    }

    fn bag(id: &str, split: Split) -> Bag {
        Bag {
            slide_id: id.into(),
            label_index: 0,
            split,
            dim: 1,
            embeddings: vec![0.0].into(),
            positions: None,
            pixels: None,
        }
    }

    #[test]
    fn constant_losses_are_those_of_the_training_mean_and_the_cohort_hazards() {
        let mut targets = HashMap::new();
        for (i, v) in [1.0, 2.0, 4.0, 9.0].into_iter().enumerate() {
            targets.insert(format!("r{i}"), SlideTarget::Value(v));
        }
        let ids = ["r0", "r1", "r2", "r3"];
        let o = Objective::fit(
            Task::Regression,
            &ObjectiveConfig::default(),
            &targets,
            &ids,
        )
        .unwrap();
        let bags: Vec<Bag> = ids.iter().map(|id| bag(id, Split::Train)).collect();
        // MSE of predicting the mean of the standardised target: its variance, 1.
        assert!((o.constant_loss(&bags).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(o.score(&[0.0]), Some(4.0), "0 is the training mean");

        // Survival: 2 bins cut at 2; events at 1 (bin 0) and 3 (bin 1), censored at 1.5 (bin 0)
        // and 5 (bin 1). Cohort hazards: bin 0, 1 event of 4 reaching it; bin 1, 1 of 2.
        let mut targets = HashMap::new();
        for (id, time, event) in [
            ("a", 1.0, true),
            ("b", 3.0, true),
            ("c", 1.5, false),
            ("d", 5.0, false),
        ] {
            targets.insert(id.to_string(), SlideTarget::Survival { time, event });
        }
        let config = ObjectiveConfig {
            survival_loss: SurvivalLoss::Nll,
            survival_bins: 2,
            ..Default::default()
        };
        let ids = ["a", "b", "c", "d"];
        let o = Objective::fit(Task::Survival, &config, &targets, &ids).unwrap();
        let bags: Vec<Bag> = ids.iter().map(|id| bag(id, Split::Train)).collect();
        let (h0, h1) = (0.25f64, 0.5f64);
        let expected = (-(h0.ln())
            - ((1.0 - h0).ln() + h1.ln())
            - (1.0 - h0).ln()
            - ((1.0 - h0) * (1.0 - h1)).ln())
            / 4.0;
        assert!((o.constant_loss(&bags).unwrap() - expected).abs() < 1e-12);
        // Cox has no constant loss (batch-wise risk sets).
        let cox = ObjectiveConfig {
            survival_loss: SurvivalLoss::Cox,
            ..Default::default()
        };
        let o = Objective::fit(Task::Survival, &cox, &targets, &ids).unwrap();
        assert_eq!(o.constant_loss(&bags), None);
        assert_eq!(Objective::output_names(Task::Survival, &cox, &[]), ["risk"]);
    }

    #[test]
    fn bins_are_quantiles_of_uncensored_training_times() {
        let mut targets = HashMap::new();
        for (i, (t, e)) in [
            (1.0, true),
            (2.0, true),
            (3.0, true),
            (4.0, true),
            (5.0, true),
            (100.0, false),
            (0.5, true),
        ]
        .into_iter()
        .enumerate()
        {
            targets.insert(format!("s{i}"), SlideTarget::Survival { time: t, event: e });
        }
        let ids: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
        let train: Vec<&str> = ids.iter().map(String::as_str).collect();
        let nll = ObjectiveConfig {
            survival_loss: SurvivalLoss::Nll,
            ..Default::default()
        };
        let o = Objective::fit(Task::Survival, &nll, &targets, &train).unwrap();
        // Events 1..5 (s6 is not training, s5 is censored): quartiles 2, 3, 4.
        let Objective::Survival { cuts, .. } = &o else {
            panic!()
        };
        assert_eq!(cuts, &[2.0, 3.0, 4.0]);
        assert_eq!(
            (o.bin(0.5), o.bin(2.0), o.bin(3.9), o.bin(100.0)),
            (0, 1, 2, 3)
        );
        // Risk: higher hazards, higher risk.
        assert!(o.score(&[2.0, 2.0, 2.0, 2.0]).unwrap() > o.score(&[-2.0; 4]).unwrap());
    }
}
