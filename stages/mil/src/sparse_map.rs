//! The sparse map: each tile embedding placed at its downsampled position, one row per occupied
//! cell. Two tiles landing in one cell collide; the paper loses them silently, here the policy is
//! explicit ([`CollisionPolicy`]) and every output row says how many tiles it merges.
//!
//! Positions: `map_i` (row) comes from `y`, `map_j` (column) from `x`, and both are shifted so
//! the bag's minimum is 0 (the sparse CNN is translation-equivariant; small numbers keep its
//! rulebooks cheap). The downsampling factor `d` is given either
//! - in **tile-grid units** (`downsample`, default 10 as in the original code, whose
//!   coordinates are tile indices): a tile at level-0 `x` has grid index `floor(x / step)`
//!   with `step = tile_size - overlap` and lands in column `floor(index / d)`; `d = 1` keeps
//!   one cell per tile position. The step is `grid_step_px` when set, else the `grid_step`
//!   column that `sample` measures on all the slide's tiles, else inferred from the bag
//!   ([`infer_grid_step`]);
//! - or in **level-0 pixels** (`downsample_px`): column `floor(x / d)`.

use crate::columns::{embeddings_array, int64_values, read_embeddings};
use crate::error::MilError;
use crate::placement::{Placement, Scale};
use arrow::array::{ArrayRef, Int64Array, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use tessera_pipeline::schema::{tile_key_columns, EMBEDDING, TILE_SIZE, X, Y};
use tessera_pipeline::{
    per_slide, BuildContext, InputSpec, ParamIssue, PerSlide, SlideHandle, SlideOutput, Stage,
    StageContext, StageError, StageKind, StageResult,
};

/// Column names added by the sparse map.
pub const MAP_I: &str = "map_i";
pub const MAP_J: &str = "map_j";
pub const COLLISIONS: &str = "collisions";
/// Column added by `sample`: the slide's tile-grid step in level-0 pixels.
pub const GRID_STEP: &str = "grid_step";
/// Schema metadata key telling `augment` which policy built the map.
pub const POLICY_METADATA: &str = "tessera.collision_policy";

/// How the embeddings of tiles that land in one cell are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CollisionPolicy {
    /// Element-wise mean, weighted by the tiles each row already merges (the original code's
    /// sparseconvnet `mode=4`).
    #[default]
    Mean,
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
    /// Keep the first row (in input order) and drop the others.
    First,
}

impl CollisionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            CollisionPolicy::Mean => "mean",
            CollisionPolicy::Sum => "sum",
            CollisionPolicy::Max => "max",
            CollisionPolicy::First => "first",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Mean, Self::Sum, Self::Max, Self::First]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// The result of merging rows that share a cell: one entry per occupied cell, sorted by cell.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedCells {
    pub cells: Vec<(i64, i64)>,
    /// The first input row of each cell: its other columns (slide id, x, y, ...) are kept.
    pub representative: Vec<usize>,
    /// Tiles merged into each cell (sum of the input weights).
    pub counts: Vec<i64>,
    /// Row-major `cells.len() x dim` merged embeddings.
    pub embeddings: Vec<f32>,
}

