//! `kind: slideflow_features`: slideflow's feature bags (`DatasetFeatures.to_torch`), so a
//! cohort embedded with slideflow trains here without re-embedding.
//!
//! slideflow writes, per slide, `SLIDE.pt` (a `torch.save`d tensor `[N, D]`, float32 or
//! float16) and `SLIDE.index.npz` (`arr_0`: `[N, 2]` tile locations, the tiles' **centres** in
//! level-0 pixels), and once per folder `bags_config.json` with `tile_px` and `tile_um`. The
//! level-0 tile size is slideflow's own `int(tile_um / mpp)`, with `mpp` the slide's level-0
//! resolution (the dataset CSV's `mpp` column, else the `mpp` parameter); top-left corners are
//! the centres minus half of it, as slideflow computes them.

use crate::error::FeaturesResult;
use crate::features::{features_err, files_salt, slide_file};
use crate::h5_features::emit_rows;
use arrow::datatypes::SchemaRef;
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use tessera_pipeline::schema::embeddings_schema;
use tessera_pipeline::{
    BuildContext, InputSpec, ParamIssue, SlideHandle, Stage, StageContext, StageError, StageKind,
    StageResult,
};

/// Parameters of `kind: slideflow_features`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SlideflowParams {
    /// The bags folder (`SLIDE_ID.pt` + `SLIDE_ID.index.npz`), or a pattern such as
    /// `bags/{slide_id}.pt` (the index next to it). Relative paths: to the experiment file.
    pub path: String,
    /// Tile width in micrometres; default: `tile_um` of `bags_config.json` in the folder.
    pub tile_um: Option<f64>,
    /// Level-0 micrometres per pixel for slides whose CSV row has no `mpp`.
    pub mpp: Option<f64>,
    /// Level-0 tile size in pixels, overriding `tile_um / mpp`.
    pub tile_size: Option<i64>,
}

/// One slide's bag: what the stage emits for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bag {
    /// Level-0 top-left corners.
    pub coords: Vec<[i64; 2]>,
    pub tile_size: i64,
    pub dim: usize,
    /// `N * dim` values, row-major.
    pub features: Vec<f32>,
}

impl SlideflowParams {
    /// The `.pt` pattern resolved against `base_dir` (a folder `F` is `F/{slide_id}.pt`).
    pub fn pattern(&self, base_dir: &Path) -> String {
        crate::features::per_slide_pattern(&self.path, base_dir, "pt")
    }

    /// `tile_um`: the parameter, else `bags_config.json` next to the bags.
    fn tile_um(&self, pattern: &str) -> FeaturesResult<Option<f64>> {
        if self.tile_um.is_some() || self.tile_size.is_some() {
            return Ok(self.tile_um);
        }
        let config = Path::new(pattern)
            .parent()
            .map(|d| d.join("bags_config.json"))
            .unwrap_or_default();
        let Ok(text) = std::fs::read_to_string(&config) else {
            return Ok(None);
        };
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| features_err(&config, format!("not JSON: {e}")))?;
        match &json["tile_um"] {
            serde_json::Value::Number(n) => Ok(n.as_f64()),
            serde_json::Value::Null => Ok(None),
            other => Err(features_err(
                &config,
                format!("`tile_um` is {other}: a magnification; set `tile_um` (micrometres) or `tile_size` (level-0 pixels)"),
            )),
        }
    }

    /// Reads one slide's bag and index, placing the tiles with the slide's level-0 `mpp`.
    pub fn read(
        &self,
        pt: &Path,
        tile_um: Option<f64>,
        slide_mpp: Option<f64>,
    ) -> FeaturesResult<Bag> {
        let (n, dim, features) = read_pt_matrix(pt)?;
        let index = index_path(pt);
        let locations = read_locations(&index)?;
        if locations.len() != n {
            return Err(features_err(
                &index,
                format!(
                    "{} locations for the {n} rows of {}",
                    locations.len(),
                    pt.display()
                ),
            ));
        }
        if let Some(at) = features.iter().position(|v| !v.is_finite()) {
            return Err(features_err(
                pt,
                format!(
                    "row {} holds {} (NaN or infinite)",
                    at / dim.max(1),
                    features[at]
                ),
            ));
        }
        let tile_size = match self.tile_size {
            Some(t) => t,
            None => {
                let um = tile_um.ok_or_else(|| {
                    features_err(pt, "tile size unknown: no `tile_um` in bags_config.json; set `tile_um` or `tile_size`")
                })?;
                let mpp = slide_mpp.or(self.mpp).ok_or_else(|| {
                    features_err(pt, "the slide's level-0 resolution is unknown: give the dataset CSV an `mpp` column or set `mpp`")
                })?;
                // slideflow's full_extract_px = int(tile_um / mpp); the epsilon absorbs
                // binary representation error (128 / 0.25 must be 512, not 511).
                (um / mpp + 1e-6).floor() as i64
            }
        };
        if tile_size <= 0 {
            return Err(features_err(
                pt,
                format!("tile size {tile_size} is not positive"),
            ));
        }
        let half = tile_size / 2;
        let coords = locations
            .iter()
            .map(|c| [c[0] - half, c[1] - half])
            .collect();
        Ok(Bag {
            coords,
            tile_size,
            dim,
            features,
        })
    }
}

