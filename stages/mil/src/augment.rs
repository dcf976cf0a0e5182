//! Spatial augmentation of training bags on the sparse map. It moves cell coordinates
//! (`map_i`, `map_j`), never pixels or embeddings, so it costs nothing next to training.
//!
//! Per training bag, each with its own probability: a local shuffle (embeddings permuted among
//! the occupied cells of each `local_shuffle_window` square), a flip of each axis, a transpose,
//! a rotation by a multiple of 90°, a rotation by an arbitrary angle (radians — the original
//! code passes degrees to `cos`/`sin`), a per-axis scaling in `[scale_min, scale_max]`
//! (0.7–1.3 as in the original code), then a translation. Rotations and scalings round to cells
//! and may put two rows in one cell: these are merged again with the sparse map's collision
//! policy ([`crate::sparse_map::merge_bag`]). Rows of the `val`/`test` splits pass unchanged
//! (the original code also augments at inference; we do not). Draws come from
//! (seed, epoch, slide), the epoch being counted from the `EndOfEpoch` markers.

use crate::columns::{int64_values, utf8};
use crate::error::MilError;
use crate::sample::SPLIT;
use crate::seeding::stream_rng;
use crate::sparse_map::{
    check_policy_for, merge_bag, shift_to_origin, CollisionPolicy, MergeStats, COLLISIONS, MAP_I,
    MAP_J, POLICY_METADATA,
};
use crate::splits::Split;
use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Schema, SchemaRef};
use rand::seq::SliceRandom;
use rand::Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::f64::consts::PI;
use tessera_pipeline::{
    per_slide, BuildContext, Column, InputSpec, ParamIssue, PerSlide, SlideHandle, SlideOutput,
    Stage, StageContext, StageError, StageKind, StageResult,
};

/// Parameters of the `augment` stage. Defaults reproduce the original code's augmentation
/// (random rotation, flips of each axis, per-axis scaling in 0.7–1.3, random translation),
/// with the angle in radians.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentParams {
    /// Probability of translating the map by a random offset (each axis uniform in
    /// 0..=max_translation cells). Matters for sparse CNNs with strided layers.
    pub translate_probability: f64,
    /// Largest translation, in cells.
    pub max_translation: i64,
    /// Probability of flipping each axis (drawn independently for rows and columns).
    pub flip_probability: f64,
    /// Probability of transposing the map (swapping rows and columns).
    pub transpose_probability: f64,
    /// Probability of rotating by 90°, 180° or 270° (chosen uniformly).
    pub rot90_probability: f64,
    /// Probability of rotating by an angle uniform in [-max_angle, max_angle] radians.
    pub rotate_probability: f64,
    /// Largest rotation angle, in radians (default pi: any angle).
    pub max_angle: f64,
    /// Probability of scaling each axis by a factor uniform in [scale_min, scale_max].
    pub scale_probability: f64,
    pub scale_min: f64,
    pub scale_max: f64,
    /// Probability of permuting the embeddings among the occupied cells of each
    /// `local_shuffle_window` x `local_shuffle_window` square.
    pub local_shuffle_probability: f64,
    /// Side of the local shuffle squares, in cells.
    pub local_shuffle_window: i64,
    /// How rows moved into one cell are merged again. Default: the policy the upstream
    /// `sparse_map` used (recorded in the schema metadata), else mean.
    pub collision: Option<CollisionPolicy>,
}

impl Default for AugmentParams {
    fn default() -> Self {
        AugmentParams {
            translate_probability: 1.0,
            max_translation: 16,
            flip_probability: 0.5,
            transpose_probability: 0.0,
            rot90_probability: 0.0,
            rotate_probability: 1.0,
            max_angle: PI,
            scale_probability: 1.0,
            scale_min: 0.7,
            scale_max: 1.3,
            local_shuffle_probability: 0.0,
            local_shuffle_window: 2,
            collision: None,
        }
    }
}

