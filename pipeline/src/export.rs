//! `tessera export`: a cached stage's per-slide output (embeddings) written for other tools,
//! one slide at a time (memory holds one slide): per-slide files through a registered
//! [`crate::registry::SlideExporter`] (TRIDENT's HDF5 layout) and/or one Parquet file.

use crate::cache::Cache;
use crate::config::Experiment;
use crate::graph::Graph;
use crate::registry::Registry;
use anyhow::{bail, Context};
use parquet::arrow::ArrowWriter;
use std::path::PathBuf;

/// What to export where.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The stage whose cached output to export; default: the only cached stage whose output
    /// has an `embedding` column.
    pub stage: Option<String>,
    /// Folder for one TRIDENT-layout `SLIDE_ID.h5` per slide.
    pub h5: Option<PathBuf>,
    /// One Parquet file of every slide's rows.
    pub parquet: Option<PathBuf>,
}

/// Exports every slide whose entry is in the cache; slides without one are listed and left
/// out. Fails when nothing is cached.
pub fn export(
    exp: &Experiment,
    graph: &Graph,
    registry: &Registry,
    request: &Request,
) -> anyhow::Result<()> {
    if request.h5.is_none() && request.parquet.is_none() {
        bail!("nothing to write: give --h5 FOLDER and/or --parquet FILE");
    }
    let index = pick_stage(graph, request.stage.as_deref())?;
    let stage = &graph.stages[index];
    let keys = crate::plan::Plan::for_experiment(graph, exp)
        .with_context(|| format!("working out the cache keys of stage `{}`", stage.name))?
        .keys
        .into_iter()
        .nth(index)
        .unwrap_or_default();
    let trident = match &request.h5 {
        Some(dir) => {
            let f = registry
                .exporter("trident")
                .context("this build has no TRIDENT exporter registered")?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            Some((dir, f))
        }
        None => None,
    };
    let cache = Cache::new(&exp.cache_dir);
    let mut writer: Option<(PathBuf, ArrowWriter<std::fs::File>)> = None;
    let tmp_parquet = request
        .parquet
        .as_ref()
        .map(|p| p.with_extension("parquet.tmp"));
    let (mut done, mut missing) = (0usize, Vec::new());
    for (slide, key) in exp.slides.iter().zip(keys) {
        let Some(key) = key.filter(|k| cache.is_valid(&stage.kind, k)) else {
            missing.push(slide.id.clone());
            continue;
        };
        let batches = cache.read(&stage.kind, &key).with_context(|| {
            format!(
                "reading the cached `{}` of slide `{}`",
                stage.name, slide.id
            )
        })?;
        if let Some((dir, f)) = &trident {
            f(dir, &slide.id, &batches).map_err(anyhow::Error::msg)?;
        }
        if let (Some(tmp), Some(first)) = (&tmp_parquet, batches.first()) {
            if writer.is_none() {
                let file = std::fs::File::create(tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                let w = ArrowWriter::try_new(file, first.schema(), None)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                writer = Some((tmp.clone(), w));
            }
            if let Some((path, w)) = writer.as_mut() {
                for b in &batches {
                    w.write(b).with_context(|| {
                        format!("writing {} (slide `{}`)", path.display(), slide.id)
                    })?;
                }
                // One row group per slide: readers stream the file slide by slide.
                w.flush()
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        done += 1;
    }
    if done == 0 {
        bail!(
            "stage `{}` has no cached output for any of the {} slides: run the experiment first (with `cache: true` on that stage)",
            stage.name,
            exp.slides.len()
        );
    }
    if let (Some((tmp, w)), Some(dest)) = (writer, &request.parquet) {
        w.close()
            .with_context(|| format!("finishing {}", tmp.display()))?;
        std::fs::rename(&tmp, dest).with_context(|| format!("writing {}", dest.display()))?;
        println!("wrote {} ({done} slides)", dest.display());
    }
    if let Some(dir) = &request.h5 {
        println!("wrote {done} TRIDENT files to {}", dir.display());
    }
    if !missing.is_empty() {
        eprintln!(
            "{} slides have no cached `{}` output and were left out: {}",
            missing.len(),
            stage.name,
            missing.join(", ")
        );
    }
    Ok(())
}

/// The stage named `name`, else the only cached stage with an `embedding` column.
fn pick_stage(graph: &Graph, name: Option<&str>) -> anyhow::Result<usize> {
    if let Some(name) = name {
        let i = graph
            .stages
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no stage `{name}` in the experiment"))?;
        if !graph.stages[i].cache {
            bail!("stage `{name}` is not cached (`cache: true`): nothing to export");
        }
        return Ok(i);
    }
    let candidates: Vec<usize> = (0..graph.stages.len())
        .filter(|&i| {
            let s = &graph.stages[i];
            s.cache && s.output_schema.field_with_name("embedding").is_ok()
        })
        .collect();
    match candidates.as_slice() {
        [i] => Ok(*i),
        [] => bail!("no cached stage outputs embeddings: name one with --stage"),
        many => bail!(
            "several cached stages output embeddings ({}): name one with --stage",
            many.iter()
                .map(|&i| graph.stages[i].name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