/// `SLIDE.pt` → `SLIDE.index.npz`.
pub fn index_path(pt: &Path) -> PathBuf {
    pt.with_extension("index.npz")
}

/// The `[N, D]` tensor a `.pt` file holds (torch's zip format, `torch.save(tensor)`), as
/// f32 values.
pub fn read_pt_matrix(path: &Path) -> FeaturesResult<(usize, usize, Vec<f32>)> {
    let err = |m: String| features_err(path, m);
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| err(format!("not a PyTorch zip file: {e}")))?;
    let pkl = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| err("no data.pkl inside: not a torch.save file".into()))?;
    let dir = pkl.trim_end_matches(".pkl").to_string();
    let object = {
        let entry = zip.by_name(&pkl).map_err(|e| err(e.to_string()))?;
        let mut reader = std::io::BufReader::new(entry);
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut reader)
            .map_err(|e| err(format!("unreadable pickle: {e}")))?;
        stack
            .finalize()
            .map_err(|e| err(format!("unreadable pickle: {e}")))?
    };
    let info = object
        .into_tensor_info(Object::Unicode("bag".into()), Path::new(&dir))
        .map_err(|e| err(format!("not a tensor: {e}")))?
        .ok_or_else(|| {
            err("holds no tensor (expected torch.save(tensor) of [tiles, width])".into())
        })?;
    let dims = info.layout.dims().to_vec();
    let (n, dim) = match dims.as_slice() {
        [n, d] => (*n, *d),
        other => {
            return Err(err(format!(
                "tensor of shape {other:?}, expected [tiles, width]"
            )))
        }
    };
    if !info.layout.is_contiguous() {
        return Err(err(
            "the tensor is not contiguous: save `bag.contiguous()`".into()
        ));
    }
    let mut entry = zip
        .by_name(&info.path)
        .map_err(|e| err(format!("tensor storage {}: {e}", info.path)))?;
    let size = info.dtype.size_in_bytes();
    let mut bytes = Vec::with_capacity(n * dim * size);
    std::io::copy(
        &mut entry.by_ref().take(info.layout.start_offset() as u64),
        &mut std::io::sink(),
    )
    .map_err(|e| err(e.to_string()))?;
    entry
        .take((n * dim * size) as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() != n * dim * size {
        return Err(err("the tensor's storage is truncated".into()));
    }
    let values: Vec<f32> = match info.dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        other => return Err(err(format!("tensor of {other:?}, expected floats"))),
    };
    Ok((n, dim, values))
}

