//! tessera's results: the aggregate record of a sweep (`sweep.json`), its results table
//! (`results.parquet`, `results.md`, in the layout of the paper's Table 2), and the paper's
//! figures drawn with `plotters` as PNG and SVG (`tessera report OUT/`).
//!
//! The crate knows tessera's output files only by their documented columns and keys
//! (`metrics.json`, `predictions.parquet`), not by the stages that write them.

pub mod confidence;
pub mod error;
pub mod record;
pub mod results;
pub mod runs;
pub mod task_confidence;

pub use error::ReportError;
pub use record::{PointRecord, PointStage, StageTotals, SweepRecord};
pub use results::{aggregate, results_table, ResultsTable};
pub mod figures;
pub mod font;
pub mod roc;

pub use figures::{draw_all, Figures};
