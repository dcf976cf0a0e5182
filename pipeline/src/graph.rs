//! The checked DAG: every stage configured, inputs resolved, no cycle, every edge's Arrow
//! schema fitting what its consumer needs. Nothing runs until all of this holds.

use crate::config::{ConfigError, ConfigErrors, ErrorPolicy, Experiment};
use crate::error::StageError;
use crate::registry::{did_you_mean, ConfiguredStage, Registry};
use crate::schema::{check_columns, ColumnMismatch, InputSpec};
use arrow::datatypes::SchemaRef;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One stage of a checked graph.
#[derive(Clone)]
pub struct GraphStage {
    pub name: String,
    pub kind: String,
    pub version: String,
    pub stage: Arc<dyn ConfiguredStage>,
    /// Indices of the upstream stages, in input order.
    pub inputs: Vec<usize>,
    pub workers: usize,
    /// Whether the output is cached (asked for, and the kind is cacheable).
    pub cache: bool,
    pub on_error: ErrorPolicy,
    pub output_schema: SchemaRef,
    /// True for stages reading the dataset.
    pub source: bool,
}

/// A checked DAG.
#[derive(Clone)]
pub struct Graph {
    pub stages: Vec<GraphStage>,
    /// A topological order of stage indices.
    pub order: Vec<usize>,
    /// For each stage: (consumer index, which input of the consumer).
    pub consumers: Vec<Vec<(usize, usize)>>,
}

impl Graph {
    /// Index of the stage named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// Assembles and checks a graph from stages given in code (tests, embedding programs).
    /// `stages`: (name, configured stage, kind, version, input names, cache).
    pub fn from_parts(parts: Vec<StagePart>) -> Result<Graph, GraphError> {
        Self::from_parts_in(parts, std::path::Path::new("."))
    }

