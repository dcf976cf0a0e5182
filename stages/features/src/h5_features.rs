//! `kind: h5_features`: tile embeddings already computed by CLAM, TRIDENT or another tool of
//! that family, read from their per-slide HDF5 files, so a cohort embedded there trains here
//! without embedding it again.
//!
//! Those tools write one `SLIDE.h5` per slide holding `features` (`[N, D]` floats; some
//! versions `[1, N, D]`) and `coords` (`[N, 2]` integers: level-0 `x, y` of each tile's
//! top-left corner, as in tessera). The tile size at level 0 comes from the attributes of
//! `coords`: `patch_size_level0` (TRIDENT), else `patch_size` when `patch_level` is 0 (CLAM at
//! level 0); otherwise the `tile_size` parameter must say it.
//!
//! `layout: stamp` reads STAMP's files instead: `feats` (`[N, D]`, float16 or float32) and
//! `coords` (`[N, 2]` floats, the tiles' top-left corners in **micrometres** from the slide's
//! origin, file attribute `unit: um`), with the file attributes `tile_size_um` and
//! `tile_size_px`. Level-0 pixels are `um / mpp` (rounded), where `mpp` is the slide's
//! level-0 resolution: the dataset CSV's `mpp` column, else a `slide_mpp` or `mpp` attribute
//! of the file, else the `mpp` parameter. `tile_size_um / tile_size_px` is the resolution
//! STAMP resampled tiles to, not the slide's: it is never used as the level-0 mpp.

use crate::error::FeaturesResult;
use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, SchemaRef};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tessera_pipeline::schema::embeddings_schema;
use tessera_pipeline::{
    BuildContext, InputSpec, ParamIssue, SlideHandle, Stage, StageContext, StageError, StageKind,
    StageResult,
};

use crate::features::{features_err, files_salt, first_readable, slide_file, Layout};

/// Rows per emitted batch: bounded memory for slides with 100k tiles.
const ROWS_PER_BATCH: usize = 8192;

/// Parameters of `kind: h5_features`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct H5FeaturesParams {
    /// Where the per-slide files are: a folder holding `SLIDE_ID.h5` (CLAM's
    /// `h5_files/`, TRIDENT's `features_<model>/`), or a pattern such as
    /// `feats/{slide_id}.h5` (relative paths: to the experiment file).
    pub path: String,
    /// The dataset holding the embeddings, `[N, D]` (or `[1, N, D]`).
    pub features_dataset: String,
    /// The dataset holding the level-0 top-left corners, `[N, 2]` as `x, y`.
    pub coords_dataset: String,
    /// Tile size in level-0 pixels, for files whose attributes do not give it (CLAM patches
    /// taken at a level other than 0). Overrides the attributes when set.
    pub tile_size: Option<i64>,
    /// Which tool wrote the files: `trident` (also CLAM: level-0 pixel coordinates) or
    /// `stamp` (micrometre coordinates; the default `features_dataset` then means `feats`).
    pub layout: H5Layout,
    /// Level-0 micrometres per pixel for `layout: stamp`, for slides whose CSV row has no
    /// `mpp` and whose file no `slide_mpp` attribute.
    pub mpp: Option<f64>,
}

/// The per-slide HDF5 layouts `h5_features` reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum H5Layout {
    /// CLAM / TRIDENT: `features`, `coords` in level-0 pixels.
    #[default]
    Trident,
    /// STAMP: `feats`, `coords` in micrometres, `tile_size_um` attribute.
    Stamp,
}

/// STAMP's name for the embeddings dataset.
const STAMP_FEATURES: &str = "feats";

impl Default for H5FeaturesParams {
    fn default() -> Self {
        H5FeaturesParams {
            path: String::new(),
            features_dataset: "features".into(),
            coords_dataset: "coords".into(),
            tile_size: None,
            layout: H5Layout::Trident,
            mpp: None,
        }
    }
}

/// One slide's file, read whole: what the stage emits for it.
#[derive(Debug, Clone, PartialEq)]
pub struct H5Slide {
    /// `[N, 2]` level-0 top-left corners.
    pub coords: Vec<[i64; 2]>,
    /// Level-0 tile size of every tile.
    pub tile_size: i64,
    /// Width of an embedding.
    pub dim: usize,
    /// `N * dim` values, row-major.
    pub features: Vec<f32>,
}

