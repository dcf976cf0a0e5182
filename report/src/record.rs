//! `sweep.json`: what every point of a sweep ran with and what each of its stages did (cache
//! hits, misses, skipped slides), so the aggregate report shows that tiling and embedding ran
//! once per slide across the whole sweep. Also read back by `tessera report`.

use crate::error::ReportError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// The file name of the aggregate report in a sweep's output folder.
pub const SWEEP_FILE: &str = "sweep.json";
/// The metrics file each run's `evaluate` stage writes.
pub const METRICS_FILE: &str = "metrics.json";

/// One stage of one point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PointStage {
    pub name: String,
    pub kind: String,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Slides the stage did not touch because everything downstream was cached.
    pub skipped: u64,
    pub items_in: u64,
    pub seconds: f64,
}

/// One point of a sweep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PointRecord {
    /// Folder name under the sweep's output folder.
    pub name: String,
    /// Swept key -> value of this point.
    pub params: Map<String, Value>,
    /// The experiment seed, when `seeds:` repeats the grid.
    pub seed: Option<u64>,
    /// `ok`, `failed`, `cancelled`, or `not run`.
    pub status: String,
    pub seconds: f64,
    pub stages: Vec<PointStage>,
    /// Why the point could not run, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Warnings that make the point's results untrustworthy (e.g. training collapsed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
    /// The run's metrics.json, loaded on demand (not part of sweep.json).
    #[serde(skip)]
    pub metrics: Option<Value>,
}

/// Totals of one stage over the whole sweep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTotals {
    pub name: String,
    pub kind: String,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub skipped: u64,
    /// The points in which this stage computed something (had cache misses).
    pub points_with_misses: Vec<String>,
}

/// The whole of sweep.json.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    pub name: String,
    pub tool: String,
    /// The swept keys, in declaration order.
    pub keys: Vec<String>,
    pub seeds: Vec<u64>,
    pub seconds: f64,
    pub points: Vec<PointRecord>,
    pub stages: Vec<StageTotals>,
}

fn read_json(path: &Path) -> Result<Value, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ReportError::Json {
        path: path.to_path_buf(),
        source,
    })
}

impl SweepRecord {
    /// Recomputes the per-stage totals from the points.
    pub fn total(&mut self) {
        let mut totals: Vec<StageTotals> = Vec::new();
        for p in &self.points {
            for s in &p.stages {
                let t = match totals.iter().position(|t| t.name == s.name) {
                    Some(i) => &mut totals[i],
                    None => {
                        totals.push(StageTotals {
                            name: s.name.clone(),
                            kind: s.kind.clone(),
                            ..StageTotals::default()
                        });
                        totals.last_mut().expect("just pushed")
                    }
                };
                t.cache_hits += s.cache_hits;
                t.cache_misses += s.cache_misses;
                t.skipped += s.skipped;
                if s.cache_misses > 0 {
                    t.points_with_misses.push(p.name.clone());
                }
            }
        }
        self.stages = totals;
    }

    /// Writes `dir/sweep.json` (through a temporary file, so readers never see half of it).
    pub fn write(&self, dir: &Path) -> Result<(), ReportError> {
        let path = dir.join(SWEEP_FILE);
        let tmp = dir.join(format!(".{SWEEP_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(|source| ReportError::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&tmp, text).map_err(|e| ReportError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ReportError::io(&path, e))
    }

    /// Reads a run's output folder: a sweep's `sweep.json`, or a single run (metrics.json at
    /// the top) as a sweep of one unnamed point. Loads every point's metrics.json.
    pub fn read(dir: &Path) -> Result<SweepRecord, ReportError> {
        let sweep_path = dir.join(SWEEP_FILE);
        let mut record = if sweep_path.exists() {
            serde_json::from_value(read_json(&sweep_path)?).map_err(|source| ReportError::Json {
                path: sweep_path.clone(),
                source,
            })?
        } else if dir.join(METRICS_FILE).exists() {
            SweepRecord::single(dir)
        } else {
            return Err(ReportError::NotARun(dir.to_path_buf()));
        };
        record.load_metrics(dir)?;
        Ok(record)
    }

    /// A single run's folder as a sweep of one point named `.`.
    pub fn single(dir: &Path) -> SweepRecord {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        SweepRecord {
            name,
            points: vec![PointRecord {
                name: ".".into(),
                status: "ok".into(),
                ..PointRecord::default()
            }],
            ..SweepRecord::default()
        }
    }

    /// Loads each point's metrics.json (points without one keep `None`).
    pub fn load_metrics(&mut self, dir: &Path) -> Result<(), ReportError> {
        for p in &mut self.points {
            let path = dir.join(&p.name).join(METRICS_FILE);
            p.metrics = if path.exists() {
                Some(read_json(&path)?)
            } else {
                None
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_name_the_points_that_computed() {
        let stage = |name: &str, misses| PointStage {
            name: name.into(),
            kind: name.into(),
            cache_misses: misses,
            cache_hits: 4 - misses,
            ..PointStage::default()
        };
        let mut r = SweepRecord {
            points: vec![
                PointRecord {
                    name: "p0".into(),
                    stages: vec![stage("embed", 4), stage("train", 0)],
                    ..PointRecord::default()
                },
                PointRecord {
                    name: "p1".into(),
                    stages: vec![stage("embed", 0), stage("train", 0)],
                    ..PointRecord::default()
                },
            ],
            ..SweepRecord::default()
        };
        r.total();
        assert_eq!(r.stages[0].name, "embed");
        assert_eq!(r.stages[0].cache_misses, 4);
        assert_eq!(r.stages[0].cache_hits, 4);
        assert_eq!(r.stages[0].points_with_misses, ["p0"]);
        assert!(r.stages[1].points_with_misses.is_empty());
        let dir = tempfile::tempdir().unwrap();
        r.write(dir.path()).unwrap();
        let back = SweepRecord::read(dir.path()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_folder_without_results_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = SweepRecord::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("neither sweep.json nor metrics.json"), "{err}");
    }
}
