//! `--shard i/n`: which slides one of `n` processes (a Slurm array task) tiles and embeds.
//! Slides are split by file size, not count, so shards finish together: greedy
//! longest-processing-time assignment over slides sorted by size (largest first, ties by id),
//! each going to the shard with the least bytes so far (ties to the lowest shard). Every
//! process computes the same split from the dataset alone.

use crate::slide::SlideHandle;
use std::str::FromStr;

/// One shard of `count`, numbered from 0 (as `$SLURM_ARRAY_TASK_ID` with `--array=0-(N-1)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// Why a `--shard` value is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("--shard `{0}`: expected I/N with 0 <= I < N (0-based, e.g. 0/4 .. 3/4)")]
    Syntax(String),
    #[error("--shard `{0}`: N must be at least 1")]
    ZeroCount(String),
    #[error("--shard `{value}`: shard index {index} is out of range for {count} shards (0-based: 0..={last})", last = count - 1)]
    OutOfRange {
        value: String,
        index: usize,
        count: usize,
    },
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| ShardError::Syntax(s.into()))?;
        let index: usize = i.trim().parse().map_err(|_| ShardError::Syntax(s.into()))?;
        let count: usize = n.trim().parse().map_err(|_| ShardError::Syntax(s.into()))?;
        if count == 0 {
            return Err(ShardError::ZeroCount(s.into()));
        }
        if index >= count {
            return Err(ShardError::OutOfRange {
                value: s.into(),
                index,
                count,
            });
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Shard of every slide (by dataset index), from (id, size in bytes) pairs.
pub fn assign_by_size(slides: &[(&str, u64)], count: usize) -> Vec<usize> {
    let count = count.max(1);
    let mut order: Vec<usize> = (0..slides.len()).collect();
    order.sort_by(|&a, &b| {
        slides[b]
            .1
            .cmp(&slides[a].1)
            .then_with(|| slides[a].0.cmp(slides[b].0))
    });
    let mut load = vec![0u64; count];
    let mut shard_of = vec![0usize; slides.len()];
    for i in order {
        let (target, _) = load
            .iter()
            .enumerate()
            .min_by_key(|&(s, l)| (*l, s))
            .unwrap_or((0, &0));
        shard_of[i] = target;
        // Empty or missing files still weigh something, so they spread too.
        load[target] += slides[i].1.max(1);
    }
    shard_of
}

/// A slide's size on disk: its file's, or a folder's (a DICOM series) files' summed; 0 when
/// missing.
fn slide_bytes(path: &std::path::Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

impl Shard {
    /// Which slides (by dataset index) this shard processes. Sizes come from the files;
    /// a missing file weighs nothing (it fails in its stage, reported there).
    pub fn members(&self, slides: &[SlideHandle]) -> Vec<bool> {
        let sized: Vec<(&str, u64)> = slides
            .iter()
            .map(|s| {
                let size = s.path.as_deref().map(slide_bytes).unwrap_or(0);
                (s.id.as_str(), size)
            })
            .collect();
        assign_by_size(&sized, self.count)
            .into_iter()
            .map(|s| s == self.index)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_with_clear_messages() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        assert_eq!("0/1".parse::<Shard>(), Ok(Shard { index: 0, count: 1 }));
        let e = "4/4".parse::<Shard>().unwrap_err().to_string();
        assert!(e.contains("out of range") && e.contains("0..=3"), "{e}");
        assert!("1/0".parse::<Shard>().is_err());
        let e = "3".parse::<Shard>().unwrap_err().to_string();
        assert!(e.contains("expected I/N"), "{e}");
        assert!("-1/3".parse::<Shard>().is_err());
        assert!("a/b".parse::<Shard>().is_err());
    }

    #[test]
    fn longest_first_balances_bytes_and_is_deterministic() {
        let slides = [("a", 5), ("b", 9), ("c", 2), ("d", 7), ("e", 6), ("f", 4)];
        let shard_of = assign_by_size(&slides, 3);
        // b(9)->0, d(7)->1, e(6)->2, a(5)->2 (11), f(4)->1 (11), c(2)->0 (11)
        assert_eq!(shard_of, vec![2, 0, 0, 1, 2, 1]);
        let mut load = [0u64; 3];
        for (i, s) in shard_of.iter().enumerate() {
            load[*s] += slides[i].1;
        }
        assert_eq!(load, [11, 11, 11]);
        assert_eq!(assign_by_size(&slides, 3), shard_of);
    }

    #[test]
    fn every_slide_lands_in_exactly_one_shard_and_ties_break_by_id() {
        let slides: Vec<(String, u64)> = (0..10).map(|i| (format!("s{i}"), 100)).collect();
        let refs: Vec<(&str, u64)> = slides.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let shard_of = assign_by_size(&refs, 4);
        let mut counts = [0; 4];
        for s in &shard_of {
            counts[*s] += 1;
        }
        assert_eq!(counts, [3, 3, 2, 2]);
        assert_eq!(&shard_of[..4], &[0, 1, 2, 3]);
        // More shards than slides: some are empty, none fails.
        assert_eq!(assign_by_size(&refs[..2], 5), vec![0, 1]);
    }
}
