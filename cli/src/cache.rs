//! `tessera cache ls|gc`: what the cache holds, and pruning it.

use crate::args::CacheCommand;
use crate::load::Loaded;
use crate::sweep::plan;
use anyhow::Context;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tessera_pipeline::cache::{entry_key, list_entries};
use tessera_pipeline::plan::Plan;
use tessera_pipeline::Registry;

/// The cache folder named by `target`: the folder itself, or an experiment's `cache_dir`.
fn cache_dir_of(target: &Path, registry: &Registry) -> anyhow::Result<PathBuf> {
    Ok(cache_dir_and_ttl(target, registry)?.0)
}

/// The cache folder and claim TTL of a folder (default TTL) or an experiment.
fn cache_dir_and_ttl(
    target: &Path,
    registry: &Registry,
) -> anyhow::Result<(PathBuf, std::time::Duration)> {
    if target.is_file() {
        let (exp, _) =
            crate::load::single(target, &[], registry).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ttl = std::time::Duration::from_secs(exp.config.claim_ttl_s);
        Ok((exp.cache_dir, ttl))
    } else {
        Ok((target.to_path_buf(), tessera_pipeline::claim::DEFAULT_TTL))
    }
}

/// `tessera cache ls|gc`.
pub fn cache_command(command: CacheCommand, registry: &Registry) -> anyhow::Result<()> {
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
                let keys = used_cache_keys(exp_file, registry)?;
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
                    if !tessera_pipeline::claim::claim_file_is_stale(&e.path, ttl) {
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

/// Every cache key an experiment uses — for a sweep, the keys of every point (a swept
/// upstream parameter gives each point its own entries) — for `cache gc --keep`.
fn used_cache_keys(file: &Path, registry: &Registry) -> anyhow::Result<Vec<String>> {
    let base = match Loaded::read(file, &[], registry).map_err(|e| anyhow::anyhow!("{e}"))? {
        Loaded::Single { exp, graph } => return Ok(Plan::for_experiment(&graph, &exp)?.used_keys()),
        Loaded::Sweep { base } => base,
    };
    let points = plan(&base, &[], registry, &base.out_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut keys = Vec::new();
    for p in &points {
        keys.extend(Plan::for_experiment(&p.graph, &p.exp)?.used_keys());
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}