impl H5FeaturesParams {
    /// The embeddings dataset's name: STAMP's `feats` when the layout is STAMP's and the
    /// parameter was left at its default.
    fn features_name(&self) -> &str {
        if self.layout == H5Layout::Stamp && self.features_dataset == "features" {
            STAMP_FEATURES
        } else {
            &self.features_dataset
        }
    }

    /// Where the files are, as a `{slide_id}` pattern resolved against `base_dir` (a folder
    /// `F` is `F/{slide_id}.h5`).
    pub fn pattern(&self, base_dir: &Path) -> String {
        crate::features::per_slide_pattern(&self.path, base_dir, "h5")
    }

    /// The embedding width of the first readable file matching `pattern` now.
    fn width(&self, pattern: &str) -> StageResult<usize> {
        let files = Layout::Pattern(pattern.to_string())
            .files()
            .map_err(|e| StageError::other("listing the HDF5 features files", e))?;
        match first_readable(&files, |f| self.probe_dim(f)) {
            Some(probed) => probed.map_err(|e| {
                StageError::other("reading the features width (no file is readable)", e)
            }),
            None => Err(StageError::msg(format!(
                "h5_features: no file matches `{pattern}`"
            ))),
        }
    }

    /// Shape of the features dataset: `(N, D)`, accepting `[1, N, D]`.
    fn rows_and_dim(&self, path: &Path, shape: &[usize]) -> FeaturesResult<(usize, usize)> {
        match shape {
            [n, d] => Ok((*n, *d)),
            [1, n, d] => Ok((*n, *d)),
            other => Err(features_err(
                path,
                format!(
                    "dataset `{}` has shape {other:?}, expected [tiles, width]",
                    self.features_name()
                ),
            )),
        }
    }

    /// The embedding width of one file, without reading its values.
    pub fn probe_dim(&self, path: &Path) -> FeaturesResult<usize> {
        let file = open(path)?;
        let ds = dataset(&file, path, self.features_name())?;
        let (_, dim) = self.rows_and_dim(path, &ds.shape())?;
        if dim == 0 {
            return Err(features_err(
                path,
                format!("dataset `{}` has width 0", self.features_dataset),
            ));
        }
        Ok(dim)
    }

    /// Reads one slide's file whole, checking shapes, values and the tile size; `slide_mpp`
    /// is the dataset CSV's level-0 resolution of the slide (used by `layout: stamp`).
    pub fn read(&self, path: &Path, slide_mpp: Option<f64>) -> FeaturesResult<H5Slide> {
        let file = open(path)?;
        let feats = dataset(&file, path, self.features_name())?;
        let (n, dim) = self.rows_and_dim(path, &feats.shape())?;
        let coords_ds = dataset(&file, path, &self.coords_dataset)?;
        let cshape = coords_ds.shape();
        if cshape != [n, 2] {
            return Err(features_err(
                path,
                format!(
                    "dataset `{}` has shape {cshape:?}, expected [{n}, 2] (x, y of each of the {n} rows of `{}`)",
                    self.coords_dataset, self.features_name()
                ),
            ));
        }
        let features: Vec<f32> = feats.read_raw::<f32>().map_err(|e| {
            features_err(
                path,
                format!("reading `{}` as 32-bit floats: {e}", self.features_name()),
            )
        })?;
        if let Some(at) = features.iter().position(|v| !v.is_finite()) {
            return Err(features_err(
                path,
                format!(
                    "dataset `{}`: row {} holds {} (NaN or infinite)",
                    self.features_name(),
                    at / dim.max(1),
                    features[at]
                ),
            ));
        }
        let (coords, tile_size) = match self.layout {
            H5Layout::Trident => self.level0_coords(path, &coords_ds)?,
            H5Layout::Stamp => self.micrometre_coords(path, &file, &coords_ds, slide_mpp)?,
        };
        if tile_size <= 0 {
            return Err(features_err(
                path,
                format!("tile size {tile_size} is not positive"),
            ));
        }
        Ok(H5Slide {
            coords,
            tile_size,
            dim,
            features,
        })
    }

