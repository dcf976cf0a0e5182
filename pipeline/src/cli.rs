//! The `tessera` command line, parameterised by a registry so that a crate adding its own
//! stages gets the same CLI with one line (`tessera_pipeline::cli::main(registry)`).

use crate::cache::{entry_key, list_entries};
use crate::config::{load_experiment, Experiment};
use crate::graph::{build_graph, Graph};
use crate::registry::Registry;
use crate::report::RunStatus;
use crate::runner::{execute, RunSettings};
use crate::shard::Shard;
use crate::slurm::{sbatch, JobSpec, Resources};
use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "SparseConvMIL and MIL baselines on whole-slide images, as a YAML-declared DAG of cached stages"
)]
struct Cli {
    /// More logging (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
enum CacheCommand {
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

/// Runs the CLI with `registry`; returns the process exit code.
pub fn main(registry: Registry) -> ExitCode {
    let cli = parse_args(&registry);
    init_logging(cli.verbose);
    match dispatch(cli.command, &registry) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", crate::error::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

/// The command line, with `--version` naming the libraries the registry's stages run on
/// (`tessera 0.1.0 (OpenSlide 4.0.1)`).
fn parse_args(registry: &Registry) -> Cli {
    let libraries = registry.libraries();
    let mut command = Cli::command();
    if !libraries.is_empty() {
        let version = format!("{} ({})", env!("CARGO_PKG_VERSION"), libraries.join(", "));
        // Parsed once per process: leaking the string is what a `'static` version takes.
        let version: &'static str = Box::leak(version.into_boxed_str());
        command = command.version(version);
    }
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn dispatch(command: Command, registry: &Registry) -> anyhow::Result<ExitCode> {
    match command {
        Command::Validate { experiment, sets } => {
            if let Some(code) =
                crate::sweep::command::validate_if_sweep(&experiment, &sets, registry)
            {
                return Ok(code);
            }
            let (exp, graph) = match load_and_check(&experiment, &sets, registry) {
                Ok(x) => x,
                Err(message) => {
                    eprintln!("{message}");
                    return Ok(ExitCode::from(2));
                }
            };
            println!(
                "{}: ok — {} stages ({}), {} slides",
                experiment.display(),
                graph.stages.len(),
                graph
                    .order
                    .iter()
                    .map(|&i| graph.stages[i].name.as_str())
                    .collect::<Vec<_>>()
                    .join(" -> "),
                exp.slides.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            experiment,
            sets,
            out,
            quiet,
            shard,
            jobs,
        } => {
            if let Some(code) = crate::sweep::command::run_if_sweep(
                &experiment,
                &sets,
                out.clone(),
                quiet,
                jobs,
                shard,
                registry,
            )? {
                return Ok(code);
            }
            run(&experiment, &sets, out, quiet, shard, registry)
        }
        Command::Slurm {
            experiment,
            sets,
            array,
            out,
            partition,
            gres,
            time,
            cpus_per_task,
            mem,
            submit,
        } => {
            let resources = Resources {
                partition,
                gres,
                time,
                cpus_per_task,
                mem,
            };
            slurm(&experiment, &sets, array, out, resources, submit, registry)
        }
        Command::Stages { kind } => {
            print_stages(registry, kind.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache { command } => {
            cache_command(command, registry)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { out } => crate::sweep::command::report(&out),
        Command::Export {
            experiment,
            sets,
            stage,
            h5,
            parquet,
        } => {
            let (exp, graph) =
                load_and_check(&experiment, &sets, registry).map_err(anyhow::Error::msg)?;
            let request = crate::export::Request { stage, h5, parquet };
            crate::export::export(&exp, &graph, registry, &request)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&experiment_json_schema(registry))?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads and checks an experiment; the error is the full message to print.
pub fn load_and_check(
    file: &Path,
    sets: &[String],
    registry: &Registry,
) -> Result<(Experiment, Graph), String> {
    let exp = load_experiment(file, sets).map_err(|e| e.to_string())?;
    let graph = build_graph(&exp, registry).map_err(|e| e.to_string())?;
    Ok((exp, graph))
}

/// Loads and checks an experiment, applies `--out`, and creates the output folder; a rejected
/// experiment has been reported and gives the exit code (2).
fn prepare_out(
    file: &Path,
    sets: &[String],
    out: Option<PathBuf>,
    registry: &Registry,
) -> anyhow::Result<Result<(Experiment, Graph), ExitCode>> {
    let (mut exp, graph) = match load_and_check(file, sets, registry) {
        Ok(x) => x,
        Err(message) => {
            eprintln!("{message}");
            return Ok(Err(ExitCode::from(2)));
        }
    };
    if let Some(out) = out {
        exp.out_dir = out;
    }
    std::fs::create_dir_all(&exp.out_dir)
        .with_context(|| format!("creating {}", exp.out_dir.display()))?;
    Ok(Ok((exp, graph)))
}

fn run(
    file: &Path,
    sets: &[String],
    out: Option<PathBuf>,
    quiet: bool,
    shard: Option<Shard>,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    let (exp, graph) = match prepare_out(file, sets, out, registry)? {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    write_resolved(&exp, &graph)?;
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: stopping cleanly (Ctrl-C again to abort)");
    });
    let settings = RunSettings {
        shard,
        ..RunSettings::for_experiment(
            &exp,
            Some(interrupt),
            !quiet && std::io::stderr().is_terminal(),
        )
    };
    let report = execute(&graph, &settings)?;
    println!(
        "{:<16} {:<12} {:>8} {:>8} {:>10} {:>6} {:>6} {:>8} {:>6}",
        "stage", "kind", "in", "out", "rows out", "hits", "miss", "seconds", "errors"
    );
    for s in &report.stages {
        println!(
            "{:<16} {:<12} {:>8} {:>8} {:>10} {:>6} {:>6} {:>8.2} {:>6}",
            s.name,
            s.kind,
            s.items_in,
            s.items_out,
            s.rows_out,
            s.cache_hits,
            s.cache_misses,
            s.seconds,
            s.errors.len()
        );
    }
    for e in &report.errors {
        eprintln!(
            "error: stage `{}`, slide `{}`: {}",
            e.stage,
            e.slide.as_deref().unwrap_or("-"),
            e.message
        );
    }
    if let Some(sh) = &report.shard {
        println!(
            "shard {}: {} slides{}; stages not run in a shard run: {} (run without --shard for them)",
            sh.shard.as_deref().unwrap_or("-"),
            sh.slides.len(),
            if sh.deferred.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} left to other processes computing them ({})",
                    sh.deferred.len(),
                    sh.deferred.join(", ")
                )
            },
            if sh.stages_not_run.is_empty() {
                "none".to_string()
            } else {
                sh.stages_not_run.join(", ")
            }
        );
    }
    if let Some(table) = crate::sweep::command::single_run_table(&exp.out_dir) {
        println!("\n{table}");
    }
    // "Ok" alone would read as "nothing went wrong" after slides were skipped on errors.
    let skipped_after_errors = if report.status == RunStatus::Ok && !report.errors.is_empty() {
        format!(
            " with {} error(s) (those slides were skipped; `on_error: fail` stops instead)",
            report.errors.len()
        )
    } else {
        String::new()
    };
    // A run that finished but whose results cannot be trusted says so where users look.
    let alerts: Vec<String> = report
        .stages
        .iter()
        .flat_map(|s| s.alerts())
        .map(|a| format!("stage `{}`: {}", a.stage, a.message))
        .collect();
    for a in &alerts {
        eprintln!("warning: {a}");
    }
    let skipped_after_errors = match alerts.as_slice() {
        [] => skipped_after_errors,
        [one] => format!("{skipped_after_errors}, but {one}"),
        many => format!(
            "{skipped_after_errors}, but with {} alerts (above; first: {})",
            many.len(),
            many[0]
        ),
    };
    println!(
        "{:?}{skipped_after_errors} in {:.1} s; report: {}",
        report.status,
        report.seconds,
        exp.out_dir.join("run.json").display()
    );
    Ok(match report.status {
        RunStatus::Ok => ExitCode::SUCCESS,
        RunStatus::Failed => ExitCode::from(1),
        RunStatus::Cancelled => ExitCode::from(130),
    })
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.exists() {
        return p
            .canonicalize()
            .with_context(|| format!("resolving {}", p.display()));
    }
    Ok(std::env::current_dir()?.join(p))
}

fn slurm(
    file: &Path,
    sets: &[String],
    array: usize,
    out: Option<PathBuf>,
    resources: Resources,
    submit: bool,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    let (exp, _graph) = match prepare_out(file, sets, out, registry)? {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    std::fs::create_dir_all(&exp.cache_dir)
        .with_context(|| format!("creating {}", exp.cache_dir.display()))?;
    if array > exp.slides.len() {
        eprintln!(
            "warning: --array {array} is more than the {} slides: some tasks will have nothing to do",
            exp.slides.len()
        );
    }
    let spec = JobSpec {
        name: exp.config.name.clone(),
        binary: std::env::current_exe()
            .context("locating the tessera binary")?
            .canonicalize()
            .context("locating the tessera binary")?,
        experiment: absolute(file)?,
        sets: sets.to_vec(),
        cache_dir: absolute(&exp.cache_dir)?,
        out_dir: absolute(&exp.out_dir)?,
        array,
        resources,
    };
    let (array_script, full_script) = spec.write()?;
    println!("wrote {}", array_script.display());
    println!("wrote {}", full_script.display());
    if !submit {
        println!("submit with:");
        println!(
            "  ARRAY=$(sbatch --parsable {})",
            crate::slurm::sh_quote(&array_script.to_string_lossy())
        );
        println!(
            "  sbatch --dependency=afterok:${{ARRAY%%;*}} {}",
            crate::slurm::sh_quote(&full_script.to_string_lossy())
        );
        return Ok(ExitCode::SUCCESS);
    }
    let array_id = sbatch(&array_script, None)?;
    println!("submitted shard array: job {array_id} ({array} tasks)");
    let full_id = sbatch(&full_script, Some(&array_id))?;
    println!("submitted full run: job {full_id} (after job {array_id} succeeds)");
    println!(
        "results: {} (run.json, metrics); logs: {}",
        spec.out_dir.display(),
        spec.slurm_dir().join("logs").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes the experiment as it ran: after `--set`, with every parameter's default filled in.
pub(crate) fn write_resolved(exp: &Experiment, graph: &Graph) -> anyhow::Result<()> {
    let mut config = exp.config.clone();
    for s in &graph.stages {
        if let Some(sc) = config.stages.get_mut(&s.name) {
            sc.params = s.stage.canonical_params();
        }
    }
    let path = exp.out_dir.join("experiment.yaml");
    std::fs::write(&path, serde_yaml_ng::to_string(&config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn print_stages(registry: &Registry, kind: Option<&str>) -> anyhow::Result<()> {
    let Some(kind) = kind else {
        for k in registry.kinds() {
            println!("{:<14} v{:<4} {}", k.kind(), k.version(), k.about());
        }
        println!("\n`tessera stages KIND` shows a kind's parameters.");
        return Ok(());
    };
    let Some(k) = registry.get(kind) else {
        let hint = crate::registry::did_you_mean(kind, registry.names())
            .map(|m| format!(" (did you mean `{m}`?)"))
            .unwrap_or_default();
        bail!(
            "unknown stage kind `{kind}`{hint}; known: {}",
            registry.names().join(", ")
        );
    };
    println!(
        "{} (version {}): {}\n\nparameters:",
        k.kind(),
        k.version(),
        k.about()
    );
    let schema = k.params_schema();
    let defaults = k.default_params();
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, prop) in props {
            let ty = prop
                .get("type")
                .map(|t| t.to_string().replace('"', ""))
                .or_else(|| {
                    prop.get("$ref")
                        .and_then(|r| r.as_str())
                        .map(|r| r.rsplit('/').next().unwrap_or(r).to_string())
                })
                .unwrap_or_else(|| "value".into());
            let default = defaults
                .get(name)
                .map(|d| d.to_string())
                .unwrap_or_default();
            let about = prop
                .get("description")
                .and_then(|d| d.as_str())
                .unwrap_or("")
                .replace('\n', " ");
            println!("  {name:<22} {ty:<18} default {default:<14} {about}");
        }
    }
    let notes = k.notes();
    if !notes.is_empty() {
        println!("\n{}", notes.trim_end());
    }
    Ok(())
}

fn cache_dir_of(target: &Path, registry: &Registry) -> anyhow::Result<PathBuf> {
    Ok(cache_dir_and_ttl(target, registry)?.0)
}

/// The cache folder and claim TTL of a folder (default TTL) or an experiment.
fn cache_dir_and_ttl(
    target: &Path,
    registry: &Registry,
) -> anyhow::Result<(PathBuf, std::time::Duration)> {
    if target.is_file() {
        let (exp, _) = load_and_check(target, &[], registry).map_err(anyhow::Error::msg)?;
        let ttl = std::time::Duration::from_secs(exp.config.claim_ttl_s);
        Ok((exp.cache_dir, ttl))
    } else {
        Ok((target.to_path_buf(), crate::claim::DEFAULT_TTL))
    }
}

fn cache_command(command: CacheCommand, registry: &Registry) -> anyhow::Result<()> {
    match command {
        CacheCommand::Ls { target } => {
            let dir = cache_dir_of(&target, registry)?;
            let entries = list_entries(&dir)?;
            let mut kinds: std::collections::BTreeMap<&str, (usize, u64, usize, usize)> =
                Default::default();
            for e in &entries {
                let k = kinds.entry(e.kind.as_str()).or_default();
                if e.claim {
                    k.3 += 1;
                } else if e.temporary {
                    k.2 += 1;
                } else {
                    k.0 += 1;
                    k.1 += e.bytes;
                }
            }
            println!("cache {}", dir.display());
            println!(
                "{:<14} {:>8} {:>12} {:>10} {:>7}",
                "kind", "entries", "MiB", "temporary", "claims"
            );
            for (kind, (n, bytes, tmp, claims)) in kinds {
                println!(
                    "{kind:<14} {n:>8} {:>12.2} {tmp:>10} {claims:>7}",
                    bytes as f64 / (1 << 20) as f64
                );
            }
        }
        CacheCommand::Gc {
            target,
            keep,
            dry_run,
        } => {
            let (dir, ttl) = cache_dir_and_ttl(&target, registry)?;
            let mut keep_keys: Option<HashSet<String>> = None;
            for exp_file in &keep {
                let keys = crate::sweep::command::used_cache_keys(exp_file, registry)?;
                keep_keys.get_or_insert_with(HashSet::new).extend(keys);
            }
            let (mut removed, mut bytes) = (0usize, 0u64);
            for e in list_entries(&dir)? {
                let unused = match (&keep_keys, entry_key(&e.path)) {
                    (Some(keys), Some(k)) => !keys.contains(&k),
                    _ => false,
                };
                if e.claim {
                    // A live claim is a process at work: only abandoned ones go.
                    if !crate::claim::claim_file_is_stale(&e.path, ttl) {
                        continue;
                    }
                } else if !(e.temporary || unused) {
                    continue;
                }
                {
                    println!(
                        "{} {}",
                        if dry_run { "would remove" } else { "remove" },
                        e.path.display()
                    );
                    if !dry_run {
                        std::fs::remove_file(&e.path)
                            .with_context(|| format!("removing {}", e.path.display()))?;
                    }
                    removed += 1;
                    bytes += e.bytes;
                }
            }
            println!(
                "{removed} files, {:.2} MiB {}",
                bytes as f64 / (1 << 20) as f64,
                if dry_run { "would be freed" } else { "freed" }
            );
        }
    }
    Ok(())
}

/// The JSON Schema of experiment files, with each stage kind's parameters.
pub fn experiment_json_schema(registry: &Registry) -> serde_json::Value {
    use serde_json::{json, Value};
    let mut root = serde_json::to_value(schemars::schema_for!(crate::config::ExperimentConfig))
        .unwrap_or_default();
    let mut defs = root.get("$defs").cloned().unwrap_or_else(|| json!({}));
    let mut branches = Vec::new();
    for k in registry.kinds() {
        let mut params = k.params_schema();
        if let Some(Value::Object(inner)) = params.as_object_mut().and_then(|p| p.remove("$defs")) {
            if let Value::Object(d) = &mut defs {
                d.extend(inner);
            }
        }
        if let Some(p) = params.as_object_mut() {
            p.remove("$schema");
        }
        let name = format!("params_{}", k.kind());
        defs[&name] = params;
        branches.push(json!({
            "if": {"properties": {"kind": {"const": k.kind()}}},
            "then": {"properties": {"params": {"$ref": format!("#/$defs/{name}")}}}
        }));
    }
    if let Some(sc) = defs.get_mut("StageConfig") {
        sc["allOf"] = Value::Array(branches);
        sc["properties"]["kind"]["enum"] = json!(registry.names());
    }
    root["$defs"] = defs;
    root
}
