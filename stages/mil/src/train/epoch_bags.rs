//! The bags of one epoch as `train` receives them. The trainer needs the whole epoch before its
//! first step (it orders the bags itself, so that the result does not depend on the order in
//! which parallel upstreams deliver them), which made `train`'s memory grow with the cohort:
//! `tiles_per_slide / tiles` of every embedding, every epoch. Here bags stay in memory up to a
//! budget; the embeddings of the rest are appended to an unlinked spill file, which is mapped
//! once the epoch is complete and read back (bit for bit) bag by bag as batches are built.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::TrainError;
use crate::models::{Bag, EmbeddingRows};

/// Bags of the epoch in progress, in arrival order.
pub struct EpochBags {
    entries: Vec<Entry>,
    /// Bytes of embeddings held in memory.
    in_memory: usize,
    budget: usize,
    spill_dir: PathBuf,
    spill: Option<SpillFile>,
}

enum Entry {
    InMemory(Bag),
    /// A bag whose embeddings (`len` values at byte `offset`) are in the spill file; its own
    /// `embeddings` are empty until [`EpochBags::seal`].
    Spilled {
        bag: Bag,
        offset: usize,
        len: usize,
    },
}

/// An append-only file that no longer has a name: nothing is left behind, even after a kill.
struct SpillFile {
    path: PathBuf,
    writer: BufWriter<File>,
    written: usize,
}

impl EpochBags {
    /// Keeps up to `budget_bytes` of embeddings in memory, the rest in a file under
    /// `spill_dir` (created when first needed).
    pub fn new(budget_bytes: usize, spill_dir: PathBuf) -> Self {
        EpochBags {
            entries: Vec::new(),
            in_memory: 0,
            budget: budget_bytes,
            spill_dir,
            spill: None,
        }
    }

    /// An empty epoch with the same budget and spill folder.
    pub fn next_epoch(&self) -> Self {
        EpochBags::new(self.budget, self.spill_dir.clone())
    }

    /// True before the epoch's first bag.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many bags went to the spill file.
    pub fn spilled(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e, Entry::Spilled { .. }))
            .count()
    }

    /// Adds a bag: in memory while the budget allows, otherwise its embeddings go to disk.
    /// Bags of tile pixels (end-to-end training) always stay in memory.
    pub fn push(&mut self, mut bag: Bag) -> Result<(), TrainError> {
        let bytes = bag.embeddings.len() * 4;
        if bytes == 0 || self.in_memory + bytes <= self.budget {
            self.in_memory += bytes;
            self.entries.push(Entry::InMemory(bag));
            return Ok(());
        }
        let spill = match &mut self.spill {
            Some(spill) => spill,
            None => self.spill.insert(SpillFile::create(&self.spill_dir)?),
        };
        let offset = spill.append(bag.embeddings.as_bytes())?;
        let len = bag.embeddings.len();
        bag.embeddings = EmbeddingRows::default();
        self.entries.push(Entry::Spilled { bag, offset, len });
        Ok(())
    }

    /// The epoch's bags in arrival order, the spilled ones reading from the mapped file.
    pub fn seal(self) -> Result<Vec<Bag>, TrainError> {
        let map = match self.spill {
            Some(spill) => Some(spill.map()?),
            None => None,
        };
        self.entries
            .into_iter()
            .map(|entry| match entry {
                Entry::InMemory(bag) => Ok(bag),
                Entry::Spilled {
                    mut bag,
                    offset,
                    len,
                } => {
                    let Some((map, path)) = &map else {
                        unreachable!("a bag was spilled, so the file exists")
                    };
                    bag.embeddings =
                        EmbeddingRows::mapped(map.clone(), offset, len).map_err(|e| {
                            TrainError::Spill {
                                path: path.clone(),
                                message: e.to_string(),
                            }
                        })?;
                    Ok(bag)
                }
            })
            .collect()
    }
}

impl SpillFile {
    fn create(dir: &Path) -> Result<Self, TrainError> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("train-bags-{}-{n}.f32", std::process::id()));
        let io = |e: std::io::Error| TrainError::Spill {
            path: path.clone(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        std::fs::remove_file(&path).map_err(io)?;
        Ok(SpillFile {
            path,
            writer: BufWriter::with_capacity(1 << 20, file),
            written: 0,
        })
    }

    /// Appends `bytes`, returning their offset.
    fn append(&mut self, bytes: &[u8]) -> Result<usize, TrainError> {
        let offset = self.written;
        self.writer
            .write_all(bytes)
            .map_err(|e| TrainError::Spill {
                path: self.path.clone(),
                message: format!(
                    "writing the epoch's bags: {e} (free disk space or set `train.spill_dir`)"
                ),
            })?;
        self.written += bytes.len();
        Ok(offset)
    }

    fn map(self) -> Result<(Arc<memmap2::Mmap>, PathBuf), TrainError> {
        let path = self.path;
        let io = |e: std::io::Error| TrainError::Spill {
            path: path.clone(),
            message: e.to_string(),
        };
        let file = self.writer.into_inner().map_err(|e| io(e.into_error()))?;
        // SAFETY: the file is ours, unlinked at creation: nobody else can write it.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok((Arc::new(map), path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Split;

    fn bag(id: &str, values: Vec<f32>) -> Bag {
        Bag {
            slide_id: id.into(),
            label_index: 1,
            split: Split::Train,
            dim: 2,
            positions: Some(vec![[0, 1]; values.len() / 2]),
            embeddings: values.into(),
            pixels: None,
        }
    }

    #[test]
    fn bags_over_the_budget_come_back_identical_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let bags: Vec<Bag> = (0..6)
            .map(|k| {
                let values = (0..2 * (k + 1))
                    .map(|v| (v * k) as f32 * 0.5 - 1.0)
                    .collect();
                bag(&format!("s{k}"), values)
            })
            .collect();
        // Room for the first two bags (2 + 4 values = 24 bytes).
        let mut epoch = EpochBags::new(24, dir.path().to_path_buf());
        assert!(epoch.is_empty());
        for b in &bags {
            epoch.push(b.clone()).unwrap();
        }
        assert_eq!(epoch.spilled(), 4);
        let sealed = epoch.seal().unwrap();
        assert_eq!(sealed, bags);
        assert_eq!(
            sealed
                .iter()
                .map(|b| b.embeddings.is_mapped())
                .collect::<Vec<_>>(),
            [false, false, true, true, true, true]
        );
        for b in &sealed {
            b.embeddings.release_pages();
        }
        assert_eq!(sealed, bags);
        // The file was unlinked at once: nothing is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn within_the_budget_nothing_touches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("never-created");
        let mut epoch = EpochBags::new(1 << 20, missing.clone());
        epoch.push(bag("a", vec![1.0, 2.0])).unwrap();
        assert_eq!(epoch.spilled(), 0);
        assert_eq!(epoch.seal().unwrap(), vec![bag("a", vec![1.0, 2.0])]);
        assert!(!missing.exists());
    }

    #[test]
    fn an_unwritable_spill_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let mut epoch = EpochBags::new(0, file.join("sub"));
        let err = epoch
            .push(bag("a", vec![1.0, 2.0]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a-file"), "{err}");
    }
}