/// Rotates by `theta` radians and scales rows by `scale_i`, columns by `scale_j`, about the
/// cells' centroid, rounding to the nearest cell (then shifted to the origin).
pub fn affine(cells: &[(i64, i64)], theta: f64, scale_i: f64, scale_j: f64) -> Vec<(i64, i64)> {
    if cells.is_empty() {
        return Vec::new();
    }
    let n = cells.len() as f64;
    let ci = cells.iter().map(|c| c.0 as f64).sum::<f64>() / n;
    let cj = cells.iter().map(|c| c.1 as f64).sum::<f64>() / n;
    let (sin, cos) = theta.sin_cos();
    let moved = cells
        .iter()
        .map(|&(i, j)| {
            let (di, dj) = (i as f64 - ci, j as f64 - cj);
            let ri = cos * di - sin * dj;
            let rj = sin * di + cos * dj;
            // Round half up (not away from zero) so a centred bag is not split apart.
            (
                (ri * scale_i + 0.5).floor() as i64,
                (rj * scale_j + 0.5).floor() as i64,
            )
        })
        .collect();
    shift_to_origin(moved)
}

/// Permutes the cells among the rows of each `window`-square block (the set of occupied cells
/// is unchanged; the embeddings move).
pub fn local_shuffle(cells: &mut [(i64, i64)], window: i64, rng: &mut impl Rng) {
    let w = window.max(1);
    let mut blocks: BTreeMap<(i64, i64), Vec<usize>> = BTreeMap::new();
    for (r, c) in cells.iter().enumerate() {
        blocks
            .entry((c.0.div_euclid(w), c.1.div_euclid(w)))
            .or_default()
            .push(r);
    }
    for rows in blocks.values() {
        let mut targets: Vec<(i64, i64)> = rows.iter().map(|&r| cells[r]).collect();
        targets.shuffle(rng);
        for (&r, t) in rows.iter().zip(targets) {
            cells[r] = t;
        }
    }
}

impl AugmentParams {
    /// The augmented position of each row (cells may now coincide; see `merge_bag`).
    pub fn transform_cells(&self, cells: &[(i64, i64)], rng: &mut impl Rng) -> Vec<(i64, i64)> {
        let mut c = cells.to_vec();
        if rng.random_bool(self.local_shuffle_probability) {
            local_shuffle(&mut c, self.local_shuffle_window, rng);
        }
        if rng.random_bool(self.flip_probability) {
            c.iter_mut().for_each(|p| p.0 = -p.0);
        }
        if rng.random_bool(self.flip_probability) {
            c.iter_mut().for_each(|p| p.1 = -p.1);
        }
        if rng.random_bool(self.transpose_probability) {
            c.iter_mut().for_each(|p| *p = (p.1, p.0));
        }
        if rng.random_bool(self.rot90_probability) {
            for _ in 0..rng.random_range(1..=3) {
                c.iter_mut().for_each(|p| *p = (p.1, -p.0));
            }
        }
        let theta = if rng.random_bool(self.rotate_probability) {
            rng.random_range(-self.max_angle..=self.max_angle)
        } else {
            0.0
        };
        let (si, sj) = if rng.random_bool(self.scale_probability) {
            (
                rng.random_range(self.scale_min..=self.scale_max),
                rng.random_range(self.scale_min..=self.scale_max),
            )
        } else {
            (1.0, 1.0)
        };
        let mut c = if theta != 0.0 || si != 1.0 || sj != 1.0 {
            affine(&c, theta, si, sj)
        } else {
            shift_to_origin(c)
        };
        if rng.random_bool(self.translate_probability) && self.max_translation > 0 {
            let ti = rng.random_range(0..=self.max_translation);
            let tj = rng.random_range(0..=self.max_translation);
            c.iter_mut().for_each(|p| *p = (p.0 + ti, p.1 + tj));
        }
        c
    }

    /// Augments one training bag (all rows): new cells, colliding rows merged by `policy`.
    pub fn augment_bag(
        &self,
        batch: &RecordBatch,
        policy: CollisionPolicy,
        rng: &mut impl Rng,
    ) -> Result<(RecordBatch, MergeStats), MilError> {
        const WHAT: &str = "augmentation";
        let is = int64_values(batch, MAP_I, WHAT)?;
        let js = int64_values(batch, MAP_J, WHAT)?;
        let weights = int64_values(batch, COLLISIONS, WHAT)?;
        let cells: Vec<(i64, i64)> = is.into_iter().zip(js).collect();
        let moved = self.transform_cells(&cells, rng);
        merge_bag(batch, &moved, &weights, policy)
    }
}

impl AugmentParams {
    /// The policy that re-merges cells: this stage's own, else the upstream `sparse_map`'s
    /// (recorded in the schema metadata), else mean.
    fn effective_policy(&self, schema: &Schema) -> CollisionPolicy {
        self.collision
            .or_else(|| {
                schema
                    .metadata()
                    .get(POLICY_METADATA)
                    .and_then(|p| CollisionPolicy::parse(p))
            })
            .unwrap_or_default()
    }
}

