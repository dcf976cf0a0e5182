//! What can be wrong with the predictions given to the statistics.

/// Inconsistent inputs; the message says which array and how.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    #[error("no predictions to evaluate")]
    Empty,
    #[error("{labels} labels, {predicted} predictions and {probs} probabilities for {n_classes} classes")]
    Lengths {
        labels: usize,
        predicted: usize,
        probs: usize,
        n_classes: usize,
    },
    #[error("class index {index} with {n_classes} classes")]
    ClassIndex { index: usize, n_classes: usize },
    #[error("probability {value} of row {row} is not a finite number")]
    NotFinite { row: usize, value: f32 },
    #[error("paired predictions differ: {0}")]
    Unpaired(String),
    #[error("clusters: {0}")]
    Clusters(String),
    #[error("bootstrap: {0}")]
    Config(String),
    #[error("survival: {0}")]
    Survival(String),
    #[error("regression: {0}")]
    Regression(String),
}
