//! What training remembers about each epoch: the per-epoch record (logged, written to
//! `train_log.json`, stored in checkpoints) and the model-selection criterion.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 0-based epoch number.
    pub epoch: usize,
    /// Optimizer steps taken so far (all epochs).
    pub step: u64,
    /// Mean training loss over the epoch's bags (class-weighted when enabled).
    pub train_loss: f64,
    /// The loss of the best constant predictor on the same bags (the class prior's entropy):
    /// a train loss that stays here means nothing was learned.
    #[serde(default)]
    pub constant_loss: Option<f64>,
    /// Learning rate of the epoch's last step.
    #[serde(default)]
    pub lr: f64,
    pub train_bags: usize,
    /// Mean unweighted cross-entropy on the validation bags.
    pub val_loss: Option<f64>,
    /// Macro one-vs-rest ROC AUC on the validation bags.
    pub val_auc: Option<f64>,
    pub val_balanced_accuracy: Option<f64>,
    /// Survival: Harrell's C-index of the validation bags' predicted risks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_c_index: Option<f64>,
    /// Regression: R^2 of the validation predictions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_r2: Option<f64>,
    pub val_bags: usize,
    /// Wall-clock seconds of the epoch (training + validation).
    pub seconds: f64,
    /// Whether this epoch became the best so far (and was saved as `best`).
    pub best: bool,
}

/// The validation quantity that selects the best epoch and drives early stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    /// The task's own ([`Monitor::for_task`]): `val_loss` for classification and regression,
    /// `val_c_index` for survival, whose validation NLL rises as the model overfits its
    /// calibration while its ranking still improves (docs/defaults-study.md).
    #[default]
    Auto,
    /// Validation loss (lower is better).
    ValLoss,
    /// Validation macro ROC AUC (higher is better; ties broken by lower loss).
    ValAuc,
    /// Validation balanced accuracy (higher is better; ties broken by lower loss).
    ValBalancedAccuracy,
    /// Survival: validation Harrell's C-index (higher is better; ties broken by lower loss).
    ValCIndex,
}

/// The best epoch so far and its score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestRecord {
    pub epoch: usize,
    /// The monitored value (as reported, not negated); `None` without validation data, when
    /// the latest epoch is the best by definition.
    pub value: Option<f64>,
    /// Validation loss of that epoch (tie-break for the higher-is-better monitors).
    pub loss: Option<f64>,
}

impl Monitor {
    /// What `auto` means for `task`; any other monitor is itself.
    pub fn for_task(self, task: tessera_pipeline::Task) -> Monitor {
        match (self, task) {
            (Monitor::Auto, tessera_pipeline::Task::Survival) => Monitor::ValCIndex,
            (Monitor::Auto, _) => Monitor::ValLoss,
            (m, _) => m,
        }
    }

    /// The monitored value of `record`, `None` without validation data (`auto`, not resolved
    /// with [`Monitor::for_task`]: the loss).
    pub fn value(self, record: &EpochRecord) -> Option<f64> {
        match self {
            Monitor::Auto | Monitor::ValLoss => record.val_loss,
            Monitor::ValAuc => record.val_auc,
            Monitor::ValBalancedAccuracy => record.val_balanced_accuracy,
            Monitor::ValCIndex => record.val_c_index,
        }
    }

    /// Whether `record` beats `best` (any value beats no best).
    pub fn improves(self, record: &EpochRecord, best: Option<&BestRecord>) -> bool {
        let Some(value) = self.value(record) else {
            return false;
        };
        if !value.is_finite() {
            return false;
        }
        let Some(best_value) = best.and_then(|b| b.value) else {
            return true;
        };
        let loss = record.val_loss.unwrap_or(f64::INFINITY);
        let best_loss = best.and_then(|b| b.loss).unwrap_or(f64::INFINITY);
        match self {
            Monitor::Auto | Monitor::ValLoss => value < best_value,
            Monitor::ValAuc | Monitor::ValBalancedAccuracy | Monitor::ValCIndex => {
                value > best_value || (value == best_value && loss < best_loss)
            }
        }
    }
}

/// The whole run's log, written as `train_log.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainLog {
    pub stage: String,
    pub pooling: String,
    pub classes: Vec<String>,
    pub monitor: Monitor,
    pub epochs: Vec<EpochRecord>,
    pub best: Option<BestRecord>,
    /// Why training ended: `epochs`, `early_stopping`, `inputs_ended`.
    pub stopped: Option<String>,
    /// Epoch training resumed from (the checkpoint's epoch + 1), if resumed.
    pub resumed_at: Option<usize>,
    /// Instances dropped because two shared a sparse-map cell (should be 0: the sparse-map
    /// stage resolves collisions).
    pub duplicate_sites: u64,
    /// Trainable parameters by part.
    #[serde(default)]
    pub parameters: crate::models::ParameterCounts,
    /// Set when training learned nothing (see `Trainer::collapse`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapse: Option<Collapse>,
    /// Set when the selected epoch is no better than chance on validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_chance: Option<AtChance>,
    /// The experiment's task when it is not classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<tessera_pipeline::Task>,
    /// Survival / regression: set when the selected epoch is no better than a model that
    /// learned nothing (see `Trainer::no_signal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_signal: Option<NoSignal>,
}

