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

#[allow(clippy::needless_range_loop)] // states[stage][slide] and states[consumer][slide]
/// Decides every state, walking stages from the sinks up: a stage is needed for a slide when
/// a consumer computes it (or the stage is a sink); a needed, cached stage whose entry is valid
/// replays it.
///
/// `order` is a topological order of stage indices; `consumers[s]` the stages reading `s`;
/// `cached(stage, slide)` says whether a valid cache entry exists (only asked for cached stages).
pub fn decide(
    order: &[usize],
    consumers: &[Vec<usize>],
    cache_enabled: &[bool],
    n_slides: usize,
    mut cached: impl FnMut(usize, usize) -> bool,
) -> Vec<Vec<SlideState>> {
    let mut states = vec![vec![SlideState::Skip; n_slides]; consumers.len()];
    for &stage in order.iter().rev() {
        for slide in 0..n_slides {
            let needed = consumers[stage].is_empty()
                || consumers[stage]
                    .iter()
                    .any(|&c| states[c][slide] == SlideState::Compute);
            states[stage][slide] = if !needed {
                SlideState::Skip
            } else if cache_enabled[stage] && cached(stage, slide) {
                SlideState::Replay
            } else {
                SlideState::Compute
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
}