/// Merges the rows (`cells[r]`, embedding `embeddings[r*dim..]`, `weights[r]` tiles) that share
/// a cell by `policy`. Weights make re-merging exact: merging already-merged rows with `Mean`
/// gives the mean of all their tiles.
pub fn merge_cells(
    cells: &[(i64, i64)],
    weights: &[i64],
    embeddings: &[f32],
    dim: usize,
    policy: CollisionPolicy,
) -> MergedCells {
    let mut order: Vec<usize> = (0..cells.len()).collect();
    order.sort_by_key(|&r| (cells[r], r));
    let mut out = MergedCells {
        cells: Vec::new(),
        representative: Vec::new(),
        counts: Vec::new(),
        embeddings: Vec::with_capacity(embeddings.len()),
    };
    let mut start = 0;
    while start < order.len() {
        let cell = cells[order[start]];
        let mut end = start + 1;
        while end < order.len() && cells[order[end]] == cell {
            end += 1;
        }
        let group = &order[start..end];
        let row = |r: usize| &embeddings[r * dim..(r + 1) * dim];
        let first = group[0];
        let count: i64 = group.iter().map(|&r| weights[r]).sum();
        let mut merged = row(first).to_vec();
        match policy {
            CollisionPolicy::First => {}
            CollisionPolicy::Sum | CollisionPolicy::Mean => {
                let weighted = policy == CollisionPolicy::Mean;
                if weighted {
                    let w = weights[first] as f32;
                    merged.iter_mut().for_each(|v| *v *= w);
                }
                for &r in &group[1..] {
                    let w = if weighted { weights[r] as f32 } else { 1.0 };
                    merged.iter_mut().zip(row(r)).for_each(|(m, v)| *m += w * v);
                }
                if weighted && count > 0 {
                    merged.iter_mut().for_each(|v| *v /= count as f32);
                }
            }
            CollisionPolicy::Max => {
                for &r in &group[1..] {
                    merged
                        .iter_mut()
                        .zip(row(r))
                        .for_each(|(m, v)| *m = m.max(*v));
                }
            }
        }
        out.cells.push(cell);
        out.representative.push(first);
        out.counts.push(count);
        out.embeddings.extend(merged);
        start = end;
    }
    out
}

/// A tile-grid step measured on a slide's coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridStep {
    pub step: i64,
    /// False when the coordinates do not lie on a regular grid (the greatest common divisor of
    /// their offsets is under a quarter of the tile size): `step` is then the smallest distance
    /// between distinct coordinates.
    pub regular: bool,
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

/// The level-0 distance between neighbouring tiles (`tile_size - overlap`): the greatest common
/// divisor of the coordinates' offsets from their minimum, over both axes (exact on a regular
/// grid, even with tiles missing). `None` when every tile has the same position.
pub fn infer_grid_step(xs: &[i64], ys: &[i64], tile_size: i64) -> Option<GridStep> {
    let mut g = 0;
    let mut smallest = i64::MAX;
    for values in [xs, ys] {
        let Some(&min) = values.iter().min() else {
            continue;
        };
        for &v in values {
            g = gcd(g, v - min);
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if let Some(d) = sorted.windows(2).map(|w| w[1] - w[0]).min() {
            smallest = smallest.min(d);
        }
    }
    if g == 0 {
        return None;
    }
    if tile_size > 0 && g * 4 < tile_size && smallest != i64::MAX {
        return Some(GridStep {
            step: smallest,
            regular: false,
        });
    }
    Some(GridStep {
        step: g,
        regular: true,
    })
}

/// Where a tile lands: the downsampling factor and its unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Downsample {
    /// `d` in tile-grid units, with the grid step in level-0 pixels.
    Grid { d: f64, step: i64 },
    /// `d` in level-0 pixels.
    Pixels { d: f64 },
}

/// The cell `(map_i, map_j)` of each tile, shifted so the minimum over the bag is `(0, 0)`.
pub fn place(xs: &[i64], ys: &[i64], downsample: Downsample) -> Vec<(i64, i64)> {
    let coord = |v: i64| -> i64 {
        match downsample {
            Downsample::Grid { d, step } => (v.div_euclid(step.max(1)) as f64 / d).floor() as i64,
            Downsample::Pixels { d } => (v as f64 / d).floor() as i64,
        }
    };
    let cells: Vec<(i64, i64)> = ys
        .iter()
        .zip(xs)
        .map(|(&y, &x)| (coord(y), coord(x)))
        .collect();
    shift_to_origin(cells)
}

/// Translates cells so the smallest row and the smallest column are 0.
pub fn shift_to_origin(mut cells: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    let min_i = cells.iter().map(|c| c.0).min().unwrap_or(0);
    let min_j = cells.iter().map(|c| c.1).min().unwrap_or(0);
    for c in &mut cells {
        c.0 -= min_i;
        c.1 -= min_j;
    }
    cells
}