/// `arr_0` of an `.index.npz`: `[N, 2]` level-0 tile centres.
pub fn read_locations(path: &Path) -> FeaturesResult<Vec<[i64; 2]>> {
    let err = |m: String| features_err(path, m);
    if !path.is_file() {
        return Err(err("no index file next to the bag".into()));
    }
    let arrays = Tensor::read_npz(path).map_err(|e| err(format!("unreadable .npz: {e}")))?;
    let (_, t) = arrays
        .into_iter()
        .find(|(name, _)| name == "arr_0")
        .ok_or_else(|| err("no `arr_0` array".into()))?;
    if t.dims().len() != 2 || t.dims()[1] != 2 {
        return Err(err(format!(
            "`arr_0` has shape {:?}, expected [tiles, 2]",
            t.dims()
        )));
    }
    let t = if t.dtype().is_float() {
        t.round().and_then(|t| t.to_dtype(DType::I64))
    } else {
        t.to_dtype(DType::I64)
    }
    .map_err(|e| err(e.to_string()))?;
    let rows = t.to_vec2::<i64>().map_err(|e| err(e.to_string()))?;
    Ok(rows.into_iter().map(|r| [r[0], r[1]]).collect())
}

impl StageKind for SlideflowParams {
    const KIND: &'static str = "slideflow_features";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "Reads tile embeddings from slideflow's feature bags (SLIDE.pt + SLIDE.index.npz)";

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
                "required: a folder of SLIDE_ID.pt bags or a pattern with {slide_id}",
            ));
        }
        for (field, v) in [("tile_um", self.tile_um), ("mpp", self.mpp)] {
            if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return Err(ParamIssue::new(field, "must be positive"));
            }
        }
        if self.tile_size.is_some_and(|t| t <= 0) {
            return Err(ParamIssue::new("tile_size", "must be positive"));
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> StageResult<Box<dyn Stage>> {
        let pattern = self.pattern(&ctx.base_dir);
        let dim = self.width(&pattern)?;
        let tile_um = self
            .tile_um(&pattern)
            .map_err(|e| StageError::other("reading bags_config.json", e))?;
        Ok(Box::new(SlideflowStage {
            params: self.clone(),
            pattern,
            tile_um,
            dim,
            schema: embeddings_schema(dim, false),
        }))
    }

    fn cache_salt(&self, ctx: &BuildContext) -> StageResult<String> {
        let pattern = self.pattern(&ctx.base_dir);
        Ok(files_salt(ctx.slides.iter().flat_map(|s| {
            let pt = slide_file(&pattern, &s.id);
            [index_path(&pt), pt]
        })))
    }
}

impl SlideflowParams {
    /// The embedding width of the first readable bag.
    fn width(&self, pattern: &str) -> StageResult<usize> {
        let files = crate::features::Layout::Pattern(pattern.to_string())
            .files()
            .map_err(|e| StageError::other("listing the slideflow bags", e))?;
        let bags: Vec<PathBuf> = files
            .into_iter()
            .filter(|f| !f.to_string_lossy().ends_with(".index.npz"))
            .collect();
        match crate::features::first_readable(&bags, |f| read_pt_matrix(f).map(|m| m.1)) {
            Some(w) => w.map_err(|e| StageError::other("reading the bags' width", e)),
            None => Err(StageError::msg(format!(
                "slideflow_features: no bag matches `{pattern}`"
            ))),
        }
    }
}

/// The running `slideflow_features` source.
struct SlideflowStage {
    params: SlideflowParams,
    pattern: String,
    tile_um: Option<f64>,
    dim: usize,
    schema: SchemaRef,
}

impl Stage for SlideflowStage {
    fn on_slide_end(
        &mut self,
        ctx: &mut StageContext,
        _input: usize,
        slide: &SlideHandle,
    ) -> StageResult {
        let pt = slide_file(&self.pattern, &slide.id);
        let read = || -> FeaturesResult<Bag> {
            if !pt.is_file() {
                return Err(features_err(
                    &pt,
                    format!("no bag for slide `{}`", slide.id),
                ));
            }
            let bag = self.params.read(&pt, self.tile_um, slide.mpp)?;
            if bag.dim != self.dim {
                return Err(features_err(
                    &pt,
                    format!(
                        "embeddings are {} wide, the first bag's are {}",
                        bag.dim, self.dim
                    ),
                ));
            }
            Ok(bag)
        };
        let bag = read().map_err(|e| StageError::other("reading slideflow bags", e))?;
        emit_rows(
            ctx,
            slide,
            &self.schema,
            &bag.coords,
            bag.tile_size,
            bag.dim,
            &bag.features,
        )
    }
}
