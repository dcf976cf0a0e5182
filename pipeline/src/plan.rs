//! Per slide and stage, what the run must do: compute, replay from the cache, or skip.
//! Worked out before anything runs, from the cache keys alone, so that a run whose embeddings
//! are cached never opens a slide. The keys are derived here too: hash(kind, version,
//! parameters, salt, slide identity, input keys), stage by stage in topological order.

use crate::cache::{content_key, file_identity, Cache, KeyParts};
use crate::config::Experiment;
use crate::graph::Graph;
use crate::settings::{build_context, RunError, RunSettings};
use crate::slide::SlideHandle;
use crate::stage::BuildContext;
use std::sync::Arc;

/// What one stage does for one slide in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlideState {
    /// Run the stage on the slide (and cache it when the stage is cached).
    Compute,
    /// Emit the cached output; upstream stages need not produce the slide for this stage.
    Replay,
    /// Nothing downstream needs this stage's output for the slide.
    Skip,
}

/// The whole run's decisions: `states[stage][slide]`, `keys[stage][slide]`.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub states: Vec<Vec<SlideState>>,
    /// Content-addressed key of each (stage, slide) output; `None` where the key cannot be
    /// known (a stage downstream of an uncacheable one).
    pub keys: Vec<Vec<Option<String>>>,
}

impl Plan {
    /// The state of `stage` for the slide at dataset index `slide`.
    pub fn state(&self, stage: usize, slide: usize) -> SlideState {
        self.states
            .get(stage)
            .and_then(|s| s.get(slide))
            .copied()
            .unwrap_or(SlideState::Compute)
    }

    /// How many slides a stage handles in each state: (compute, replay, skip).
    pub fn counts(&self, stage: usize) -> (usize, usize, usize) {
        let states = &self.states[stage];
        let count = |s| states.iter().filter(|x| **x == s).count();
        (
            count(SlideState::Compute),
            count(SlideState::Replay),
            count(SlideState::Skip),
        )
    }

    /// The plan of a full run of `exp` from the cache as it is now: its keys tell which
    /// entries the experiment uses (`cache gc --keep`, `tessera export`, sweeps).
    pub fn for_experiment(graph: &Graph, exp: &Experiment) -> Result<Plan, RunError> {
        let settings = RunSettings::for_experiment(exp, None, false);
        let slides: Arc<[SlideHandle]> = settings.slides.clone().into();
        let build_ctx =
            |stage: usize, worker: usize| build_context(graph, &settings, &slides, stage, worker);
        Plan::make(
            graph,
            &settings,
            &Cache::new(&settings.cache_dir),
            &build_ctx,
            None,
        )
    }

    /// Every cache key the plan uses.
    pub fn used_keys(&self) -> Vec<String> {
        self.keys.iter().flatten().flatten().cloned().collect()
    }

    /// The cache entries a run would write: (kind, key) of every slide of every stage with
    /// `cache: true` whose entry is not in `cache` yet. Sweeps use it so that two points run
    /// side by side never compute the same entry.
    pub fn missing_entries(&self, graph: &Graph, cache: &Cache) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, keys) in self.keys.iter().enumerate() {
            let s = &graph.stages[i];
            if !s.cache {
                continue;
            }
            for key in keys.iter().flatten() {
                if !cache.is_valid(&s.kind, key) {
                    out.push((s.kind.clone(), key.clone()));
                }
            }
        }
        out
    }

    /// Stages a per-slide pass runs: the cached stages whose entries have keys, and everything
    /// upstream of them.
    pub(crate) fn per_slide_stages(&self, graph: &Graph) -> Vec<bool> {
        let mut runs: Vec<bool> = graph
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| s.cache && self.keys[i].iter().any(Option::is_some))
            .collect();
        for &i in graph.order.iter().rev() {
            if runs[i] {
                for &j in &graph.stages[i].inputs {
                    runs[j] = true;
                }
            }
        }
        runs
    }

    /// Works out every cache key and what each stage does for each slide. With `per_slide`,
    /// only the cache entries of those slides are wanted (a shard); otherwise the sinks'
    /// outputs.
    pub(crate) fn make(
        graph: &Graph,
        settings: &RunSettings,
        cache: &Cache,
        build_ctx: &dyn Fn(usize, usize) -> BuildContext,
        per_slide: Option<&[bool]>,
    ) -> Result<Plan, RunError> {
        let n = settings.slides.len();
        let needs_identity = graph.stages.iter().any(|s| s.source);
        let identities: Vec<String> = settings
            .slides
            .iter()
            .map(|slide| match (&slide.path, needs_identity) {
                (Some(p), true) => file_identity(p).unwrap_or_else(|e| format!("unreadable: {e}")),
                _ => String::new(),
            })
            .collect();
        let mut keys: Vec<Vec<Option<String>>> = vec![vec![None; n]; graph.stages.len()];
        for &i in &graph.order {
            let s = &graph.stages[i];
            if !s.stage.cacheable() {
                continue;
            }
            let salt = s
                .stage
                .cache_salt(&build_ctx(i, 0))
                .map_err(|source| RunError::Build {
                    stage: s.name.clone(),
                    source,
                })?;
            let params = serde_json::to_string(&s.stage.key_params()).unwrap_or_default();
            for (slide_index, slide) in settings.slides.iter().enumerate() {
                let input_keys: Option<Vec<String>> = s
                    .inputs
                    .iter()
                    .map(|&j| keys[j][slide_index].clone())
                    .collect();
                let Some(input_keys) = input_keys else {
                    continue;
                };
                if identities[slide_index].starts_with("unreadable") && s.source {
                    continue;
                }
                keys[i][slide_index] = Some(content_key(&KeyParts {
                    kind: &s.kind,
                    version: &s.version,
                    params: &params,
                    salt: &salt,
                    slide_id: &slide.id,
                    slide_identity: if s.source {
                        &identities[slide_index]
                    } else {
                        ""
                    },
                    input_keys: &input_keys,
                }));
            }
        }
        let consumers: Vec<Vec<usize>> = graph
            .consumers
            .iter()
            .map(|c| c.iter().map(|&(s, _)| s).collect())
            .collect();
        let cache_enabled: Vec<bool> = graph.stages.iter().map(|s| s.cache).collect();
        let demand = |stage: usize, slide: usize| match per_slide {
            None if consumers[stage].is_empty() => Demand::Output,
            None => Demand::None,
            Some(members)
                if members[slide] && cache_enabled[stage] && keys[stage][slide].is_some() =>
            {
                Demand::Cached
            }
            Some(_) => Demand::None,
        };
        let states = decide_with(
            &graph.order,
            &consumers,
            &cache_enabled,
            n,
            demand,
            |stage, slide| {
                keys[stage][slide]
                    .as_deref()
                    .is_some_and(|k| cache.is_valid(&graph.stages[stage].kind, k))
            },
        );
        Ok(Plan { states, keys })
    }
}