/// The output schema for an input schema: the input's columns (any previous `map_i`, `map_j`,
/// `collisions` dropped), then `map_i`, `map_j`, `collisions`.
pub fn sparse_map_schema(input: &Schema, policy: Option<CollisionPolicy>) -> SchemaRef {
    let mut fields: Vec<Field> = input
        .fields()
        .iter()
        .filter(|f| ![MAP_I, MAP_J, COLLISIONS].contains(&f.name().as_str()))
        .map(|f| f.as_ref().clone())
        .collect();
    for name in [MAP_I, MAP_J, COLLISIONS] {
        fields.push(Field::new(name, DataType::Int64, false));
    }
    let mut metadata = input.metadata().clone();
    if let Some(p) = policy {
        metadata.insert(POLICY_METADATA.to_string(), p.as_str().to_string());
    }
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// Counts for the collision report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Tiles in (the sum of input weights).
    pub tiles: i64,
    /// Rows in.
    pub rows_in: usize,
    /// Occupied cells out.
    pub cells: usize,
    /// Cells out that merge more than one input row.
    pub merged_cells: usize,
}

impl MergeStats {
    /// Input rows that were merged into another one.
    pub fn collided_rows(&self) -> usize {
        self.rows_in - self.cells
    }
}

/// Places `batch`'s rows at `cells` (one per row) and merges those sharing a cell: the rows of
/// the result are the occupied cells, sorted, with the first row's other columns, the merged
/// embedding, `map_i`, `map_j` and `collisions`. `weights` are the tiles each row already
/// merges (all 1 for tiles).
pub fn merge_bag(
    batch: &RecordBatch,
    cells: &[(i64, i64)],
    weights: &[i64],
    policy: CollisionPolicy,
) -> Result<(RecordBatch, MergeStats), MilError> {
    // Tile pixels (end-to-end training) cannot be averaged: each cell keeps its first tile.
    let emb = if batch.column_by_name(EMBEDDING).is_some() {
        Some(read_embeddings(batch, EMBEDDING)?)
    } else if policy == CollisionPolicy::First {
        None
    } else {
        return Err(MilError::Invalid(pixels_policy_message(policy)));
    };
    let (values, dim): (&[f32], usize) = match &emb {
        Some(e) => (&e.values, e.dim),
        None => (&[], 0),
    };
    let merged = merge_cells(cells, weights, values, dim, policy);
    let indices = UInt32Array::from_iter_values(merged.representative.iter().map(|&r| r as u32));
    let kept = take_record_batch(batch, &indices)?;
    let schema = sparse_map_schema(&batch.schema(), Some(policy));
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column: ArrayRef = match field.name().as_str() {
            MAP_I => Arc::new(Int64Array::from_iter_values(
                merged.cells.iter().map(|c| c.0),
            )),
            MAP_J => Arc::new(Int64Array::from_iter_values(
                merged.cells.iter().map(|c| c.1),
            )),
            COLLISIONS => Arc::new(Int64Array::from(merged.counts.clone())),
            EMBEDDING if emb.is_some() => {
                let ty = emb
                    .as_ref()
                    .map(|e| &e.data_type)
                    .unwrap_or(field.data_type());
                embeddings_array(&merged.embeddings, ty)?
            }
            name => kept
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| MilError::Invalid(format!("column `{name}` vanished")))?,
        };
        columns.push(column);
    }
    let stats = MergeStats {
        tiles: weights.iter().sum(),
        rows_in: cells.len(),
        cells: merged.cells.len(),
        merged_cells: (0..merged.cells.len())
            .filter(|&k| merged.counts[k] > weights[merged.representative[k]])
            .count(),
    };
    Ok((RecordBatch::try_new(schema, columns)?, stats))
}

/// Why a collision policy other than `first` cannot apply to tile pixels.
fn pixels_policy_message(policy: CollisionPolicy) -> String {
    format!(
        "collision `{}` merges embeddings, but the bags carry tile pixels (end-to-end training, \
         `train.finetune_embedder`), which cannot be merged: set `collision: first` (each cell \
         keeps one tile; with `downsample: 1` tiles never collide)",
        policy.as_str()
    )
}

