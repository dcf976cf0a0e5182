//! Per slide and stage, what the run must do: compute, replay from the cache, or skip.
//! Worked out before anything runs, from the cache keys alone, so that a run whose embeddings
//! are cached never opens a slide.

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
