//! The `tessera` command line, parameterised by a registry so that a crate adding its own
//! stages gets the same CLI with one line (`tessera_cli::main(registry)`).
//!
//! This crate is the application around the engine (`tessera-pipeline`): argument parsing,
//! logging, Ctrl-C, sweeps, Slurm scripts, cache maintenance and the results table and
//! figures (`tessera-report`). The engine itself knows none of these.

mod args;
mod cache;
mod interrupt;
mod load;
mod results;
mod run;
mod schema;
mod slurm;
mod stages;
mod submit;
mod sweep;

use args::{Cli, Command};
use clap::{CommandFactory, FromArgMatches};
use load::Loaded;
use std::process::ExitCode;
use tessera_pipeline::Registry;

pub use schema::experiment_json_schema;

/// Runs the CLI with `registry`; returns the process exit code.
pub fn main(registry: Registry) -> ExitCode {
    let cli = parse_args(&registry);
    init_logging(cli.verbose);
    match dispatch(cli.command, &registry) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "error: {}",
                tessera_pipeline::error::error_chain(e.as_ref())
            );
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

/// Each experiment file is loaded once, here, then handed to the command.
fn dispatch(command: Command, registry: &Registry) -> anyhow::Result<ExitCode> {
    match command {
        Command::Validate { experiment, sets } => {
            match Loaded::read_or_report(&experiment, &sets, registry) {
                Err(code) => Ok(code),
                Ok(Loaded::Sweep { base }) => Ok(sweep::command::validate(
                    &experiment,
                    &base,
                    &sets,
                    registry,
                )),
                Ok(Loaded::Single { exp, graph }) => {
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
            }
        }
        Command::Run {
            experiment,
            sets,
            out,
            quiet,
            shard,
            jobs,
        } => match Loaded::read_or_report(&experiment, &sets, registry) {
            Err(code) => Ok(code),
            Ok(Loaded::Sweep { base }) => {
                sweep::command::run(base, &sets, out, quiet, jobs, shard, registry)
            }
            Ok(Loaded::Single { exp, graph }) => run::run(exp, graph, out, quiet, shard),
        },
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
            let resources = slurm::Resources {
                partition,
                gres,
                time,
                cpus_per_task,
                mem,
            };
            let exp = match load::single(&experiment, &sets, registry) {
                Ok((exp, _graph)) => exp,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            submit::slurm(&experiment, &sets, exp, array, out, resources, submit)
        }
        Command::Stages { kind } => {
            stages::print_stages(registry, kind.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache { command } => {
            cache::cache_command(command, registry)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { out } => results::report(&out),
        Command::Export {
            experiment,
            sets,
            stage,
            h5,
            parquet,
        } => {
            let (exp, graph) =
                load::single(&experiment, &sets, registry).map_err(|e| anyhow::anyhow!("{e}"))?;
            let request = tessera_pipeline::export::Request { stage, h5, parquet };
            tessera_pipeline::export::export(&exp, &graph, registry, &request)?;
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