/// Checks at validation that `policy` can merge the instances of `input` (embeddings: any
/// policy; tile pixels: `first` only) and that it has instances at all.
pub fn check_policy_for(input: &Schema, policy: CollisionPolicy, stage: &str) -> StageResult<()> {
    let instances = crate::columns::require_instances(input, stage)?;
    if instances == crate::columns::InstanceColumn::Pixels && policy != CollisionPolicy::First {
        return Err(StageError::msg(pixels_policy_message(policy)));
    }
    Ok(())
}

/// The cell of every row of a bag, and a note for the user when the grid step was guessed.
pub type PlacedBag = (Vec<(i64, i64)>, Option<String>);

/// Parameters of the `sparse_map` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SparseMapParams {
    /// Downsampling factor d in tile-grid units: a tile at grid position (gx, gy) lands in cell
    /// (floor(gy / d), floor(gx / d)). Default 10 (the original code's default, whose
    /// coordinates are tile indices); 1 keeps one cell per tile position. Not with
    /// `downsample_px`.
    pub downsample: Option<f64>,
    /// Downsampling factor d in level-0 pixels: a tile at level-0 (x, y) lands in cell
    /// (floor(y / d), floor(x / d)). Not with `downsample`.
    pub downsample_px: Option<f64>,
    /// Level-0 distance between neighbouring tiles (tile size minus overlap), for `downsample`.
    /// Default: the `grid_step` column added by `sample` (measured on all of a slide's tiles),
    /// else inferred from the bag's coordinates.
    pub grid_step_px: Option<i64>,
    /// How embeddings that land in one cell are combined: mean (default), sum, max or first.
    pub collision: CollisionPolicy,
}

impl Default for SparseMapParams {
    fn default() -> Self {
        SparseMapParams {
            downsample: None,
            downsample_px: None,
            grid_step_px: None,
            collision: CollisionPolicy::Mean,
        }
    }
}

/// The default tile-grid downsampling factor (the original code's).
pub const DEFAULT_DOWNSAMPLE: f64 = 10.0;

impl SparseMapParams {
    fn factor_issue(field: &str, d: f64) -> Result<(), ParamIssue> {
        if d.is_finite() && d > 0.0 {
            Ok(())
        } else {
            Err(ParamIssue::new(
                field,
                format!("must be a positive number, got {d}"),
            ))
        }
    }

    /// The placement these parameters describe, defaults resolved.
    pub fn placement(&self) -> Placement {
        let scale = match self.downsample_px {
            Some(d) => Scale::Pixels { d },
            None => Scale::Grid {
                d: self.downsample.unwrap_or(DEFAULT_DOWNSAMPLE),
                step_px: self.grid_step_px,
            },
        };
        Placement {
            scale,
            collision: self.collision,
        }
    }

    /// Cells for a bag, resolving the grid step (param, column, inference) in tile-grid mode.
    /// Returns a note when the step had to be guessed from irregular coordinates.
    pub fn place_bag(&self, batch: &RecordBatch) -> Result<PlacedBag, MilError> {
        const WHAT: &str = "the sparse map";
        let xs = int64_values(batch, X, WHAT)?;
        let ys = int64_values(batch, Y, WHAT)?;
        let placement = self.placement();
        let measured = match placement.scale {
            Scale::Grid { step_px: None, .. } if batch.column_by_name(GRID_STEP).is_some() => {
                let steps = int64_values(batch, GRID_STEP, WHAT)?;
                match steps.first() {
                    Some(&s) if s > 0 => Some(s),
                    Some(&s) => {
                        return Err(MilError::Invalid(format!(
                            "column `{GRID_STEP}` is {s}, not positive"
                        )))
                    }
                    None => Some(1),
                }
            }
            _ => None,
        };
        let tile_size = if placement.infers_step(measured) {
            int64_values(batch, TILE_SIZE, WHAT)?
                .first()
                .copied()
                .unwrap_or(1)
        } else {
            1
        };
        Ok(placement.cells(&xs, &ys, tile_size, measured))
    }
}

impl StageKind for SparseMapParams {
    const KIND: &'static str = "sparse_map";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "Places each bag's tile embeddings on a downsampled sparse map (map_i, map_j), merging collisions by an explicit policy";