    /// CLAM / TRIDENT: integer level-0 corners, tile size from the attributes of `coords`.
    fn level0_coords(
        &self,
        path: &Path,
        coords_ds: &hdf5::Dataset,
    ) -> FeaturesResult<(Vec<[i64; 2]>, i64)> {
        let flat: Vec<i64> = coords_ds.read_raw::<i64>().map_err(|e| {
            features_err(
                path,
                format!("reading `{}` as integers: {e}", self.coords_dataset),
            )
        })?;
        let coords = flat.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
        let tile_size = match self.tile_size {
            Some(t) => t,
            None => attr_tile_size(coords_ds).ok_or_else(|| {
                features_err(
                    path,
                    format!(
                        "`{}` has no `patch_size_level0` attribute, nor `patch_size` with `patch_level` 0: set `tile_size` (level-0 pixels)",
                        self.coords_dataset
                    ),
                )
            })?,
        };
        Ok((coords, tile_size))
    }

    /// STAMP: corners in micrometres, converted with the slide's level-0 mpp; the tile size
    /// from the file's `tile_size_um`.
    fn micrometre_coords(
        &self,
        path: &Path,
        file: &hdf5::File,
        coords_ds: &hdf5::Dataset,
        slide_mpp: Option<f64>,
    ) -> FeaturesResult<(Vec<[i64; 2]>, i64)> {
        if let Some(unit) = string_attr(file, "unit") {
            if unit != "um" {
                return Err(features_err(
                    path,
                    format!("attribute `unit` is `{unit}`: `layout: stamp` reads coordinates in micrometres (`um`)"),
                ));
            }
        }
        let mpp = slide_mpp
            .or_else(|| float_attr(file, "slide_mpp"))
            .or_else(|| float_attr(file, "mpp"))
            .or(self.mpp)
            .ok_or_else(|| {
                features_err(
                    path,
                    "coordinates are in micrometres and the slide's level-0 resolution is unknown: give the dataset CSV an `mpp` column or set `mpp` (tile_size_um / tile_size_px is the extraction resolution, not the slide's)",
                )
            })?;
        if !(mpp.is_finite() && mpp > 0.0) {
            return Err(features_err(
                path,
                format!("level-0 mpp {mpp} is not positive"),
            ));
        }
        let um: Vec<f64> = coords_ds.read_raw::<f64>().map_err(|e| {
            features_err(
                path,
                format!("reading `{}` as numbers: {e}", self.coords_dataset),
            )
        })?;
        if let Some(bad) = um.iter().find(|v| !v.is_finite()) {
            return Err(features_err(
                path,
                format!("dataset `{}` holds {bad}", self.coords_dataset),
            ));
        }
        let px = |v: f64| (v / mpp).round() as i64;
        let coords = um.chunks_exact(2).map(|c| [px(c[0]), px(c[1])]).collect();
        let tile_size = match self.tile_size {
            Some(t) => t,
            None => px(float_attr(file, "tile_size_um").ok_or_else(|| {
                features_err(
                    path,
                    "no `tile_size_um` attribute: set `tile_size` (level-0 pixels)",
                )
            })?),
        };
        Ok((coords, tile_size))
    }
}

/// A numeric attribute of the file's root, if present and numeric.
fn float_attr(file: &hdf5::File, name: &str) -> Option<f64> {
    file.attr(name).ok()?.read_scalar::<f64>().ok()
}

/// A string attribute of the file's root (as h5py writes them), if present.
fn string_attr(file: &hdf5::File, name: &str) -> Option<String> {
    let attr = file.attr(name).ok()?;
    attr.read_scalar::<hdf5::types::VarLenUnicode>()
        .map(|s| s.as_str().to_string())
        .or_else(|_| {
            attr.read_scalar::<hdf5::types::VarLenAscii>()
                .map(|s| s.as_str().to_string())
        })
        .ok()
}

fn open(path: &Path) -> FeaturesResult<hdf5::File> {
    hdf5::File::open(path).map_err(|e| features_err(path, format!("not a readable HDF5 file: {e}")))
}

fn dataset(file: &hdf5::File, path: &Path, name: &str) -> FeaturesResult<hdf5::Dataset> {
    file.dataset(name).map_err(|_| {
        let found = file.member_names().unwrap_or_default();
        features_err(
            path,
            format!(
                "no dataset `{name}` (the file holds: {})",
                if found.is_empty() {
                    "nothing".to_string()
                } else {
                    found.join(", ")
                }
            ),
        )
    })
}