/// What a run wants of one stage for one slide, besides what its consumers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demand {
    /// Nothing: the stage runs for the slide only if a consumer computes it.
    None,
    /// Its output (a sink of a full run): computed, or replayed from the cache.
    Output,
    /// Its cache entry (a shard run's per-slide stages): computed unless already cached.
    Cached,
}

/// Decides every state for a full run: sinks are wanted, everything else as consumers need.
///
/// `order` is a topological order of stage indices; `consumers[s]` the stages reading `s`;
/// `cached(stage, slide)` says whether a valid cache entry exists (only asked for cached stages).
pub fn decide(
    order: &[usize],
    consumers: &[Vec<usize>],
    cache_enabled: &[bool],
    n_slides: usize,
    cached: impl FnMut(usize, usize) -> bool,
) -> Vec<Vec<SlideState>> {
    decide_with(
        order,
        consumers,
        cache_enabled,
        n_slides,
        |stage, _| {
            if consumers[stage].is_empty() {
                Demand::Output
            } else {
                Demand::None
            }
        },
        cached,
    )
}

#[allow(clippy::needless_range_loop)] // states[stage][slide] and states[consumer][slide]
/// Decides every state, walking stages from the sinks up: a stage is needed for a slide when a
/// consumer computes it or `demand` wants its output; a needed, cached stage whose entry is
/// valid replays it. A stage whose entry alone is demanded and exists is skipped.
pub fn decide_with(
    order: &[usize],
    consumers: &[Vec<usize>],
    cache_enabled: &[bool],
    n_slides: usize,
    demand: impl Fn(usize, usize) -> Demand,
    mut cached: impl FnMut(usize, usize) -> bool,
) -> Vec<Vec<SlideState>> {
    let mut states = vec![vec![SlideState::Skip; n_slides]; consumers.len()];
    for &stage in order.iter().rev() {
        for slide in 0..n_slides {
            let consumed = consumers[stage]
                .iter()
                .any(|&c| states[c][slide] == SlideState::Compute);
            let mut is_cached = || cache_enabled[stage] && cached(stage, slide);
            states[stage][slide] = match (consumed, demand(stage, slide)) {
                (true, _) | (false, Demand::Output) => {
                    if is_cached() {
                        SlideState::Replay
                    } else {
                        SlideState::Compute
                    }
                }
                (false, Demand::Cached) => {
                    if is_cached() {
                        SlideState::Skip
                    } else {
                        SlideState::Compute
                    }
                }
                (false, Demand::None) => SlideState::Skip,
            };
        }
    }
    states
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlideState::*;

    #[test]
    fn cached_embeddings_skip_tiling() {
        // tile(0) -> embed(1) -> train(2); embed cached for slide 0 only.
        let consumers = vec![vec![1], vec![2], vec![]];
        let states = decide(
            &[0, 1, 2],
            &consumers,
            &[true, true, false],
            2,
            |s, slide| s == 1 && slide == 0,
        );
        assert_eq!(states[2], vec![Compute, Compute]);
        assert_eq!(states[1], vec![Replay, Compute]);
        assert_eq!(states[0], vec![Skip, Compute]);
    }

    #[test]
    fn fan_out_keeps_upstream_when_one_branch_misses() {
        // src(0) -> a(1), src(0) -> b(2); a cached, b not.
        let consumers = vec![vec![1, 2], vec![], vec![]];
        let states = decide(&[0, 1, 2], &consumers, &[false, true, false], 1, |s, _| {
            s == 1
        });
        assert_eq!(states[1], vec![Replay]);
        assert_eq!(states[0], vec![Compute]);
    }

    #[test]
    fn shard_demand_computes_missing_entries_only_and_skips_the_rest() {
        // tile(0) -> embed(1) -> train(2); a shard wants embed entries of slides 0 and 1 only;
        // slide 0's embedding is cached, slide 1's tiles are.
        let consumers = vec![vec![1], vec![2], vec![]];
        let states = decide_with(
            &[0, 1, 2],
            &consumers,
            &[true, true, false],
            3,
            |stage, slide| {
                if stage == 1 && slide < 2 {
                    Demand::Cached
                } else {
                    Demand::None
                }
            },
            |s, slide| (s == 1 && slide == 0) || (s == 0 && slide == 1),
        );
        assert_eq!(states[2], vec![Skip, Skip, Skip]);
        assert_eq!(states[1], vec![Skip, Compute, Skip]);
        assert_eq!(states[0], vec![Skip, Replay, Skip]);
    }
}
