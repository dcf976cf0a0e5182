//! The dataset: one row per slide, read from the CSV the field already keeps
//! (`slide_id,path,label[,split][,case_id][,mpp]`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::task::Task;

/// One slide of the dataset. Shared by every message about it, so it is cheap to pass along.
#[derive(Debug, Clone, PartialEq)]
pub struct Slide {
    /// Position in the dataset: lets the engine keep per-slide state in plain vectors.
    pub index: usize,
    /// The dataset's identifier; every table row carries it as `slide_id`.
    pub id: String,
    /// The slide file (absolute, or relative to the dataset CSV's folder when it was read);
    /// `None` for datasets whose features come from elsewhere.
    pub path: Option<PathBuf>,
    /// The class label, as written in the CSV.
    pub label: Option<String>,
    /// `train`, `val` or `test` when the CSV says so; otherwise splits are made later.
    pub split: Option<String>,
    /// The patient: splits never put one patient on both sides.
    pub case_id: Option<String>,
    /// Microns per pixel at level 0, for slides whose metadata lacks it.
    pub mpp: Option<f64>,
    /// Any other CSV columns, kept for custom stages.
    pub extra: BTreeMap<String, String>,
}

/// A slide as passed between threads.
pub type SlideHandle = Arc<Slide>;

/// Why a dataset CSV could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset {path}: {source}")]
    Read { path: PathBuf, source: csv::Error },
    #[error("dataset {path}: missing required column `{column}` (columns are: {found})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
    },
    #[error("dataset {path}, line {line}: {message}")]
    Row {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("dataset {path}: task {task} needs a `{column}` column (columns are: {found})")]
    TaskColumn {
        path: PathBuf,
        task: Task,
        column: &'static str,
        found: String,
    },
    #[error("dataset {path}: no slides")]
    Empty { path: PathBuf },
}

/// A slide whose row has no value in a column its task needs: kept in the dataset (its tiles
/// and embeddings are cached as any other's), reported, and left out by the stages that need
/// the value (`sample` warns about it in run.json).
#[derive(Debug, Clone, PartialEq)]
pub struct MissingTarget {
    pub slide_id: String,
    pub line: u64,
    pub column: &'static str,
}

impl std::fmt::Display for MissingTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}: slide `{}` has no `{}`; it is left out of training and evaluation",
            self.line, self.slide_id, self.column
        )
    }
}

/// A dataset read for a task: its slides and those without a target.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub slides: Vec<SlideHandle>,
    pub missing: Vec<MissingTarget>,
}

/// Reads a dataset CSV. Relative slide paths are resolved against the CSV's folder so an
/// experiment can be run from anywhere.
pub fn read_dataset(path: &Path) -> Result<Vec<SlideHandle>, DatasetError> {
    read_dataset_for(path, Task::Classification).map(|d| d.slides)
}

