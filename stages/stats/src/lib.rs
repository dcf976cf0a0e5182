//! The numbers behind tessera's comparison tables: slide-classification metrics that follow
//! scikit-learn exactly, survival (C-index, Kaplan-Meier, log-rank: lifelines and
//! scikit-survival exactly) and regression metrics, their stratified bootstrap confidence intervals, and a paired
//! bootstrap test of whether one model is worse than another on the same slides.
//!
//! A crate of its own because two crates need the very same code and must not depend on each
//! other's heavy dependencies: `tessera-mil` (the `evaluate` stage writes every split's CIs into
//! `metrics.json`) and `tessera-report` (the results table pools each row's test predictions
//! for its CI and marks the rows not significantly worse than the best), which stays free of
//! candle. Only `rand`/`rand_chacha` (seeded resampling), `serde` and `thiserror`.
//!
//! Every metric is computed on *weighted* predictions ([`Evaluator`]): a bootstrap resample is
//! a vector of multiplicities, so the scores are sorted once per class and each resample is a
//! linear pass, and a multiplicity `k` gives exactly the metric of the data set with the row
//! repeated `k` times (what scikit-learn computes on the resampled arrays).

pub mod bootstrap;
pub mod confusion;
pub mod error;
pub mod evaluator;
pub mod generic;
pub mod metric;
pub mod paired;
pub mod ranking;
pub mod regression;
pub mod survival;
pub mod tasks;

pub use bootstrap::{
    confidence_intervals, percentile, BootstrapConfig, Clusters, Intervals, Resampler,
};
pub use confusion::{
    balanced_accuracy, confusion_matrix, macro_precision_recall_f1, per_class_precision_recall_f1,
    ClassCounts,
};
pub use error::StatsError;
pub use evaluator::{cross_entropy, ClassStats, Evaluation, Evaluator, CROSS_ENTROPY_EPS};
pub use generic::{intervals_of, paired_of, PairedResult};
pub use metric::{Metric, MetricValues};
pub use paired::{paired_bootstrap, PairedComparison};
pub use ranking::{
    average_precision, macro_auc_ovr, macro_auprc_ovr, roc_auc, RankMetrics, RankedScores,
};
pub use regression::RegressionMetrics;
pub use survival::{
    harrell_c_index, kaplan_meier, logrank_test, uno_c_index, KaplanMeier, LogRank, Outcome,
};
pub use tasks::{
    task_metric_lower_is_better, RegressionRows, SurvivalRows, TaskMetrics, REGRESSION_METRICS,
    SURVIVAL_METRICS,
};