    /// [`Graph::from_parts`], resolving relative paths in parameters against `base_dir`.
    pub fn from_parts_in(
        parts: Vec<StagePart>,
        base_dir: &std::path::Path,
    ) -> Result<Graph, GraphError> {
        let names: Vec<String> = parts.iter().map(|p| p.name.clone()).collect();
        let mut stages = Vec::new();
        for p in &parts {
            let inputs = p
                .inputs
                .iter()
                .map(|i| {
                    names
                        .iter()
                        .position(|n| n == i)
                        .ok_or_else(|| GraphError::UnknownInput {
                            stage: p.name.clone(),
                            input: i.clone(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            stages.push((p, inputs));
        }
        let edges: Vec<Vec<usize>> = stages.iter().map(|(_, i)| i.clone()).collect();
        let order = topological_order(&edges).map_err(|cycle| {
            GraphError::Cycle(cycle.iter().map(|&i| names[i].clone()).collect())
        })?;
        let mut schemas: Vec<Option<SchemaRef>> = vec![None; stages.len()];
        for &i in &order {
            let (p, inputs) = &stages[i];
            let input_schemas: Vec<SchemaRef> =
                inputs.iter().filter_map(|&j| schemas[j].clone()).collect();
            if let InputSpec::Tables(reqs) = p.stage.input_spec() {
                for (k, (req, schema)) in reqs.iter().zip(&input_schemas).enumerate() {
                    check_columns(schema, req).map_err(|mismatch| GraphError::Input {
                        stage: p.name.clone(),
                        input: k,
                        from: names[inputs[k]].clone(),
                        mismatch,
                    })?;
                }
            }
            schemas[i] = Some(p.stage.output_schema(&input_schemas, base_dir).map_err(
                |source| GraphError::OutputSchema {
                    stage: p.name.clone(),
                    source,
                },
            )?);
        }
        let mut graph_stages = Vec::new();
        for (i, (p, inputs)) in stages.into_iter().enumerate() {
            graph_stages.push(GraphStage {
                name: p.name.clone(),
                kind: p.kind.clone(),
                version: p.version.clone(),
                source: matches!(p.stage.input_spec(), InputSpec::Dataset),
                cache: p.cache && p.stage.cacheable(),
                stage: p.stage.clone(),
                inputs,
                workers: p.workers.max(1),
                on_error: p.on_error,
                output_schema: schemas[i].clone().ok_or(GraphError::Unreachable)?,
            });
        }
        let consumers = consumers_of(&graph_stages);
        Ok(Graph {
            stages: graph_stages,
            order,
            consumers,
        })
    }
}

/// Why stages given in code ([`Graph::from_parts`]) do not form a checked graph. Typed so that
/// [`build_graph`] can point each error at its stage's line in the YAML.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("stage `{stage}`: unknown input `{input}`")]
    UnknownInput { stage: String, input: String },
    /// The stages on one cycle, the first repeated at the end.
    #[error("cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// An input's schema lacks a column the stage needs, or has it with another type.
    #[error("stage `{stage}` input {input} from `{from}`: {mismatch}")]
    Input {
        stage: String,
        input: usize,
        from: String,
        mismatch: ColumnMismatch,
    },
    /// The stage cannot work out its output schema from its inputs and parameters.
    #[error("stage `{stage}`: {source}")]
    OutputSchema { stage: String, source: StageError },
    /// A stage outside the topological order (cannot happen once the order is complete).
    #[error("unreachable stage")]
    Unreachable,
}

impl GraphError {
    /// The stage the error is about, if it is about one.
    pub fn stage(&self) -> Option<&str> {
        match self {
            GraphError::UnknownInput { stage, .. }
            | GraphError::Input { stage, .. }
            | GraphError::OutputSchema { stage, .. } => Some(stage),
            GraphError::Cycle(_) | GraphError::Unreachable => None,
        }
    }
}

/// A stage given in code, for [`Graph::from_parts`].
#[derive(Clone)]
pub struct StagePart {
    pub name: String,
    pub kind: String,
    pub version: String,
    pub stage: Arc<dyn ConfiguredStage>,
    pub inputs: Vec<String>,
    pub workers: usize,
    pub cache: bool,
    pub on_error: ErrorPolicy,
}

fn consumers_of(stages: &[GraphStage]) -> Vec<Vec<(usize, usize)>> {
    let mut consumers = vec![Vec::new(); stages.len()];
    for (c, s) in stages.iter().enumerate() {
        for (k, &i) in s.inputs.iter().enumerate() {
            consumers[i].push((c, k));
        }
    }
    consumers
}

/// Kahn's algorithm; on a cycle, returns the stages on one cycle, in order.
pub fn topological_order(inputs: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = inputs.len();
    let mut indegree: Vec<usize> = inputs.iter().map(Vec::len).collect();
    let mut consumers = vec![Vec::new(); n];
    for (c, ins) in inputs.iter().enumerate() {
        for &i in ins {
            consumers[i].push(c);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).rev().collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop() {
        order.push(i);
        for &c in &consumers[i] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push(c);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk backwards along inputs among the stages left; some stage must repeat.
    let left: Vec<bool> = (0..n).map(|i| indegree[i] > 0).collect();
    let mut at = (0..n).find(|&i| left[i]).unwrap_or(0);
    let mut seen = vec![usize::MAX; n];
    let mut path = Vec::new();
    while seen[at] == usize::MAX {
        seen[at] = path.len();
        path.push(at);
        at = inputs[at].iter().copied().find(|&i| left[i]).unwrap_or(at);
    }
    let mut cycle = path[seen[at]..].to_vec();
    cycle.reverse();
    cycle.push(cycle[0]);
    Err(cycle)
}

/// Whether some stage downstream of stage `i` closes its inputs. `edges[j]` lists the inputs
/// of stage `j`.
fn has_closing_consumer(
    i: usize,
    edges: &[Vec<usize>],
    names: &[&str],
    configured: &BTreeMap<&str, Arc<dyn ConfiguredStage>>,
) -> bool {
    let mut seen = vec![false; edges.len()];
    let mut stack = vec![i];
    while let Some(at) = stack.pop() {
        for (j, inputs) in edges.iter().enumerate() {
            if inputs.contains(&at) && !seen[j] {
                seen[j] = true;
                // A consumer whose parameters did not parse has its own error already; it may
                // well be the one that closes (a typo in `train`'s params), so do not add a
                // second, misleading error here.
                if configured.get(names[j]).is_none_or(|c| c.closes_inputs()) {
                    return true;
                }
                stack.push(j);
            }
        }
    }
    false
}

/// Checks a whole experiment against the registry and builds its graph. Every problem found
/// is reported, each with its line in the YAML where it can be found.
pub fn build_graph(exp: &Experiment, registry: &Registry) -> Result<Graph, ConfigErrors> {
    let mut errors: Vec<ConfigError> = Vec::new();
    let cfg = &exp.config;
    if cfg.stages.is_empty() {
        errors.push(exp.error_at(&["stages"], None, "no stages declared"));
    }
    let names: Vec<&str> = cfg.stages.keys().map(String::as_str).collect();
    let mut configured: BTreeMap<&str, Arc<dyn ConfiguredStage>> = BTreeMap::new();
    let mut versions: BTreeMap<&str, &'static str> = BTreeMap::new();
    for (name, sc) in &cfg.stages {
        let Some(kind) = registry.get(&sc.kind) else {
            let known = registry.names();
            let hint = did_you_mean(&sc.kind, known.iter().copied())
                .map(|m| format!("; did you mean `{m}`?"))
                .unwrap_or_default();
            errors.push(exp.error_at(
                &["stages", name, "kind"],
                Some(name),
                format!(
                    "unknown stage kind `{}`{hint} (known kinds: {})",
                    sc.kind,
                    known.join(", ")
                ),
            ));
            continue;
        };
        if sc.workers == 0 {
            errors.push(exp.error_at(
                &["stages", name, "workers"],
                Some(name),
                "workers must be at least 1",
            ));
        }
        if let Err((field, message)) = check_param_names(&sc.params, &kind.params_schema()) {
            errors.push(exp.error_at(&["stages", name, "params", &field], Some(name), message));
            continue;
        }
        match kind.configure(sc.params.clone()) {
            Ok(c) => {
                if sc.workers > 1 && !c.parallel() {
                    errors.push(exp.error_at(
                        &["stages", name, "workers"],
                        Some(name),
                        format!(
                            "kind `{}` keeps state across slides and runs as one worker",
                            sc.kind
                        ),
                    ));
                }
                if sc.cache && !c.cacheable() {
                    errors.push(exp.error_at(
                        &["stages", name, "cache"],
                        Some(name),
                        format!("kind `{}` has no per-slide output to cache", sc.kind),
                    ));
                }
                configured.insert(name, c);
                versions.insert(name, kind.version());
            }
            Err(issue) => {
                let mut path = vec!["stages", name.as_str(), "params"];
                path.extend(issue.field.split('.').filter(|s| !s.is_empty()));
                let at = if issue.field.is_empty() {
                    String::new()
                } else {
                    format!("parameter `{}`: ", issue.field)
                };
                errors.push(exp.error_at(&path, Some(name), format!("{at}{}", issue.message)));
            }
        }
    }
    // Inputs exist, and their number and kind fit.
    for (name, sc) in &cfg.stages {
        for input in &sc.inputs {
            if !cfg.stages.contains_key(input) {
                let hint = did_you_mean(input, names.iter().copied().filter(|n| n != name))
                    .map(|m| format!("; did you mean `{m}`?"))
                    .unwrap_or_default();
                errors.push(exp.error_at(
                    &["stages", name, "inputs"],
                    Some(name),
                    format!("input `{input}` is not a stage of this experiment{hint}"),
                ));
            }
        }
        if let Some(c) = configured.get(name.as_str()) {
            match c.input_spec() {
                InputSpec::Dataset if !sc.inputs.is_empty() => errors.push(exp.error_at(
                    &["stages", name, "inputs"],
                    Some(name),
                    format!("kind `{}` reads the dataset and takes no inputs", sc.kind),
                )),
                InputSpec::Tables(reqs) if reqs.len() != sc.inputs.len() => {
                    errors.push(exp.error_at(
                        &["stages", name, "inputs"],
                        Some(name),
                        format!(
                            "kind `{}` takes {} input(s), {} given",
                            sc.kind,
                            reqs.len(),
                            sc.inputs.len()
                        ),
                    ))
                }
                _ => {}
            }
        }
    }
    // Cycles.
    let edges: Vec<Vec<usize>> = cfg
        .stages
        .values()
        .map(|sc| {
            sc.inputs
                .iter()
                .filter_map(|i| names.iter().position(|n| n == i))
                .collect()
        })
        .collect();
    if let Err(cycle) = topological_order(&edges) {
        let on: Vec<&str> = cycle.iter().map(|&i| names[i]).collect();
        errors.push(exp.error_at(
            &["stages", on[0], "inputs"],
            Some(on[0]),
            format!("the stages form a cycle: {}", on.join(" -> ")),
        ));
    }
    // A stage that emits until it is told to stop needs a downstream stage that tells it.
    for (i, (name, _)) in cfg.stages.iter().enumerate() {
        let Some(c) = configured.get(name.as_str()) else {
            continue;
        };
        if c.endless() && !has_closing_consumer(i, &edges, &names, &configured) {
            errors.push(exp.error_at(
                &["stages", name, "params", "epochs"],
                Some(name),
                "as configured this stage emits until a downstream stage (such as `train`) \
                 stops it, and none does: set a finite number of epochs",
            ));
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let parts: Vec<StagePart> = cfg
        .stages
        .iter()
        .map(|(name, sc)| StagePart {
            name: name.clone(),
            kind: sc.kind.clone(),
            version: versions
                .get(name.as_str())
                .copied()
                .unwrap_or("")
                .to_string(),
            stage: configured[name.as_str()].clone(),
            inputs: sc.inputs.clone(),
            workers: sc.workers,
            cache: sc.cache,
            on_error: sc.on_error,
        })
        .collect();
    Graph::from_parts_in(parts, &exp.base_dir).map_err(|error| {
        // Point schema errors at the consumer's `inputs:` line.
        let line = error
            .stage()
            .and_then(|s| crate::config::locate(&exp.source, &["stages", s, "inputs"]));
        ConfigErrors(vec![ConfigError {
            file: exp.file.clone(),
            line,
            stage: None,
            message: error.to_string(),
        }])
    })
}

/// Rejects parameter names the kind does not have, suggesting the closest one.
fn check_param_names(
    params: &serde_json::Value,
    schema: &serde_json::Value,
) -> Result<(), (String, String)> {
    let Some(given) = params.as_object() else {
        return Ok(());
    };
    let Some(props) = schema.get("properties").and_then(|p| p.as_object()) else {
        return Ok(());
    };
    for key in given.keys() {
        if !props.contains_key(key) {
            let known: Vec<&str> = props.keys().map(String::as_str).collect();
            let hint = did_you_mean(key, known.iter().copied())
                .map(|m| format!(" (did you mean `{m}`?)"))
                .unwrap_or_default();
            return Err((
                key.clone(),
                format!(
                    "unknown parameter `{key}`{hint}; parameters are: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_and_finds_cycles() {
        assert_eq!(
            topological_order(&[vec![], vec![0], vec![1]]).unwrap(),
            vec![0, 1, 2]
        );
        let cycle = topological_order(&[vec![], vec![0, 2], vec![1]]).unwrap_err();
        assert_eq!(cycle.first(), cycle.last());
        assert!(cycle.contains(&1) && cycle.contains(&2) && !cycle.contains(&0));
    }
}