/// Reads a dataset CSV and checks the columns `task` needs (`time` and `event` for survival,
/// `target` for regression): a missing column or an invalid value is an error with the line;
/// a slide without a value is listed in [`Dataset::missing`].
pub fn read_dataset_for(path: &Path, task: Task) -> Result<Dataset, DatasetError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|source| DatasetError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let headers = reader
        .headers()
        .map_err(|source| DatasetError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let id_col = column("slide_id").ok_or_else(|| DatasetError::MissingColumn {
        path: path.to_path_buf(),
        column: "slide_id".into(),
        found: headers.iter().collect::<Vec<_>>().join(","),
    })?;
    let known = ["slide_id", "path", "label", "split", "case_id", "mpp"];
    let (path_col, label_col, split_col, case_col, mpp_col) = (
        column("path"),
        column("label"),
        column("split"),
        column("case_id"),
        column("mpp"),
    );
    for &needed in task.columns() {
        if column(needed).is_none() {
            return Err(DatasetError::TaskColumn {
                path: path.to_path_buf(),
                task,
                column: needed,
                found: headers.iter().collect::<Vec<_>>().join(","),
            });
        }
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut slides = Vec::new();
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    for (row_index, record) in reader.records().enumerate() {
        let record = record.map_err(|source| DatasetError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let line = record
            .position()
            .map(|p| p.line())
            .unwrap_or(row_index as u64 + 2);
        let field = |col: Option<usize>| {
            col.and_then(|c| record.get(c))
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let id = field(Some(id_col)).ok_or_else(|| DatasetError::Row {
            path: path.to_path_buf(),
            line,
            message: "empty slide_id".into(),
        })?;
        if !seen.insert(id.clone()) {
            return Err(DatasetError::Row {
                path: path.to_path_buf(),
                line,
                message: format!("slide_id `{id}` appears twice"),
            });
        }
        let mpp = match field(mpp_col) {
            None => None,
            Some(v) => Some(v.parse::<f64>().ok().filter(|m| *m > 0.0).ok_or_else(|| {
                DatasetError::Row {
                    path: path.to_path_buf(),
                    line,
                    message: format!("mpp `{v}` is not a positive number"),
                }
            })?),
        };
        let split = field(split_col).map(|s| s.to_ascii_lowercase());
        if let Some(s) = &split {
            if !["train", "val", "test"].contains(&s.as_str()) {
                return Err(DatasetError::Row {
                    path: path.to_path_buf(),
                    line,
                    message: format!("split `{s}` is not one of train, val, test"),
                });
            }
        }
        let extra: BTreeMap<String, String> = headers
            .iter()
            .enumerate()
            .filter(|(_, h)| !known.contains(h))
            .filter_map(|(i, h)| record.get(i).map(|v| (h.to_string(), v.to_string())))
            .collect();
        match task.check_row(&extra) {
            Ok(None) => {}
            Ok(Some(column)) => missing.push(MissingTarget {
                slide_id: id.clone(),
                line,
                column,
            }),
            Err(message) => {
                return Err(DatasetError::Row {
                    path: path.to_path_buf(),
                    line,
                    message: format!("slide `{id}`: {message} (task {task})"),
                })
            }
        }
        slides.push(Arc::new(Slide {
            index: slides.len(),
            id,
            path: field(path_col).map(|p| crate::paths::resolve_path(base, Path::new(&p))),
            label: field(label_col),
            split,
            case_id: field(case_col),
            mpp,
            extra,
        }));
    }
    if slides.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(Dataset { slides, missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rows_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "slide_id,path,label,split,site\na,slides/a.svs,tumor,train,x\nb,/abs/b.svs,normal,,y\n").unwrap();
        let slides = read_dataset(&csv).unwrap();
        assert_eq!(slides.len(), 2);
        assert_eq!(
            slides[0].path.as_deref(),
            Some(dir.path().join("slides/a.svs").as_path())
        );
        assert_eq!(slides[1].path.as_deref(), Some(Path::new("/abs/b.svs")));
        assert_eq!(slides[0].split.as_deref(), Some("train"));
        assert_eq!(slides[1].split, None);
        assert_eq!(slides[1].extra.get("site").map(String::as_str), Some("y"));
        assert_eq!(slides[1].index, 1);
    }

    #[test]
    fn survival_and_regression_columns_are_checked_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "slide_id,path,time\na,a.svs,3\n").unwrap();
        let err = read_dataset_for(&csv, Task::Survival)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("d.csv") && err.contains("`event`") && err.contains("survival"),
            "{err}"
        );
        std::fs::write(&csv, "slide_id,time,event\na,3,1\nb,4,2\n").unwrap();
        let err = read_dataset_for(&csv, Task::Survival)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("d.csv, line 3") && err.contains("`b`") && err.contains("`event` `2`"),
            "{err}"
        );
        std::fs::write(&csv, "slide_id,target\na,1.5\nb,\nc,x\n").unwrap();
        let err = read_dataset_for(&csv, Task::Regression)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 4") && err.contains("`target` `x` is not a number"),
            "{err}"
        );
        std::fs::write(&csv, "slide_id,target\na,1.5\nb,\n").unwrap();
        let d = read_dataset_for(&csv, Task::Regression).unwrap();
        assert_eq!(d.slides.len(), 2);
        assert_eq!(d.missing.len(), 1);
        assert_eq!(
            d.missing[0].to_string(),
            "line 3: slide `b` has no `target`; it is left out of training and evaluation"
        );
        // Classification ignores those columns.
        assert!(read_dataset(&csv).is_ok());
    }

    #[test]
    fn rejects_missing_slide_id_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "id,path\na,b\n").unwrap();
        let err = read_dataset(&csv).unwrap_err().to_string();
        assert!(err.contains("slide_id"), "{err}");
        std::fs::write(&csv, "slide_id,path\na,b\na,c\n").unwrap();
        let err = read_dataset(&csv).unwrap_err().to_string();
        assert!(err.contains("twice") && err.contains("line 3"), "{err}");
    }
}
