//! Finding the checkpoint the heatmap scores with: a run's folder holds
//! `checkpoints/{best,last}.*` (written by `train`). The checkpoint describes its model,
//! classes and sparse-map placement itself.

use std::path::Path;

use tessera_mil::train::checkpoint::CheckpointFiles;

use crate::HeatmapError;

/// The checkpoint at `path`: a `.safetensors` or `.json` file of one, or a folder (its `best`
/// checkpoint, else its `last`), or a run folder holding `checkpoints/`.
pub fn locate_checkpoint(path: &Path) -> Result<CheckpointFiles, HeatmapError> {
    let missing = || {
        HeatmapError::Invalid(format!(
            "no checkpoint at {} (expected NAME.safetensors + NAME.json, a checkpoints folder, or a run folder; did the `train` stage finish an epoch?)",
            path.display()
        ))
    };
    if path.is_dir() {
        for dir in [path.to_path_buf(), path.join("checkpoints")] {
            for name in ["best", "last"] {
                let files = CheckpointFiles::new(&dir, name);
                if files.meta.is_file() && files.weights.is_file() {
                    return Ok(files);
                }
            }
        }
        return Err(missing());
    }
    CheckpointFiles::locate(path).map_err(|_| missing())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_best_then_last_in_run_or_checkpoint_folders() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoints");
        std::fs::create_dir_all(&ck).unwrap();
        assert!(locate_checkpoint(dir.path()).is_err());
        for f in ["last.json", "last.safetensors"] {
            std::fs::write(ck.join(f), "x").unwrap();
        }
        assert_eq!(
            locate_checkpoint(dir.path()).unwrap().meta,
            ck.join("last.json")
        );
        for f in ["best.json", "best.safetensors"] {
            std::fs::write(ck.join(f), "x").unwrap();
        }
        assert_eq!(locate_checkpoint(&ck).unwrap().meta, ck.join("best.json"));
        assert_eq!(
            locate_checkpoint(&ck.join("last.safetensors"))
                .unwrap()
                .meta,
            ck.join("last.json")
        );
    }
}