impl StageKind for AugmentParams {
    const KIND: &'static str = "augment";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "Random flips, rotations, scalings, shifts and local shuffles of training bags on the sparse map (coordinates only)";

    fn input_spec(&self) -> InputSpec {
        InputSpec::Tables(vec![vec![
            Column::exact(MAP_I, DataType::Int64),
            Column::exact(MAP_J, DataType::Int64),
            Column::exact(COLLISIONS, DataType::Int64),
            Column::exact(SPLIT, DataType::Utf8),
        ]])
    }

    /// The input's schema, once its instances (embeddings, or pixels with the `first`
    /// policy) are known to be mergeable.
    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        let input = inputs
            .first()
            .cloned()
            .ok_or_else(|| StageError::msg("augment needs one input"))?;
        check_policy_for(&input, self.effective_policy(&input), "augment")?;
        Ok(input)
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        for (field, p) in [
            ("translate_probability", self.translate_probability),
            ("flip_probability", self.flip_probability),
            ("transpose_probability", self.transpose_probability),
            ("rot90_probability", self.rot90_probability),
            ("rotate_probability", self.rotate_probability),
            ("scale_probability", self.scale_probability),
            ("local_shuffle_probability", self.local_shuffle_probability),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(ParamIssue::new(
                    field,
                    format!("is a probability, in [0, 1]; got {p}"),
                ));
            }
        }
        if self.max_translation < 0 {
            return Err(ParamIssue::new("max_translation", "must be >= 0"));
        }
        if !(self.max_angle.is_finite() && self.max_angle >= 0.0) {
            return Err(ParamIssue::new(
                "max_angle",
                "must be a non-negative angle in radians",
            ));
        }
        if !(self.scale_min > 0.0 && self.scale_min <= self.scale_max && self.scale_max.is_finite())
        {
            return Err(ParamIssue::new(
                "scale_max",
                format!(
                    "needs 0 < scale_min <= scale_max, got [{}, {}]",
                    self.scale_min, self.scale_max
                ),
            ));
        }
        if self.local_shuffle_window < 1 {
            return Err(ParamIssue::new(
                "local_shuffle_window",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        Ok(per_slide(AugmentStage {
            params: self.clone(),
            seed: ctx.seed,
            epoch: 0,
        }))
    }

    /// Counts epochs from the markers it receives: one copy, in order.
    fn parallel(&self) -> bool {
        false
    }

    fn cacheable(&self) -> bool {
        false
    }
}

/// The running `augment` stage.
struct AugmentStage {
    params: AugmentParams,
    seed: u64,
    /// The epoch the incoming bags belong to (epochs ended so far).
    epoch: u64,
}

impl AugmentStage {
    fn policy(&self, batch: &RecordBatch) -> CollisionPolicy {
        self.params.effective_policy(&batch.schema())
    }

    /// The slide's rows, training rows augmented, in the declared output schema.
    fn process(
        &self,
        slide: &SlideHandle,
        batch: &RecordBatch,
    ) -> Result<Vec<RecordBatch>, MilError> {
        let splits = utf8(batch, SPLIT, "augmentation")?;
        let is_train: BooleanArray = splits
            .iter()
            .map(|s| Some(s.and_then(Split::parse) == Some(Split::Train)))
            .collect();
        let n_train = is_train.true_count();
        let schema = batch.schema();
        let mut out = Vec::new();
        if n_train > 0 {
            let train = filter_record_batch(batch, &is_train)?;
            let mut rng = stream_rng(self.seed, "augment", Some(self.epoch), &slide.id);
            let (augmented, _) = self
                .params
                .augment_bag(&train, self.policy(batch), &mut rng)?;
            out.push(conform(&augmented, &schema)?);
        }
        if n_train < batch.num_rows() {
            let others = filter_record_batch(batch, &arrow::compute::not(&is_train)?)?;
            out.push(conform(&others, &schema)?);
        }
        Ok(out)
    }
}

/// The batch's columns in `schema`'s order (the augmented part comes back from `merge_bag`
/// with the map columns last; the output keeps the input's column order).
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, MilError> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            batch
                .column_by_name(f.name())
                .cloned()
                .ok_or_else(|| MilError::MissingColumn {
                    column: f.name().clone(),
                    purpose: "augmentation",
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

impl PerSlide for AugmentStage {
    fn process_slide(
        &mut self,
        _ctx: &mut StageContext,
        slide: &SlideHandle,
        table: Option<RecordBatch>,
    ) -> StageResult<SlideOutput> {
        let rows = match table {
            Some(batch) => self.process(slide, &batch)?,
            None => Vec::new(),
        };
        Ok(SlideOutput::Rows(rows))
    }

    fn on_epoch_end(&mut self, ctx: &mut StageContext, epoch: u64) -> StageResult {
        self.epoch = epoch + 1;
        ctx.end_epoch(epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeding::stream_rng;
    use std::collections::BTreeSet;
    use tessera_pipeline::schema::EMBEDDING;

    fn none() -> AugmentParams {
        AugmentParams {
            translate_probability: 0.0,
            flip_probability: 0.0,
            rotate_probability: 0.0,
            scale_probability: 0.0,
            ..Default::default()
        }
    }

    fn set(cells: &[(i64, i64)]) -> BTreeSet<(i64, i64)> {
        cells.iter().copied().collect()
    }

    fn l_shape() -> Vec<(i64, i64)> {
        vec![(0, 0), (1, 0), (2, 0), (2, 1)]
    }

    #[test]
    fn no_augmentation_keeps_cells() {
        let mut rng = stream_rng(1, "t", None, "");
        assert_eq!(none().transform_cells(&l_shape(), &mut rng), l_shape());
    }

    #[test]
    fn flips_transpose_and_rot90_are_exact() {
        let mut rng = stream_rng(1, "t", None, "");
        let flip = AugmentParams {
            flip_probability: 1.0,
            ..none()
        };
        // Both axes flipped: (i, j) -> (2 - i, 1 - j).
        assert_eq!(
            flip.transform_cells(&l_shape(), &mut rng),
            [(2, 1), (1, 1), (0, 1), (0, 0)]
        );
        let transpose = AugmentParams {
            transpose_probability: 1.0,
            ..none()
        };
        assert_eq!(
            transpose.transform_cells(&l_shape(), &mut rng),
            [(0, 0), (0, 1), (0, 2), (1, 2)]
        );
        let rot = AugmentParams {
            rot90_probability: 1.0,
            ..none()
        };
        for seed in 0..8 {
            let out = rot.transform_cells(&l_shape(), &mut stream_rng(seed, "t", None, ""));
            assert_ne!(
                set(&out),
                set(&l_shape()),
                "a 90-degree multiple other than 0 moves an L"
            );
            assert_eq!(set(&out).len(), 4);
        }
    }

    #[test]
    fn rotation_angle_is_in_radians() {
        // A horizontal line rotated by pi/2 radians is vertical (with degrees it would not be).
        let line = [(0, 0), (0, 1), (0, 2), (0, 3)];
        let out = affine(&line, std::f64::consts::FRAC_PI_2, 1.0, 1.0);
        assert_eq!(set(&out), set(&[(0, 0), (1, 0), (2, 0), (3, 0)]));
        // Scaling columns by 2 spreads them.
        let out = affine(&line, 0.0, 1.0, 2.0);
        assert_eq!(set(&out), set(&[(0, 0), (0, 2), (0, 4), (0, 6)]));
    }

    #[test]
    fn local_shuffle_moves_rows_only_within_their_block() {
        let cells: Vec<(i64, i64)> = (0..4).flat_map(|i| (0..4).map(move |j| (i, j))).collect();
        let mut moved = cells.clone();
        local_shuffle(&mut moved, 2, &mut stream_rng(3, "t", None, ""));
        assert_ne!(moved, cells);
        assert_eq!(set(&moved), set(&cells));
        for (a, b) in cells.iter().zip(&moved) {
            assert_eq!((a.0 / 2, a.1 / 2), (b.0 / 2, b.1 / 2));
        }
    }

    #[test]
    fn translation_stays_within_bounds_and_is_deterministic() {
        let p = AugmentParams {
            translate_probability: 1.0,
            max_translation: 3,
            ..none()
        };
        for seed in 0..20 {
            let out = p.transform_cells(&l_shape(), &mut stream_rng(seed, "t", None, ""));
            let (ti, tj) = (out[0].0, out[0].1);
            assert!((0..=3).contains(&ti) && (0..=3).contains(&tj));
            let expected: Vec<_> = l_shape().iter().map(|c| (c.0 + ti, c.1 + tj)).collect();
            assert_eq!(out, expected);
        }
        let full = AugmentParams::default();
        let a = full.transform_cells(&l_shape(), &mut stream_rng(5, "t", Some(2), "s"));
        let b = full.transform_cells(&l_shape(), &mut stream_rng(5, "t", Some(2), "s"));
        assert_eq!(a, b);
    }

    #[test]
    fn shrinking_merges_collisions_and_keeps_every_tile_counted() {
        use crate::sparse_map::tests::bag;
        // A 6 x 6 grid of one-tile cells (tiles of 100 px, d = 1).
        let coords: Vec<(i64, i64)> = (0..36).map(|k| ((k % 6) * 100, (k / 6) * 100)).collect();
        let tiles = bag(&coords, 100);
        let params = crate::sparse_map::SparseMapParams {
            downsample: Some(1.0),
            ..Default::default()
        };
        let (cells, _) = params.place_bag(&tiles).unwrap();
        let (map, _) = merge_bag(&tiles, &cells, &[1; 36], CollisionPolicy::Mean).unwrap();
        let shrink = AugmentParams {
            scale_probability: 1.0,
            scale_min: 0.5,
            scale_max: 0.5,
            ..none()
        };
        let mut rng = stream_rng(0, "t", None, "");
        let (out, stats) = shrink
            .augment_bag(&map, CollisionPolicy::Mean, &mut rng)
            .unwrap();
        assert!(out.num_rows() < 36, "{} rows", out.num_rows());
        assert!(stats.merged_cells > 0);
        let counts = int64_values(&out, COLLISIONS, "t").unwrap();
        assert_eq!(counts.iter().sum::<i64>(), 36);
        // Mean of all tiles is preserved by count-weighted merging: sum(count * emb) / 36.
        let emb = crate::columns::read_embeddings(&out, EMBEDDING).unwrap();
        let weighted: f32 = counts
            .iter()
            .enumerate()
            .map(|(r, &c)| c as f32 * emb.values[2 * r])
            .sum();
        assert!((weighted / 36.0 - 17.5).abs() < 1e-4, "{weighted}");
    }

    #[test]
    fn only_training_rows_are_augmented() {
        use crate::sparse_map::tests::bag;
        use arrow::array::StringArray;
        use arrow::datatypes::Field;
        use std::sync::Arc;
        let coords: Vec<(i64, i64)> = (0..9).map(|k| ((k % 3) * 100, (k / 3) * 100)).collect();
        let tiles = bag(&coords, 100);
        let params = crate::sparse_map::SparseMapParams {
            downsample: Some(1.0),
            ..Default::default()
        };
        let (cells, _) = params.place_bag(&tiles).unwrap();
        let (map, _) = merge_bag(&tiles, &cells, &[1; 9], CollisionPolicy::Mean).unwrap();
        let with_split = |split: &str| {
            let mut fields = map.schema().fields().to_vec();
            fields.push(Arc::new(Field::new("split", DataType::Utf8, false)));
            let mut columns = map.columns().to_vec();
            columns.push(Arc::new(StringArray::from(vec![split; 9])));
            let schema = arrow::datatypes::Schema::new_with_metadata(
                fields,
                map.schema().metadata().clone(),
            );
            RecordBatch::try_new(Arc::new(schema), columns).unwrap()
        };
        let slide = Arc::new(tessera_pipeline::Slide {
            index: 0,
            id: "s".into(),
            path: None,
            label: None,
            split: None,
            case_id: None,
            mpp: None,
            extra: Default::default(),
        });
        let stage = AugmentStage {
            params: AugmentParams {
                flip_probability: 1.0,
                ..none()
            },
            seed: 1,
            epoch: 0,
        };
        let val = with_split("val");
        let out = stage.process(&slide, &val).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].columns(), val.columns());
        let train = with_split("train");
        let out = stage.process(&slide, &train).unwrap();
        let emb = crate::columns::read_embeddings(&out[0], EMBEDDING).unwrap();
        // Flipping both axes puts the last tile (k = 8) in cell (0, 0), the first row.
        assert_eq!(emb.values[0], 8.0);
        assert_eq!(stage.policy(&train), CollisionPolicy::Mean);
    }
}
