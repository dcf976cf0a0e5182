//! Checkpoints: `NAME.safetensors` (the model's parameters, loadable by any safetensors
//! reader), `NAME.optimizer.safetensors` (Adam moments and step) and `NAME.json` (epoch, step,
//! metrics, architecture and classes, so a checkpoint describes itself). Each file is written
//! to a temporary name and renamed; the JSON goes last and is what marks a checkpoint
//! complete, so an interrupted save leaves the previous checkpoint usable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::finetune::EmbedderConfig;
use super::optim::{Adam, AdamConfig};
use super::record::{BestRecord, EpochRecord};
use crate::models::ModelConfig;
use crate::placement::Placement;

/// The JSON part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Layout version of the checkpoint files.
    pub format: u32,
    /// The last completed epoch (0-based); training resumes at `epoch + 1`.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    pub model: ModelConfig,
    pub classes: Vec<String>,
    pub optimizer: AdamConfig,
    /// The record of `epoch`.
    pub metrics: EpochRecord,
    /// The best epoch at save time.
    pub best: Option<BestRecord>,
    /// Epochs since the best one (early-stopping counter).
    pub epochs_since_best: usize,
    /// The fine-tuned tile embedder (end-to-end training), whose parameters are in the
    /// weights file under `embedder.`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedder: Option<EmbedderConfig>,
    /// Where the training bags' tiles were placed on the sparse map (spatial models fed by a
    /// `sparse_map` stage), so that heatmaps place new tiles the same way. Checkpoints written
    /// before it was recorded lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// Current [`CheckpointMeta::format`].
pub const FORMAT: u32 = 1;

/// Why a checkpoint could not be written or read; names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {source}")]
    Tensors {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("checkpoint {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("checkpoint {path}: format {found}, this version reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("checkpoint {path}: no such checkpoint (expected NAME.json next to NAME.safetensors)")]
    Missing { path: PathBuf },
}

/// The three files of checkpoint `name` in `dir`.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointFiles {
    pub weights: PathBuf,
    pub optimizer: PathBuf,
    pub meta: PathBuf,
}

impl CheckpointFiles {
    /// `dir/name.safetensors`, `dir/name.optimizer.safetensors`, `dir/name.json`.
    pub fn new(dir: &Path, name: &str) -> Self {
        CheckpointFiles {
            weights: dir.join(format!("{name}.safetensors")),
            optimizer: dir.join(format!("{name}.optimizer.safetensors")),
            meta: dir.join(format!("{name}.json")),
        }
    }

    /// Finds a checkpoint from what a user may point at: its `.safetensors` or `.json` file,
    /// or a folder (then its `last` checkpoint).
    pub fn locate(path: &Path) -> Result<Self, CheckpointError> {
        let files = if path.is_dir() {
            CheckpointFiles::new(path, "last")
        } else {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let stem = name
                .strip_suffix(".optimizer.safetensors")
                .or_else(|| name.strip_suffix(".safetensors"))
                .or_else(|| name.strip_suffix(".json"))
                .unwrap_or(name);
            CheckpointFiles::new(path.parent().unwrap_or(Path::new(".")), stem)
        };
        if !files.meta.is_file() || !files.weights.is_file() {
            return Err(CheckpointError::Missing {
                path: path.to_path_buf(),
            });
        }
        Ok(files)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn rename(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    std::fs::rename(from, to).map_err(|source| CheckpointError::Io {
        path: to.to_path_buf(),
        source,
    })
}

/// Writes checkpoint `name` into `dir` (created if needed).
pub fn save(
    dir: &Path,
    name: &str,
    vars: &VarMap,
    optimizer: &Adam,
    meta: &CheckpointMeta,
) -> Result<CheckpointFiles, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let files = CheckpointFiles::new(dir, name);
    let tmp = tmp_path(&files.weights);
    vars.save(&tmp).map_err(|source| CheckpointError::Tensors {
        path: files.weights.clone(),
        source,
    })?;
    rename(&tmp, &files.weights)?;

    let state: HashMap<String, Tensor> = optimizer
        .state()
        .map_err(|source| CheckpointError::Tensors {
            path: files.optimizer.clone(),
            source,
        })?
        .into_iter()
        .collect();
    let tmp = tmp_path(&files.optimizer);
    candle_core::safetensors::save(&state, &tmp).map_err(|source| CheckpointError::Tensors {
        path: files.optimizer.clone(),
        source,
    })?;
    rename(&tmp, &files.optimizer)?;

    let json = serde_json::to_vec_pretty(meta).map_err(|source| CheckpointError::Json {
        path: files.meta.clone(),
        source,
    })?;
    let tmp = tmp_path(&files.meta);
    std::fs::write(&tmp, json).map_err(|source| CheckpointError::Io {
        path: files.meta.clone(),
        source,
    })?;
    rename(&tmp, &files.meta)?;
    Ok(files)
}

/// Reads a checkpoint's JSON.
pub fn read_meta(files: &CheckpointFiles) -> Result<CheckpointMeta, CheckpointError> {
    let bytes = std::fs::read(&files.meta).map_err(|source| CheckpointError::Io {
        path: files.meta.clone(),
        source,
    })?;
    let meta: CheckpointMeta =
        serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Json {
            path: files.meta.clone(),
            source,
        })?;
    if meta.format != FORMAT {
        return Err(CheckpointError::Format {
            path: files.meta.clone(),
            found: meta.format,
        });
    }
    Ok(meta)
}

/// Loads the weights into `vars` (every parameter of the model must be in the file, with its
/// shape) and, when the file exists, the optimizer state into `optimizer`.
pub fn load_into(
    files: &CheckpointFiles,
    vars: &mut VarMap,
    optimizer: Option<&mut Adam>,
) -> Result<(), CheckpointError> {
    vars.load(&files.weights)
        .map_err(|source| CheckpointError::Tensors {
            path: files.weights.clone(),
            source,
        })?;
    if let Some(optimizer) = optimizer {
        if files.optimizer.is_file() {
            let state = candle_core::safetensors::load(&files.optimizer, &Device::Cpu).map_err(
                |source| CheckpointError::Tensors {
                    path: files.optimizer.clone(),
                    source,
                },
            )?;
            optimizer
                .load_state(|name| state.get(name).cloned())
                .map_err(|source| CheckpointError::Tensors {
                    path: files.optimizer.clone(),
                    source,
                })?;
        }
    }
    Ok(())
}