    /// The tile keys; the instances (embeddings or pixels) are checked by `output_schema`.
    fn input_spec(&self) -> InputSpec {
        InputSpec::Tables(vec![tile_key_columns()])
    }

    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        let input = inputs
            .first()
            .ok_or_else(|| StageError::msg("sparse_map needs one input"))?;
        check_policy_for(input, self.collision, "sparse_map")?;
        let schema = sparse_map_schema(input, Some(self.collision));
        Ok(Arc::new(self.placement().record_in(&schema)))
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        if self.downsample.is_some() && self.downsample_px.is_some() {
            return Err(ParamIssue::new(
                "downsample_px",
                "give either `downsample` (tile-grid units) or `downsample_px` (level-0 pixels), not both",
            ));
        }
        if let Some(d) = self.downsample {
            Self::factor_issue("downsample", d)?;
        }
        if let Some(d) = self.downsample_px {
            Self::factor_issue("downsample_px", d)?;
        }
        if let Some(s) = self.grid_step_px {
            if s <= 0 {
                return Err(ParamIssue::new(
                    "grid_step_px",
                    format!("must be positive, got {s}"),
                ));
            }
        }
        Ok(())
    }

    fn build(&self, _ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(per_slide(SparseMapStage {
            placement: self.placement(),
            params: self.clone(),
            warned: HashSet::new(),
            epoch_stats: MergeStats::default(),
        }))
    }

    /// Runs once per slide and epoch downstream of `sample`: ordered, and not worth caching.
    fn parallel(&self) -> bool {
        false
    }

    fn cacheable(&self) -> bool {
        false
    }
}

/// The running `sparse_map` stage: places a slide's whole bag, then emits its map.
struct SparseMapStage {
    params: SparseMapParams,
    /// Recorded in every map's schema, for `train` to store with the model.
    placement: Placement,
    /// Slides already warned about (collisions are reported once per slide, not per epoch).
    warned: HashSet<usize>,
    /// Collision totals of the current epoch, logged at its end.
    epoch_stats: MergeStats,
}

impl PerSlide for SparseMapStage {
    fn process_slide(
        &mut self,
        ctx: &mut StageContext,
        slide: &SlideHandle,
        table: Option<RecordBatch>,
    ) -> StageResult<SlideOutput> {
        let Some(batch) = table else {
            return Ok(SlideOutput::Rows(Vec::new()));
        };
        let (cells, note) = self.params.place_bag(&batch)?;
        if let Some(note) = note {
            if self.warned.insert(slide.index) {
                ctx.warn(Some(slide), note);
            }
        }
        let weights = vec![1; batch.num_rows()];
        let (map, stats) = merge_bag(&batch, &cells, &weights, self.params.collision)?;
        self.report(ctx, slide, &stats);
        let schema = Arc::new(self.placement.record_in(&map.schema()));
        Ok(SlideOutput::Rows(vec![map.with_schema(schema)?]))
    }

    fn on_epoch_end(&mut self, ctx: &mut StageContext, epoch: u64) -> StageResult {
        let s = std::mem::take(&mut self.epoch_stats);
        if s.rows_in > 0 {
            tracing::info!(
                stage = %ctx.stage_name(),
                "epoch {epoch}: {} tiles on {} cells, {} tiles merged by `{}` ({:.1}%)",
                s.rows_in,
                s.cells,
                s.collided_rows(),
                self.params.collision.as_str(),
                100.0 * s.collided_rows() as f64 / s.rows_in as f64
            );
        }
        ctx.end_epoch(epoch)
    }
}