/// Evidence that a run learned nothing: its training loss stayed at the constant predictor's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Collapse {
    /// Mean training loss of the last three epochs.
    pub train_loss: f64,
    /// The constant predictor's loss (entropy of the class prior).
    pub constant_loss: f64,
    pub epochs: usize,
    /// The peak learning rate of the run.
    pub lr: f64,
    /// What the constant predictor is, for survival and regression (classification: the
    /// class prior).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constant_predictor: Option<String>,
}

impl Collapse {
    /// The warning users read, with the likely causes.
    pub fn message(&self) -> String {
        if let Some(predictor) = &self.constant_predictor {
            return format!(
                "training collapsed: after {} epochs the training loss ({:.4}) is within 1% of \
                 the loss of a constant prediction ({:.4}, {predictor}), so the model learned \
                 nothing from the inputs. Likely causes: a learning rate ({}) too high (dead \
                 ReLUs) or too low for this model, unscaled inputs (`standardize: true`), or \
                 targets the inputs do not determine",
                self.epochs, self.train_loss, self.constant_loss, self.lr
            );
        }
        format!(
            "training collapsed: after {} epochs the training loss ({:.4}) is within 1% of the \
             constant predictor's ({:.4}, the entropy of the class prior), so the model \
             predicts the prior and learned nothing from the inputs. Likely causes: a learning \
             rate ({}) too high (dead ReLUs) or too low for this model, unscaled inputs \
             (`standardize: true`), or labels the inputs do not determine",
            self.epochs, self.train_loss, self.constant_loss, self.lr
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(loss: f64, auc: f64) -> EpochRecord {
        EpochRecord {
            epoch: 0,
            step: 0,
            train_loss: 0.0,
            constant_loss: None,
            lr: 0.0,
            train_bags: 0,
            val_loss: Some(loss),
            val_auc: Some(auc),
            val_balanced_accuracy: None,
            val_c_index: None,
            val_r2: None,
            val_bags: 1,
            seconds: 0.0,
            best: false,
        }
    }

    #[test]
    fn monitors_compare_in_the_right_direction() {
        let best = BestRecord {
            epoch: 0,
            value: Some(0.5),
            loss: Some(0.5),
        };
        assert!(Monitor::ValLoss.improves(&rec(0.4, 0.0), Some(&best)));
        assert!(!Monitor::ValLoss.improves(&rec(0.6, 1.0), Some(&best)));
        let best_auc = BestRecord {
            epoch: 0,
            value: Some(0.8),
            loss: Some(0.5),
        };
        assert!(Monitor::ValAuc.improves(&rec(0.9, 0.9), Some(&best_auc)));
        assert!(Monitor::ValAuc.improves(&rec(0.4, 0.8), Some(&best_auc)));
        assert!(!Monitor::ValAuc.improves(&rec(0.6, 0.8), Some(&best_auc)));
        assert!(!Monitor::ValBalancedAccuracy.improves(&rec(0.1, 0.9), None));
        assert!(!Monitor::ValLoss.improves(&rec(f64::NAN, 0.9), None));
    }
}

/// Evidence that a model learned nothing that holds beyond its training slides: its best
/// validation balanced accuracy lies within the band of guessing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AtChance {
    pub val_balanced_accuracy: f64,
    /// `1 / C`.
    pub chance: f64,
    /// `chance + 2 sd` of guessing on `val_bags` slides.
    pub bound: f64,
    pub val_bags: usize,
    /// The selected (best) epoch, 0-based.
    pub epoch: usize,
}

impl AtChance {
    /// The warning users read.
    pub fn message(&self) -> String {
        format!(
            "no better than chance: the selected epoch ({}) reaches validation balanced accuracy {:.3} on {} slides, within the band of guessing (chance {:.3}, 2 sd {:.3}); the model does not learn this label from these inputs (for a spatial label, only sparseconvmil can), or it overfits the training slides",
            self.epoch + 1,
            self.val_balanced_accuracy,
            self.val_bags,
            self.chance,
            self.bound
        )
    }
}

/// Evidence that a survival or regression model learned nothing that holds on validation:
/// its selected epoch is no better than random risks (C-index) or than predicting the
/// training mean (loss).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoSignal {
    /// `val_c_index` or `val_loss`.
    pub metric: String,
    pub value: f64,
    /// What a model that learned nothing reaches: 0.5, or the training mean's loss.
    pub reference: f64,
    /// The value the selected epoch had to beat.
    pub bound: f64,
    pub val_bags: usize,
    /// The selected (best) epoch, 0-based.
    pub epoch: usize,
}

impl NoSignal {
    /// The warning users read.
    pub fn message(&self) -> String {
        if self.metric == "val_c_index" {
            format!(
                "no better than chance: the selected epoch ({}) reaches validation C-index {:.3} on {} slides, within the band of random risks (0.5, 2 sd {:.3}); the model does not rank these slides' survival from these inputs, or it overfits the training slides",
                self.epoch + 1,
                self.value,
                self.val_bags,
                self.bound
            )
        } else {
            format!(
                "no better than the training mean: the selected epoch ({}) reaches validation loss {:.4} on {} slides, no lower than predicting the training slides' mean target ({:.4}); the model does not predict this target from these inputs, or it overfits the training slides",
                self.epoch + 1,
                self.value,
                self.val_bags,
                self.reference
            )
        }
    }
}