/// The level-0 tile size the writing tool recorded, if it did.
fn attr_tile_size(coords: &hdf5::Dataset) -> Option<i64> {
    let int = |name: &str| {
        coords
            .attr(name)
            .ok()
            .and_then(|a| a.read_scalar::<i64>().ok())
    };
    if let Some(t) = int("patch_size_level0") {
        return Some(t);
    }
    match (int("patch_size"), int("patch_level")) {
        (Some(size), Some(0)) => Some(size),
        _ => None,
    }
}

impl StageKind for H5FeaturesParams {
    const KIND: &'static str = "h5_features";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str = "Reads tile embeddings computed by CLAM, TRIDENT and similar tools from their per-slide HDF5 files (features, coords)";

    fn input_spec(&self) -> InputSpec {
        InputSpec::Dataset
    }

    fn output_schema(&self, inputs: &[SchemaRef]) -> StageResult<SchemaRef> {
        self.output_schema_at(inputs, Path::new("."))
    }

    fn output_schema_at(&self, _inputs: &[SchemaRef], base_dir: &Path) -> StageResult<SchemaRef> {
        Ok(embeddings_schema(
            self.width(&self.pattern(base_dir))?,
            false,
        ))
    }

    fn validate(&self) -> Result<(), ParamIssue> {
        if self.path.trim().is_empty() {
            return Err(ParamIssue::new(
                "path",
                "required: a folder of SLIDE_ID.h5 files or a pattern with {slide_id}",
            ));
        }
        if self.features_dataset.is_empty() {
            return Err(ParamIssue::new("features_dataset", "must not be empty"));
        }
        if self.coords_dataset.is_empty() {
            return Err(ParamIssue::new("coords_dataset", "must not be empty"));
        }
        if self.tile_size.is_some_and(|t| t <= 0) {
            return Err(ParamIssue::new("tile_size", "must be positive"));
        }
        if self.mpp.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
            return Err(ParamIssue::new(
                "mpp",
                "must be a positive number of micrometres per pixel",
            ));
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        let pattern = self.pattern(&ctx.base_dir);
        let dim = self.width(&pattern)?;
        Ok(Box::new(H5FeaturesStage {
            params: self.clone(),
            pattern,
            dim,
            schema: embeddings_schema(dim, false),
        }))
    }

    fn cache_salt(&self, ctx: &BuildContext) -> StageResult<String> {
        let pattern = self.pattern(&ctx.base_dir);
        Ok(files_salt(
            ctx.slides.iter().map(|s| slide_file(&pattern, &s.id)),
        ))
    }
}

/// The running `h5_features` source.
struct H5FeaturesStage {
    params: H5FeaturesParams,
    /// Where each slide's file is (`{slide_id}` pattern, resolved once).
    pattern: String,
    /// The embedding width of the first readable file: every slide's must match it.
    dim: usize,
    schema: SchemaRef,
}

impl Stage for H5FeaturesStage {
    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        let path = slide_file(&self.pattern, &slide.id);
        let read = || -> FeaturesResult<H5Slide> {
            if !path.is_file() {
                return Err(features_err(
                    &path,
                    format!("no features file for slide `{}`", slide.id),
                ));
            }
            let read = self.params.read(&path, slide.mpp)?;
            if read.dim != self.dim {
                return Err(features_err(
                    &path,
                    format!(
                        "embeddings are {} wide, the first file's are {}: one experiment reads one model's features",
                        read.dim, self.dim
                    ),
                ));
            }
            Ok(read)
        };
        let s = read().map_err(|e| StageError::other("reading HDF5 features", e))?;
        emit_rows(
            ctx,
            slide,
            &self.schema,
            &s.coords,
            s.tile_size,
            s.dim,
            &s.features,
        )
    }
}

