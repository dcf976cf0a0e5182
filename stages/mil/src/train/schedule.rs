//! The learning-rate schedule: linear warm-up, then constant or cosine decay, evaluated per
//! optimizer step from the fraction of training done (as timm's `CosineLRScheduler` with
//! `t_in_epochs=False`), so a run of few large epochs and one of many small ones follow the
//! same curve.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The shape of the learning rate over training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` throughout (after the warm-up).
    Constant,
    /// Half a cosine from `lr` after the warm-up down to `lr * MIN_FACTOR` at the last step.
    #[default]
    Cosine,
}

/// Where the cosine ends, relative to `lr`.
pub const MIN_FACTOR: f64 = 0.01;

/// The schedule of one run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: LrSchedule,
    pub lr: f64,
    /// Epochs of linear warm-up from `lr / steps` to `lr`.
    pub warmup_epochs: f64,
    pub epochs: f64,
}

impl Schedule {
    /// The learning rate of the step that ends at `t` epochs into training (`t` > 0, e.g.
    /// `epoch + (batch + 1) / batches`).
    pub fn lr_at(&self, t: f64) -> f64 {
        let t = t.max(0.0);
        if self.warmup_epochs > 0.0 && t < self.warmup_epochs {
            return self.lr * (t / self.warmup_epochs).max(1e-3);
        }
        match self.kind {
            LrSchedule::Constant => self.lr,
            LrSchedule::Cosine => {
                let span = (self.epochs - self.warmup_epochs).max(f64::MIN_POSITIVE);
                let progress = ((t - self.warmup_epochs) / span).clamp(0.0, 1.0);
                let min = self.lr * MIN_FACTOR;
                min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_cosine_by_hand() {
        let s = Schedule {
            kind: LrSchedule::Cosine,
            lr: 1.0,
            warmup_epochs: 2.0,
            epochs: 10.0,
        };
        assert!((s.lr_at(1.0) - 0.5).abs() < 1e-12);
        assert!((s.lr_at(2.0) - 1.0).abs() < 1e-12);
        // Half-way through the decay: (1 + 0.01) / 2.
        assert!((s.lr_at(6.0) - 0.505).abs() < 1e-12);
        assert!((s.lr_at(10.0) - 0.01).abs() < 1e-12);
        let c = Schedule {
            kind: LrSchedule::Constant,
            warmup_epochs: 0.0,
            ..s
        };
        assert_eq!(c.lr_at(0.3), 1.0);
        assert_eq!(c.lr_at(9.9), 1.0);
        // Monotone decay after the warm-up.
        let mut prev = f64::INFINITY;
        for k in 20..=100 {
            let v = s.lr_at(k as f64 / 10.0);
            assert!(v <= prev + 1e-15);
            prev = v;
        }
    }
}
