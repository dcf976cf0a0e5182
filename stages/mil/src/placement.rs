//! Where tiles land on the sparse map, as one value that travels with the model: `sparse_map`
//! records its [`Placement`] in its output schema's metadata ([`PLACEMENT_METADATA`]), `train`
//! stores it in the checkpoint, and the heatmap places a new slide's tiles with it, through the
//! same [`Placement::cells`] that placed the training bags.

use arrow::datatypes::Schema;
use serde::{Deserialize, Serialize};

use crate::error::MilError;
use crate::sparse_map::{infer_grid_step, place, CollisionPolicy, Downsample, PlacedBag};

/// Schema metadata key holding the [`Placement`] (JSON) of the `sparse_map` that built a map.
pub const PLACEMENT_METADATA: &str = "tessera.placement";

/// The downsampling factor of a placement and its unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "unit", rename_all = "snake_case", deny_unknown_fields)]
pub enum Scale {
    /// `d` in tile-grid units; `step_px` is the grid step in level-0 pixels when the stage
    /// fixed it (`grid_step_px`), else it is measured per slide.
    Grid { d: f64, step_px: Option<i64> },
    /// `d` in level-0 pixels.
    Pixels { d: f64 },
}

/// Everything that decides where a bag's tiles land and how colliding tiles merge, with the
/// defaults resolved, so that a later change of a default cannot move an old model's tiles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub scale: Scale,
    pub collision: CollisionPolicy,
}

impl Placement {
    /// Whether [`Placement::cells`] infers the grid step from the tiles themselves (tile-grid
    /// units, no fixed step, no measured one): only then does it need their `tile_size`.
    pub fn infers_step(&self, measured_step: Option<i64>) -> bool {
        matches!(self.scale, Scale::Grid { step_px: None, .. }) && measured_step.is_none()
    }

    /// The cell `(map_i, map_j)` of each tile at level-0 (`xs`, `ys`), shifted so the minimum
    /// over the tiles is `(0, 0)`, and a note for the user when the grid step was guessed. In
    /// tile-grid units the step is the placement's own, else `measured_step` (measured on all
    /// of the slide's tiles, the `grid_step` column of `sample`), else inferred from these
    /// tiles (`tile_size` when they all share one position).
    pub fn cells(
        &self,
        xs: &[i64],
        ys: &[i64],
        tile_size: i64,
        measured_step: Option<i64>,
    ) -> PlacedBag {
        let d = match self.scale {
            Scale::Pixels { d } => return (place(xs, ys, Downsample::Pixels { d }), None),
            Scale::Grid { d, .. } => d,
        };
        let mut note = None;
        let step = match (self.scale, measured_step) {
            (
                Scale::Grid {
                    step_px: Some(step),
                    ..
                },
                _,
            ) => step,
            (_, Some(step)) => step,
            _ => match infer_grid_step(xs, ys, tile_size) {
                Some(g) => {
                    if !g.regular {
                        note = Some(format!(
                            "tile coordinates are not on a regular grid; using the smallest distance \
                             between tiles ({} px) as the grid step (set `grid_step_px` to override)",
                            g.step
                        ));
                    }
                    g.step
                }
                None => tile_size.max(1),
            },
        };
        (place(xs, ys, Downsample::Grid { d, step }), note)
    }

    /// The placement recorded in `schema`'s metadata by a `sparse_map` upstream, if any.
    pub fn from_schema(schema: &Schema) -> Result<Option<Placement>, MilError> {
        schema
            .metadata()
            .get(PLACEMENT_METADATA)
            .map(|text| {
                serde_json::from_str(text).map_err(|e| {
                    MilError::Invalid(format!(
                        "schema metadata `{PLACEMENT_METADATA}` is not a sparse-map placement ({e}): {text}"
                    ))
                })
            })
            .transpose()
    }

    /// `schema` with this placement recorded in its metadata.
    pub fn record_in(&self, schema: &Schema) -> Schema {
        let mut metadata = schema.metadata().clone();
        metadata.insert(PLACEMENT_METADATA.to_string(), self.to_string());
        Schema::new_with_metadata(schema.fields().clone(), metadata)
    }
}

/// The JSON recorded in schemas and checkpoints.
impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
        f.write_str(&json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse_map::SparseMapParams;
    use arrow::datatypes::{DataType, Field};

    #[test]
    fn a_placement_survives_schema_metadata_and_json() {
        let p = SparseMapParams {
            downsample: Some(3.0),
            collision: CollisionPolicy::Max,
            ..Default::default()
        }
        .placement();
        assert_eq!(
            p,
            Placement {
                scale: Scale::Grid {
                    d: 3.0,
                    step_px: None
                },
                collision: CollisionPolicy::Max
            }
        );
        let schema = p.record_in(&Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        assert_eq!(Placement::from_schema(&schema).unwrap(), Some(p));
        assert_eq!(
            Placement::from_schema(&Schema::new(Vec::<Field>::new())).unwrap(),
            None
        );
        let px = SparseMapParams {
            downsample_px: Some(128.0),
            ..Default::default()
        }
        .placement();
        assert_eq!(
            px.to_string(),
            r#"{"scale":{"unit":"pixels","d":128.0},"collision":"mean"}"#
        );
        // The default factor is resolved, not left to a future default.
        let default = SparseMapParams::default().placement();
        assert_eq!(
            default.scale,
            Scale::Grid {
                d: crate::sparse_map::DEFAULT_DOWNSAMPLE,
                step_px: None
            }
        );
    }

    #[test]
    fn the_step_is_fixed_then_measured_then_inferred() {
        let grid = |step_px| Placement {
            scale: Scale::Grid { d: 1.0, step_px },
            collision: CollisionPolicy::Mean,
        };
        // Tiles 0 and 2 of a 256-step grid: inference alone sees step 512.
        let (xs, ys) = ([0, 512], [0, 0]);
        assert_eq!(grid(None).cells(&xs, &ys, 256, None).0, [(0, 0), (0, 1)]);
        assert_eq!(
            grid(None).cells(&xs, &ys, 256, Some(256)).0,
            [(0, 0), (0, 2)]
        );
        assert_eq!(
            grid(Some(256)).cells(&xs, &ys, 256, Some(512)).0,
            [(0, 0), (0, 2)]
        );
        let (_, note) = grid(None).cells(&[0, 257, 511], &[0, 0, 3], 256, None);
        assert!(note.is_some_and(|n| n.contains("not on a regular grid")));
        assert!(grid(None).infers_step(None));
        assert!(!grid(None).infers_step(Some(4)));
        assert!(!grid(Some(4)).infers_step(None));
    }
}
