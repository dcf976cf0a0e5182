//! tessera's engine. An experiment is a YAML file declaring a DAG of stages; the engine checks
//! it whole before anything runs (kinds, parameters, inputs, cycles, Arrow schemas), decides per
//! slide what each stage must compute and what it can replay from the content-addressed Parquet
//! cache, then runs every stage on its own thread(s), connected by bounded channels so memory
//! stays flat whatever the number of slides.
//!
//! Stages are plugged in through [`StageKind`] (a parameter type that describes the stage) and
//! [`Stage`] (the running stage), registered by name in a [`Registry`].

pub mod cache;
pub mod claim;
pub mod context;
pub mod error;
pub mod export;
pub mod message;
pub mod paths;
pub mod per_slide;
pub mod plan;
pub mod registry;
pub mod report;
pub mod schema;
pub mod settings;
pub mod shard;
pub mod slide;
pub mod stage;
pub mod sweep_grid;
pub mod task;

pub use context::StageContext;
pub use error::{StageError, StageResult};
pub use message::Message;
pub use per_slide::{per_slide, PerSlide, PerSlideStage, SlideOutput};
pub use registry::{did_you_mean, Registry};
pub use report::{RunReport, RunStatus, ShardReport, StageReport};
pub use schema::{Column, ColumnType, InputSpec};
pub use slide::{Slide, SlideHandle};
pub use stage::{check_running, BuildContext, DeviceSpec, ParamIssue, Stage, StageKind};
pub use task::{slide_target, SlideTarget, Task};

/// Re-exported so stage crates use the engine's exact Arrow version.
pub use arrow;

pub mod config;
pub mod graph;
mod items;
pub use items::TILES;
pub mod runner;
pub mod testing;
pub mod worker;