/// Emits one slide's tiles as embeddings-table batches of at most [`ROWS_PER_BATCH`] rows
/// (bounded memory for slides with 100k tiles) and ends the slide; a slide without tiles is
/// warned about.
pub(crate) fn emit_rows(
    ctx: &mut StageContext,
    slide: &SlideHandle,
    schema: &SchemaRef,
    coords: &[[i64; 2]],
    tile_size: i64,
    dim: usize,
    features: &[f32],
) -> StageResult {
    if coords.is_empty() {
        ctx.warn(Some(slide), "the features file holds no tile");
    }
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    for (coords, feats) in coords
        .chunks(ROWS_PER_BATCH)
        .zip(features.chunks(ROWS_PER_BATCH * dim.max(1)))
    {
        let n = coords.len();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(arrow::array::StringArray::from(vec![slide.id.as_str(); n])),
            Arc::new(Int64Array::from_iter_values(coords.iter().map(|p| p[0]))),
            Arc::new(Int64Array::from_iter_values(coords.iter().map(|p| p[1]))),
            Arc::new(Int64Array::from(vec![tile_size; n])),
            Arc::new(FixedSizeListArray::try_new(
                item.clone(),
                dim as i32,
                Arc::new(Float32Array::from(feats.to_vec())),
                None,
            )?),
        ];
        ctx.emit(slide, RecordBatch::try_new(schema.clone(), columns)?)?;
    }
    ctx.end_slide(slide)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_pipeline::schema::{embedding_type, EMBEDDING};

    /// Writes a CLAM/TRIDENT-style file: `features [n, dim]` (or `[1, n, dim]`), `coords [n, 2]`
    /// with the given integer attributes.
    fn write(path: &Path, n: usize, dim: usize, leading_one: bool, attrs: &[(&str, i64)]) {
        let f = hdf5::File::create(path).unwrap();
        let values: Vec<f32> = (0..n * dim).map(|i| i as f32 * 0.5).collect();
        let feats = if leading_one {
            f.new_dataset::<f32>().shape([1, n, dim]).create("features")
        } else {
            f.new_dataset::<f32>().shape([n, dim]).create("features")
        }
        .unwrap();
        feats.write_raw(&values).unwrap();
        let coords: Vec<i32> = (0..n).flat_map(|i| [i as i32 * 256, 512]).collect();
        let c = f
            .new_dataset::<i32>()
            .shape([n, 2])
            .create("coords")
            .unwrap();
        c.write_raw(&coords).unwrap();
        for (name, v) in attrs {
            c.new_attr::<i64>()
                .create(*name)
                .unwrap()
                .write_scalar(v)
                .unwrap();
        }
    }

    fn params(path: &Path) -> H5FeaturesParams {
        H5FeaturesParams {
            path: path.to_string_lossy().into_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn reads_trident_and_clam_layouts() {
        let dir = tempfile::tempdir().unwrap();
        // TRIDENT: patch_size_level0 on coords.
        write(
            &dir.path().join("t.h5"),
            3,
            4,
            false,
            &[("patch_size", 256), ("patch_size_level0", 512)],
        );
        let s = params(dir.path())
            .read(&dir.path().join("t.h5"), None)
            .unwrap();
        assert_eq!(s.tile_size, 512);
        assert_eq!(s.dim, 4);
        assert_eq!(s.coords, vec![[0, 512], [256, 512], [512, 512]]);
        assert_eq!(&s.features[4..8], &[2.0, 2.5, 3.0, 3.5]);
        // CLAM at level 0, features stored [1, N, D].
        write(
            &dir.path().join("c.h5"),
            2,
            3,
            true,
            &[("patch_size", 224), ("patch_level", 0)],
        );
        let p = params(dir.path());
        assert_eq!(p.probe_dim(&dir.path().join("c.h5")).unwrap(), 3);
        let s = p.read(&dir.path().join("c.h5"), None).unwrap();
        assert_eq!((s.tile_size, s.dim, s.coords.len()), (224, 3, 2));
    }

    #[test]
    fn a_tile_size_it_cannot_know_must_be_given() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.h5");
        // CLAM at level 1: patch_size is in level-1 pixels.
        write(
            &file,
            2,
            3,
            false,
            &[("patch_size", 256), ("patch_level", 1)],
        );
        let err = params(dir.path())
            .read(&file, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s.h5") && err.contains("set `tile_size`"),
            "{err}"
        );
        let given = H5FeaturesParams {
            tile_size: Some(512),
            ..params(dir.path())
        };
        assert_eq!(given.read(&file, None).unwrap().tile_size, 512);
    }

    #[test]
    fn bad_files_name_the_file_and_the_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let p = params(dir.path());
        // Not HDF5 at all.
        let junk = dir.path().join("junk.h5");
        std::fs::write(&junk, b"not hdf5").unwrap();
        let e = p.read(&junk, None).unwrap_err().to_string();
        assert!(
            e.contains("junk.h5") && e.contains("not a readable HDF5"),
            "{e}"
        );
        // Missing dataset: the message lists what is there.
        let other = dir.path().join("other.h5");
        write(&other, 2, 3, false, &[("patch_size_level0", 256)]);
        let renamed = H5FeaturesParams {
            features_dataset: "feats".into(),
            ..params(dir.path())
        };
        let e = renamed.read(&other, None).unwrap_err().to_string();
        assert!(
            e.contains("no dataset `feats`") && e.contains("coords, features"),
            "{e}"
        );
        // Coordinates that do not match the features' rows.
        let f = hdf5::File::create(dir.path().join("mismatch.h5")).unwrap();
        f.new_dataset::<f32>()
            .shape([3, 2])
            .create("features")
            .unwrap()
            .write_raw(&[0f32; 6])
            .unwrap();
        f.new_dataset::<i64>()
            .shape([2, 2])
            .create("coords")
            .unwrap()
            .write_raw(&[0i64; 4])
            .unwrap();
        drop(f);
        let e = p
            .read(&dir.path().join("mismatch.h5"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`coords` has shape [2, 2], expected [3, 2]"),
            "{e}"
        );
        // NaN embeddings are refused with their row.
        let f = hdf5::File::create(dir.path().join("nan.h5")).unwrap();
        f.new_dataset::<f32>()
            .shape([2, 2])
            .create("features")
            .unwrap()
            .write_raw(&[0.0, 1.0, f32::NAN, 2.0])
            .unwrap();
        let c = f
            .new_dataset::<i64>()
            .shape([2, 2])
            .create("coords")
            .unwrap();
        c.write_raw(&[0i64; 4]).unwrap();
        c.new_attr::<i64>()
            .create("patch_size_level0")
            .unwrap()
            .write_scalar(&256i64)
            .unwrap();
        drop(f);
        let e = p
            .read(&dir.path().join("nan.h5"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 1") && e.contains("NaN"), "{e}");
    }

    #[test]
    fn folder_and_pattern_name_one_file_per_slide() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let folder = H5FeaturesParams {
            path: "feats".into(),
            ..Default::default()
        };
        assert_eq!(
            slide_file(&folder.pattern(base), "TCGA-01"),
            base.join("feats/TCGA-01.h5")
        );
        let pattern = H5FeaturesParams {
            path: "out/{slide_id}/features.h5".into(),
            ..Default::default()
        };
        assert_eq!(
            slide_file(&pattern.pattern(base), "s1"),
            base.join("out/s1/features.h5")
        );
        std::fs::create_dir_all(base.join("feats")).unwrap();
        write(
            &base.join("feats/b.h5"),
            1,
            5,
            false,
            &[("patch_size_level0", 1)],
        );
        write(
            &base.join("feats/a.h5"),
            1,
            5,
            false,
            &[("patch_size_level0", 1)],
        );
        std::fs::write(base.join("feats/notes.txt"), b"").unwrap();
        let files = Layout::Pattern(folder.pattern(base)).files().unwrap();
        assert_eq!(
            files,
            vec![base.join("feats/a.h5"), base.join("feats/b.h5")]
        );
        // A broken file sorting first does not hide the width of the readable ones.
        std::fs::write(base.join("feats/0-broken.h5"), b"truncated").unwrap();
        let schema = folder.output_schema_at(&[], base).unwrap();
        assert_eq!(
            schema.field_with_name(EMBEDDING).unwrap().data_type(),
            &embedding_type(5, false)
        );
        let empty = H5FeaturesParams {
            path: "nothing/{slide_id}.h5".into(),
            ..Default::default()
        };
        std::fs::create_dir_all(base.join("nothing")).unwrap();
        let e = empty.output_schema_at(&[], base).unwrap_err().to_string();
        assert!(e.contains("no file matches"), "{e}");
    }
}
