//! The command line's arguments (clap).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tessera_pipeline::shard::Shard;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "SparseConvMIL and MIL baselines on whole-slide images, as a YAML-declared DAG of cached stages"
)]
pub struct Cli {
    /// More logging (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Check an experiment (kinds, parameters, inputs, cycles, schemas) without running it.
    Validate {
        experiment: PathBuf,
        /// Override a value: `seed=3`, `STAGE.PARAM=VALUE`, `STAGE.workers=2`.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        sets: Vec<String>,
    },
    /// Run an experiment.
    Run {
        experiment: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        sets: Vec<String>,
        /// Output folder (default: the experiment's out_dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
        /// Run only shard I of N (0-based, I/N with 0 <= I < N): that shard's slides, balanced
        /// by file size, through the per-slide cached stages (tiling, embedding) into the
        /// shared cache. Stages over all slides (sampling, training, evaluation) do not run:
        /// a later run without --shard does them from the cache.
        #[arg(long, value_name = "I/N")]
        shard: Option<Shard>,
        /// Points of a sweep run side by side (they share the cache; nothing is computed twice).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
    },
    /// Write (and with --submit, submit) Slurm scripts: a job array running `run --shard`
    /// over N shards into the shared cache, then a job running the whole experiment once
    /// every shard succeeded.
    Slurm {
        experiment: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        sets: Vec<String>,
        /// Number of array tasks (shards).
        #[arg(long, value_name = "N")]
        array: usize,
        /// Output folder (default: the experiment's out_dir); scripts go to OUT/slurm/.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        partition: Option<String>,
        /// Generic resources per task, e.g. `gpu:1`.
        #[arg(long)]
        gres: Option<String>,
        /// Wall-time limit per job, e.g. `04:00:00`.
        #[arg(long, value_name = "HH:MM:SS")]
        time: Option<String>,
        #[arg(long)]
        cpus_per_task: Option<u32>,
        /// Memory per node, e.g. `32G`.
        #[arg(long)]
        mem: Option<String>,
        /// Submit with sbatch (the follow-up with --dependency=afterok on the array).
        #[arg(long)]
        submit: bool,
    },
    /// List the registered stage kinds, or show one kind's parameters and defaults.
    Stages { kind: Option<String> },
    /// Inspect or prune the cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Write a cached stage's embeddings for other tools: one TRIDENT-layout `SLIDE_ID.h5` per
    /// slide (`--h5`) and/or one Parquet file of every slide (`--parquet`). Reads the cache
    /// only: run the experiment first.
    Export {
        experiment: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        sets: Vec<String>,
        /// The stage whose cached output to export (default: the only cached stage with an
        /// `embedding` column).
        #[arg(long)]
        stage: Option<String>,
        /// Folder for one `SLIDE_ID.h5` per slide in TRIDENT's layout.
        #[arg(long)]
        h5: Option<PathBuf>,
        /// One Parquet file holding every slide's rows.
        #[arg(long)]
        parquet: Option<PathBuf>,
    },
    /// Print the JSON Schema of experiment files (for editors' YAML language servers).
    Schema,
    /// Draw a run's or a sweep's figures (PNG and SVG into OUT/figures/) and print its
    /// results table.
    Report {
        /// The output folder of `tessera run`.
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Entries per stage kind, with their sizes.
    Ls {
        /// The cache folder, or an experiment whose cache_dir to use.
        target: PathBuf,
    },
    /// Remove temporary files and abandoned claims left by interrupted runs; with --keep,
    /// also every entry that none of the given experiments would use.
    Gc {
        target: PathBuf,
        /// Experiments whose entries to keep (everything else is removed).
        #[arg(long)]
        keep: Vec<PathBuf>,
        /// Only print what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}