impl SparseMapStage {
    fn report(&mut self, ctx: &StageContext, slide: &SlideHandle, stats: &MergeStats) {
        self.epoch_stats.tiles += stats.tiles;
        self.epoch_stats.rows_in += stats.rows_in;
        self.epoch_stats.cells += stats.cells;
        self.epoch_stats.merged_cells += stats.merged_cells;
        if stats.collided_rows() == 0 {
            return;
        }
        let message = format!(
            "{} of {} tiles collided into {} cells (merged by `{}`); a smaller downsampling factor avoids it",
            stats.collided_rows() + stats.merged_cells,
            stats.rows_in,
            stats.merged_cells,
            self.params.collision.as_str()
        );
        if self.warned.insert(slide.index) {
            ctx.warn(Some(slide), message);
        } else {
            tracing::debug!(slide = %slide.id, "{message}");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow::array::{AsArray, StringArray};
    use arrow::datatypes::Int64Type;
    use tessera_pipeline::schema::embeddings_schema;

    /// A bag of tiles at level-0 `(x, y)` with 2-d embeddings `[k, 10k]`.
    pub(crate) fn bag(coords: &[(i64, i64)], tile_size: i64) -> RecordBatch {
        let n = coords.len();
        let schema = embeddings_schema(2, false);
        let values: Vec<f32> = (0..n).flat_map(|k| [k as f32, 10.0 * k as f32]).collect();
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["s"; n])),
                Arc::new(Int64Array::from_iter_values(coords.iter().map(|c| c.0))),
                Arc::new(Int64Array::from_iter_values(coords.iter().map(|c| c.1))),
                Arc::new(Int64Array::from(vec![tile_size; n])),
                embeddings_array(&values, schema.field(4).data_type()).unwrap(),
            ],
        )
        .unwrap()
    }

    fn ints(batch: &RecordBatch, name: &str) -> Vec<i64> {
        batch
            .column_by_name(name)
            .unwrap()
            .as_primitive::<Int64Type>()
            .values()
            .to_vec()
    }

    #[test]
    fn merge_policies_combine_colliding_rows() {
        let cells = [(1, 1), (0, 0), (1, 1), (1, 1)];
        let emb = [1.0, -1.0, 5.0, 5.0, 3.0, 4.0, 2.0, 7.0];
        let ones = [1; 4];
        let mean = merge_cells(&cells, &ones, &emb, 2, CollisionPolicy::Mean);
        assert_eq!(mean.cells, [(0, 0), (1, 1)]);
        assert_eq!(mean.representative, [1, 0]);
        assert_eq!(mean.counts, [1, 3]);
        assert_eq!(mean.embeddings, [5.0, 5.0, 2.0, 10.0 / 3.0]);
        let sum = merge_cells(&cells, &ones, &emb, 2, CollisionPolicy::Sum);
        assert_eq!(sum.embeddings, [5.0, 5.0, 6.0, 10.0]);
        let max = merge_cells(&cells, &ones, &emb, 2, CollisionPolicy::Max);
        assert_eq!(max.embeddings, [5.0, 5.0, 3.0, 7.0]);
        let first = merge_cells(&cells, &ones, &emb, 2, CollisionPolicy::First);
        assert_eq!(first.embeddings, [5.0, 5.0, 1.0, -1.0]);
        assert_eq!(first.counts, [1, 3]);
    }

    #[test]
    fn weighted_mean_remerge_equals_the_mean_of_all_tiles() {
        // Row 0 already merges 3 tiles (mean 2), row 1 is one tile (6): mean of 4 tiles = 3.
        let merged = merge_cells(
            &[(0, 0), (0, 0)],
            &[3, 1],
            &[2.0, 6.0],
            1,
            CollisionPolicy::Mean,
        );
        assert_eq!((merged.embeddings[0], merged.counts[0]), (3.0, 4));
    }

    #[test]
    fn grid_step_is_inferred_from_sparse_regular_and_irregular_coordinates() {
        // Step 384 (512 px tiles, 128 px overlap), offset 100, tiles missing.
        let xs = [100, 100 + 3 * 384, 100 + 7 * 384];
        let ys = [0, 2 * 384, 5 * 384];
        assert_eq!(
            infer_grid_step(&xs, &ys, 512),
            Some(GridStep {
                step: 384,
                regular: true
            })
        );
        // Jittered coordinates: fall back to the smallest distance.
        let g = infer_grid_step(&[0, 257, 511], &[0, 0, 3], 256).unwrap();
        assert_eq!(
            g,
            GridStep {
                step: 3,
                regular: false
            }
        );
        let g = infer_grid_step(&[0, 257, 511], &[0, 0, 0], 256).unwrap();
        assert_eq!(
            g,
            GridStep {
                step: 254,
                regular: false
            }
        );
        assert_eq!(infer_grid_step(&[5], &[9], 256), None);
    }

    #[test]
    fn placement_in_grid_units_and_in_pixels() {
        // Grid step 384: grid indices x 0..=11, y 0 or 20; d = 10.
        let xs: Vec<i64> = (0..12).map(|k| k * 384).collect();
        let mut ys = vec![0; 12];
        ys[11] = 20 * 384;
        let cells = place(&xs, &ys, Downsample::Grid { d: 10.0, step: 384 });
        assert_eq!(cells[0], (0, 0));
        assert_eq!(cells[9], (0, 0));
        assert_eq!(cells[10], (0, 1));
        assert_eq!(cells[11], (2, 1));
        // Pixels: d = 1000 px, shifted to the origin.
        let cells = place(
            &[1500, 2999, 3000],
            &[5000, 5000, 7100],
            Downsample::Pixels { d: 1000.0 },
        );
        assert_eq!(cells, [(0, 0), (0, 1), (2, 2)]);
    }

    #[test]
    fn bag_becomes_one_row_per_cell_with_collision_counts() {
        // Tiles 256 px, no overlap; d = 2 grid units: the first three share cell (0, 0).
        let batch = bag(&[(0, 0), (256, 0), (256, 256), (512, 0)], 256);
        let params = SparseMapParams {
            downsample: Some(2.0),
            ..Default::default()
        };
        let (cells, note) = params.place_bag(&batch).unwrap();
        assert_eq!(note, None);
        let (map, stats) = merge_bag(&batch, &cells, &[1; 4], CollisionPolicy::Mean).unwrap();
        assert_eq!(ints(&map, MAP_I), [0, 0]);
        assert_eq!(ints(&map, MAP_J), [0, 1]);
        assert_eq!(ints(&map, COLLISIONS), [3, 1]);
        assert_eq!(ints(&map, "x"), [0, 512]);
        let emb = read_embeddings(&map, EMBEDDING).unwrap();
        assert_eq!(emb.values, [1.0, 10.0, 3.0, 30.0]);
        assert_eq!(stats.collided_rows(), 2);
        assert_eq!(stats.merged_cells, 1);
        assert_eq!(
            map.schema()
                .metadata()
                .get(POLICY_METADATA)
                .map(String::as_str),
            Some("mean")
        );
        let declared = SparseMapParams::default()
            .output_schema(&[batch.schema()])
            .unwrap();
        assert_eq!(declared.fields(), map.schema().fields());
    }

    #[test]
    fn grid_step_column_and_param_take_precedence_over_inference() {
        // Only tiles 0 and 2 of a 256-step grid were sampled: inference alone sees step 512.
        let batch = bag(&[(0, 0), (512, 0)], 256);
        let d1 = SparseMapParams {
            downsample: Some(1.0),
            ..Default::default()
        };
        assert_eq!(d1.place_bag(&batch).unwrap().0, [(0, 0), (0, 1)]);
        let with_param = SparseMapParams {
            grid_step_px: Some(256),
            ..d1.clone()
        };
        assert_eq!(with_param.place_bag(&batch).unwrap().0, [(0, 0), (0, 2)]);
        let mut fields = batch.schema().fields().to_vec();
        fields.push(Arc::new(Field::new(GRID_STEP, DataType::Int64, false)));
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(Int64Array::from(vec![256, 256])));
        let with_column = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        assert_eq!(d1.place_bag(&with_column).unwrap().0, [(0, 0), (0, 2)]);
    }

    #[test]
    fn params_are_validated() {
        let both = SparseMapParams {
            downsample: Some(2.0),
            downsample_px: Some(128.0),
            ..Default::default()
        };
        assert_eq!(both.validate().unwrap_err().field, "downsample_px");
        let zero = SparseMapParams {
            downsample: Some(0.0),
            ..Default::default()
        };
        assert_eq!(zero.validate().unwrap_err().field, "downsample");
        assert!(SparseMapParams::default().validate().is_ok());
    }
}
