//! Reads an experiment file once (with its `--set` overrides) and tells a single run from a
//! sweep, so that every command works from the same loaded experiment.

use crate::sweep::is_sweep;
use std::path::Path;
use std::process::ExitCode;
use tessera_pipeline::config::{load_experiment, ConfigErrors, Experiment};
use tessera_pipeline::graph::{build_graph, Graph};
use tessera_pipeline::Registry;

/// An experiment file, loaded and checked.
pub enum Loaded {
    /// One run: the experiment and its checked graph.
    Single { exp: Experiment, graph: Graph },
    /// An experiment declaring `sweep:` or `seeds:`; its points are checked by
    /// [`crate::sweep::plan`].
    Sweep { base: Experiment },
}

impl Loaded {
    /// Loads `file` with `sets` applied; a single run's graph is built and checked here.
    pub fn read(file: &Path, sets: &[String], registry: &Registry) -> Result<Loaded, ConfigErrors> {
        let exp = load_experiment(file, sets)?;
        if is_sweep(&exp) {
            return Ok(Loaded::Sweep { base: exp });
        }
        let graph = build_graph(&exp, registry)?;
        Ok(Loaded::Single { exp, graph })
    }

    /// [`Loaded::read`], printing a rejected experiment's errors: `Err` is then the exit code
    /// (2).
    pub fn read_or_report(
        file: &Path,
        sets: &[String],
        registry: &Registry,
    ) -> Result<Loaded, ExitCode> {
        Loaded::read(file, sets, registry).map_err(|e| {
            eprintln!("{e}");
            ExitCode::from(2)
        })
    }

    /// The experiment as one run, a sweep's base values included: for the commands that look
    /// at one experiment (`export`, `slurm`, the cache of `cache ls|gc`).
    pub fn into_single(self, registry: &Registry) -> Result<(Experiment, Graph), ConfigErrors> {
        match self {
            Loaded::Single { exp, graph } => Ok((exp, graph)),
            Loaded::Sweep { base } => {
                let graph = build_graph(&base, registry)?;
                Ok((base, graph))
            }
        }
    }
}

/// Loads `file` as one run (see [`Loaded::into_single`]); the error is the message to print.
pub fn single(
    file: &Path,
    sets: &[String],
    registry: &Registry,
) -> Result<(Experiment, Graph), ConfigErrors> {
    Loaded::read(file, sets, registry)?.into_single(registry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::tests::{kind, setup};

    fn registry() -> Registry {
        let mut registry = Registry::new();
        registry.register::<kind::Src>();
        registry
    }

    #[test]
    fn one_load_tells_a_single_run_from_a_sweep() {
        let (_dir, file) = setup("");
        assert!(matches!(
            Loaded::read(&file, &[], &registry()),
            Ok(Loaded::Single { .. })
        ));
        let (_dir, file) = setup("sweep:\n  s.n: [1, 2]\n");
        let loaded = Loaded::read(&file, &[], &registry()).unwrap_or_else(|e| panic!("{e}"));
        let Loaded::Sweep { base } = &loaded else {
            panic!("a sweep loaded as a single run");
        };
        assert_eq!(base.config.sweep.keys(), vec!["s.n"]);
        // Commands on one experiment see a sweep's base values.
        let (exp, graph) = loaded
            .into_single(&registry())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(graph.stages.len(), 1);
        assert_eq!(exp.config.name, "e");
    }

    #[test]
    fn a_rejected_experiment_names_the_line() {
        let (_dir, file) = setup("    params: {mode: bad}\n");
        let err = single(&file, &[], &registry()).err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("`bad` is not a mode"), "{err}");
    }
}
