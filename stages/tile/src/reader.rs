//! [`SlideReader`]: one open slide and everything tessera reads from it — RGB regions,
//! tiles at a requested level-0 size and output size (picking the pyramid level and
//! resampling), and the low-resolution overview tissue detection runs on. The embedding and
//! end-to-end training stages reuse it to read pixels for coordinates they were given.

use crate::dicom;
use crate::direct::{DirectReader, LevelRegion};
use crate::error::{TileError, TileResult};
use crate::pixels::argb_to_rgb;
use crate::resample::{resize, Window};
use openslide_rs::{Address, OpenSlide, Region, Size};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Relative slack when matching a requested downsample to a pyramid level: scanners store
/// levels at 4.0003x rather than 4x, which must still count as the 4x level.
const LEVEL_TOLERANCE: f64 = 0.01;

/// Coarsest level-0 resolution taken from a slide's metadata, in microns per pixel. OpenSlide 4
/// reads a generic TIFF's resolution tags as mpp, which image tools fill with print/screen
/// defaults (72 dpi: 352.8 um; vips: 1 px/mm); no whole-slide scan is coarser than a few um
/// (1.25x: about 8 um), so a larger value is treated as no mpp.
const MAX_SLIDE_MPP: f64 = 20.0;

/// Bytes of ARGB one overview band may read at once, so a single-level gigapixel slide
/// never needs its whole level 0 in memory.
const OVERVIEW_BAND_BYTES: f64 = 64.0 * 1024.0 * 1024.0;

/// How pixels are decoded. OpenSlide always opens the slide and answers every metadata
/// question; `auto` additionally reads JPEG-compressed tiled TIFF and Aperio SVS levels
/// directly (libjpeg-turbo, same pixels, about twice the speed) and falls back to OpenSlide
/// for everything else; `openslide` decodes every pixel through OpenSlide.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReaderMode {
    #[default]
    Auto,
    Openslide,
}

/// One pyramid level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelInfo {
    pub width: u64,
    pub height: u64,
    /// Level-0 pixels per pixel of this level.
    pub downsample: f64,
}

/// A level-0 rectangle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u64,
    pub y: u64,
    pub w: u64,
    pub h: u64,
}

/// A low-resolution RGB picture of the whole slide, with its scale to level 0.
#[derive(Debug, Clone)]
pub struct Overview {
    pub rgb: Vec<u8>,
    pub width: usize,
    pub height: usize,
    /// Level-0 pixels per overview pixel, horizontally.
    pub scale_x: f64,
    /// Level-0 pixels per overview pixel, vertically.
    pub scale_y: f64,
}

/// An open slide. Cheap to query; reads are thread-safe but each reading thread should open
/// its own reader (OpenSlide serialises decoding per handle on some formats).
#[derive(Debug)]
pub struct SlideReader {
    slide: OpenSlide,
    /// The slide as given (a DICOM slide's folder, not the instance OpenSlide opened).
    path: PathBuf,
    /// OpenSlide's name for the format (`aperio`, `dicom`, `generic-tiff`, ...).
    vendor: String,
    levels: Vec<LevelInfo>,
    mpp: Option<f64>,
    objective_power: Option<f64>,
    background: [u8; 3],
    /// The direct JPEG tile reader, when the slide's format and levels allow it.
    direct: Option<Mutex<DirectReader>>,
}

impl SlideReader {
    /// Opens a slide in any format OpenSlide reads (a DICOM slide by its folder or any of its
    /// instance files); the error names the slide and carries OpenSlide's own message. Reads
    /// pixels directly where it can ([`ReaderMode::Auto`]).
    pub fn open(path: impl AsRef<Path>) -> TileResult<Self> {
        Self::open_with(path, ReaderMode::Auto)
    }

    /// [`open`](Self::open) with an explicit choice of pixel decoder.
    pub fn open_with(path: impl AsRef<Path>, mode: ReaderMode) -> TileResult<Self> {
        let path = path.as_ref().to_path_buf();
        let open_err = |message: String| TileError::Open {
            path: path.clone(),
            message,
        };
        let file = dicom::openable_path(&path)?;
        let slide = OpenSlide::new(&file).map_err(|e| {
            open_err(dicom::unsupported_reason(&path).unwrap_or_else(|| e.to_string()))
        })?;
        let dims = slide.all_level_dimensions();
        let downsamples = slide.all_level_downsamples();
        if dims.is_empty() {
            return Err(open_err("the slide has no pyramid levels".into()));
        }
        let levels: Vec<LevelInfo> = dims
            .iter()
            .zip(downsamples)
            .map(|(d, &ds)| LevelInfo {
                width: u64::from(d.w),
                height: u64::from(d.h),
                downsample: ds,
            })
            .collect();
        if levels[0].width == 0 || levels[0].height == 0 {
            return Err(open_err("level 0 has no pixels".into()));
        }
        let number = |name: &str| {
            slide
                .property_value(name)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v > 0.0)
        };
        let mpp = match (number("openslide.mpp-x"), number("openslide.mpp-y")) {
            (Some(x), Some(y)) => Some((x + y) / 2.0),
            (one, other) => one.or(other),
        }
        .filter(|&mpp| {
            let plausible = mpp <= MAX_SLIDE_MPP;
            if !plausible {
                tracing::debug!(
                    "{}: ignoring mpp {mpp} (a default DPI, not a microscope resolution)",
                    path.display()
                );
            }
            plausible
        });
        let objective_power = number("openslide.objective-power");
        let vendor = slide
            .property_value("openslide.vendor")
            .unwrap_or_default()
            .trim()
            .to_string();
        if vendor == "dicom" {
            let image_type: Vec<String> = (0..)
                .map_while(|i| slide.property_value(&format!("dicom.ImageType[{i}]")).ok())
                .collect();
            dicom::check_level_zero(&path, &image_type, (levels[0].width, levels[0].height))?;
        }
        let background = slide
            .property_value("openslide.background-color")
            .ok()
            .and_then(|hex| parse_hex_rgb(hex.trim()))
            .unwrap_or([255, 255, 255]);
        let direct = match mode {
            ReaderMode::Openslide => None,
            ReaderMode::Auto => match DirectReader::open(&file, &vendor, &levels) {
                Ok(d) => Some(Mutex::new(d)),
                Err(reason) => {
                    tracing::debug!("{}: pixels through OpenSlide ({reason})", path.display());
                    None
                }
            },
        };
        Ok(SlideReader {
            slide,
            path,
            vendor,
            levels,
            mpp,
            objective_power,
            background,
            direct,
        })
    }

    /// Whether pixels of `level` are decoded by the direct JPEG reader (for regions whose
    /// position falls on whole pixels of that level) rather than by OpenSlide.
    pub fn reads_directly(&self, level: u32) -> bool {
        self.direct
            .as_ref()
            .is_some_and(|d| d.lock().map(|d| d.handles_level(level)).unwrap_or(false))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// OpenSlide's name for the slide's format (`aperio`, `dicom`, `generic-tiff`, ...), for
    /// checks and messages that depend on it.
    pub fn vendor(&self) -> &str {
        &self.vendor
    }

    /// One of OpenSlide's metadata properties (`openslide.*`, or the format's own, such as
    /// `dicom.SeriesInstanceUID`), for metadata this reader does not interpret itself.
    pub fn property(&self, name: &str) -> Option<String> {
        self.slide.property_value(name).ok()
    }

    /// Checks, once per slide before tiling, what opening does not: for a DICOM slide, that
    /// every instance in its folder opens and belongs to its series (when named by the
    /// folder) and that the last tile of every level decodes (an instance cut inside its
    /// pixel data fails there, not halfway through tiling). Other formats pass.
    pub fn verify(&self) -> TileResult<()> {
        if self.vendor != "dicom" {
            return Ok(());
        }
        let series = self.property("dicom.SeriesInstanceUID");
        dicom::check_instances(&self.path, series.as_deref())?;
        for (index, level) in self.levels.iter().enumerate() {
            // Level-0 coordinates of the level's last pixel: in its last frame, which
            // TILED_FULL instances store last.
            let x = ((level.width - 1) as f64 * level.downsample) as u64;
            let y = ((level.height - 1) as f64 * level.downsample) as u64;
            self.read_region(index as u32, x, y, 1, 1)
                .map_err(|e| TileError::Dicom {
                    path: self.path.clone(),
                    message: format!(
                        "level {index} ({}x{} px) does not decode its last tile ({}): an \
                         instance is truncated or damaged",
                        level.width,
                        level.height,
                        match e {
                            TileError::Read { message, .. } => message,
                            other => other.to_string(),
                        }
                    ),
                })?;
        }
        Ok(())
    }

    /// Level-0 width and height.
    pub fn dimensions(&self) -> (u64, u64) {
        (self.levels[0].width, self.levels[0].height)
    }

    pub fn levels(&self) -> &[LevelInfo] {
        &self.levels
    }

    /// Level-0 microns per pixel from the slide's metadata (mean of x and y), if it has one.
    pub fn mpp(&self) -> Option<f64> {
        self.mpp
    }

    /// The scanner's objective power (e.g. 20 or 40), if the metadata has it.
    pub fn objective_power(&self) -> Option<f64> {
        self.objective_power
    }

    /// The level-0 rectangle holding scanned data (smaller than the level for formats such
    /// as MIRAX that pad their canvas); the whole level otherwise.
    pub fn bounds(&self) -> Rect {
        let b = self.slide.bounds();
        let (w0, h0) = self.dimensions();
        let x = u64::from(b.origin.x).min(w0);
        let y = u64::from(b.origin.y).min(h0);
        Rect {
            x,
            y,
            w: u64::from(b.size.w).min(w0 - x),
            h: u64::from(b.size.h).min(h0 - y),
        }
    }

    /// The coarsest level whose downsample does not exceed `downsample` (within 1%), so that
    /// reading never upsamples unless level 0 itself is too coarse.
    pub fn best_level(&self, downsample: f64) -> u32 {
        let limit = downsample * (1.0 + LEVEL_TOLERANCE);
        self.levels
            .iter()
            .enumerate()
            .filter(|(_, l)| l.downsample <= limit)
            .max_by(|a, b| a.1.downsample.total_cmp(&b.1.downsample))
            .map(|(i, _)| i as u32)
            .unwrap_or(0)
    }

    /// The level [`read_tile`](Self::read_tile) reads a `size0` tile from for `out_px` output.
    pub fn tile_level(&self, size0: u64, out_px: u32) -> u32 {
        self.best_level(size0 as f64 / f64::from(out_px.max(1)))
    }

    /// Reads `w x h` pixels of `level` whose top-left corner is at level-0 `(x, y)`, as RGB8
    /// (transparent areas take the slide's background colour).
    pub fn read_region(&self, level: u32, x: u64, y: u64, w: u32, h: u32) -> TileResult<Vec<u8>> {
        let mut out = Vec::new();
        self.read_region_into(level, x, y, w, h, &mut out)?;
        Ok(out)
    }

    fn read_region_into(
        &self,
        level: u32,
        x: u64,
        y: u64,
        w: u32,
        h: u32,
        out: &mut Vec<u8>,
    ) -> TileResult<()> {
        if self.read_region_direct(level, x, y, w, h, out) {
            return Ok(());
        }
        let geometry = |what: &str| TileError::Geometry {
            path: self.path.clone(),
            message: format!("{what} ({x}, {y}) does not fit OpenSlide's 32-bit addresses"),
        };
        let address = Address {
            x: u32::try_from(x).map_err(|_| geometry("level-0 position"))?,
            y: u32::try_from(y).map_err(|_| geometry("level-0 position"))?,
        };
        let region = Region {
            address,
            level,
            size: Size { w, h },
        };
        let argb = self
            .slide
            .read_region(&region)
            .map_err(|e| TileError::Read {
                path: self.path.clone(),
                x: x as i64,
                y: y as i64,
                level,
                w,
                h,
                message: e.to_string(),
            })?;
        argb_to_rgb(&argb, self.background, out);
        Ok(())
    }

    /// The direct path for [`read_region_into`](Self::read_region_into): true when it filled
    /// `out`. OpenSlide maps the level-0 position to `x / downsample` on the level; only
    /// whole-pixel positions are taken here (others need OpenSlide's sub-pixel rendering).
    /// Any failure returns false so OpenSlide reads the region (and reports real errors).
    fn read_region_direct(
        &self,
        level: u32,
        x: u64,
        y: u64,
        w: u32,
        h: u32,
        out: &mut Vec<u8>,
    ) -> bool {
        let (Some(direct), Some(info)) = (&self.direct, self.levels.get(level as usize)) else {
            return false;
        };
        let (lx, ly) = (x as f64 / info.downsample, y as f64 / info.downsample);
        if lx.fract() != 0.0 || ly.fract() != 0.0 {
            return false;
        }
        let mut direct = match direct.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let region = LevelRegion {
            level,
            x: lx as u64,
            y: ly as u64,
            w,
            h,
        };
        match direct.read_region(region, self.background, out) {
            Ok(done) => done,
            Err(reason) => {
                tracing::debug!(
                    "{}: falling back to OpenSlide: {reason}",
                    self.path.display()
                );
                false
            }
        }
    }

    /// Reads the level-0 square `(x, y, size0)` as an `out_px x out_px` RGB8 tile: from the
    /// coarsest level at least as fine as the target, resampled when the level does not match
    /// the target exactly.
    pub fn read_tile(&self, x: u64, y: u64, size0: u64, out_px: u32) -> TileResult<Vec<u8>> {
        let mut out = Vec::new();
        self.read_tile_into(x, y, size0, out_px, &mut out)?;
        Ok(out)
    }

    /// [`read_tile`](Self::read_tile) into a caller's buffer (reused across tiles).
    pub fn read_tile_into(
        &self,
        x: u64,
        y: u64,
        size0: u64,
        out_px: u32,
        out: &mut Vec<u8>,
    ) -> TileResult<()> {
        if out_px == 0 || size0 == 0 {
            return Err(TileError::Geometry {
                path: self.path.clone(),
                message: format!("empty tile requested at ({x}, {y}): size {size0} -> {out_px} px"),
            });
        }
        let level = self.tile_level(size0, out_px);
        let span = size0 as f64 / self.levels[level as usize].downsample;
        if (span - f64::from(out_px)).abs() < 0.5 {
            // The level matches the target: no resampling.
            return self.read_region_into(level, x, y, out_px, out_px, out);
        }
        let read = span.ceil().max(1.0) as u32;
        let region = self.read_region(level, x, y, read, read)?;
        let n = read as usize;
        let window = Window {
            x: 0.0,
            y: 0.0,
            w: span,
            h: span,
        };
        *out = resize(&region, n, n, 3, window, out_px as usize, out_px as usize);
        Ok(())
    }

    /// A picture of the whole slide at about `downsample` level-0 pixels per pixel, read in
    /// horizontal bands from the best level and area-averaged.
    pub fn read_overview(&self, downsample: f64) -> TileResult<Overview> {
        let (w0, h0) = self.dimensions();
        let ds = downsample.max(1.0);
        let width = ((w0 as f64 / ds).round() as usize).max(1);
        let height = ((h0 as f64 / ds).round() as usize).max(1);
        let scale_x = w0 as f64 / width as f64;
        let scale_y = h0 as f64 / height as f64;
        let level = self.best_level(scale_x.min(scale_y));
        let info = self.levels[level as usize];
        // Level pixels per level-0 pixel, from the level's real extent.
        let fx = info.width as f64 / w0 as f64;
        let fy = info.height as f64 / h0 as f64;
        let level_w = u32::try_from(info.width).map_err(|_| TileError::Geometry {
            path: self.path.clone(),
            message: format!(
                "level {level} is {} px wide, too wide to read in one band",
                info.width
            ),
        })?;
        let level_rows_per_row = scale_y * fy;
        let budget_rows = (OVERVIEW_BAND_BYTES / (4.0 * info.width as f64)).max(1.0);
        let band = ((budget_rows / level_rows_per_row).floor() as usize).clamp(1, height);
        let mut rgb = Vec::with_capacity(width * height * 3);
        let mut top = 0;
        while top < height {
            let bottom = (top + band).min(height);
            let start = top as f64 * level_rows_per_row;
            let end = bottom as f64 * level_rows_per_row;
            let first_row = start.floor() as u64;
            let last_row = (end.ceil() as u64).min(info.height).max(first_row + 1);
            let rows = (last_row - first_row) as u32;
            let y0 = (first_row as f64 / fy).round() as u64;
            let region = self.read_region(level, 0, y0, level_w, rows)?;
            let window = Window {
                x: 0.0,
                y: start - first_row as f64,
                w: width as f64 * scale_x * fx,
                h: end - start,
            };
            rgb.extend(resize(
                &region,
                level_w as usize,
                rows as usize,
                3,
                window,
                width,
                bottom - top,
            ));
            top = bottom;
        }
        Ok(Overview {
            rgb,
            width,
            height,
            scale_x,
            scale_y,
        })
    }
}

/// Parses OpenSlide's `RRGGBB` background colour.
fn parse_hex_rgb(hex: &str) -> Option<[u8; 3]> {
    if hex.len() != 6 {
        return None;
    }
    let channel = |i: usize| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok();
    Some([channel(0)?, channel(2)?, channel(4)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::slide_path;

    #[test]
    fn real_svs_reports_its_geometry_and_mpp() {
        let r = SlideReader::open(slide_path("CMU-1-Small-Region.svs")).unwrap();
        assert_eq!(r.dimensions(), (2220, 2967));
        assert_eq!(r.levels().len(), 1);
        let mpp = r.mpp().unwrap();
        assert!((mpp - 0.499).abs() < 1e-3, "{mpp}");
        assert_eq!(r.objective_power(), Some(20.0));
        assert_eq!(
            r.bounds(),
            Rect {
                x: 0,
                y: 0,
                w: 2220,
                h: 2967
            }
        );
    }

    #[test]
    fn generic_tiff_has_levels_and_no_mpp() {
        let r = SlideReader::open(slide_path("boxes.tiff")).unwrap();
        assert_eq!(r.dimensions(), (300, 250));
        assert_eq!(r.levels().len(), 4);
        // boxes.tiff says 72 dpi (in pixels per centimetre): OpenSlide 4 reports that as an mpp
        // of 352.9 um, OpenSlide 3 reports none; neither is a microscope's.
        assert_eq!(r.mpp(), None);
        assert_eq!(r.best_level(1.0), 0);
        assert_eq!(r.best_level(2.0), 1);
        assert_eq!(r.best_level(3.0), 1);
        assert_eq!(r.best_level(100.0), 3);
        assert_eq!(r.best_level(0.5), 0);
    }

    #[test]
    fn level_zero_tiles_match_the_png_oracle() {
        let r = SlideReader::open(slide_path("boxes.tiff")).unwrap();
        let png = image::open(slide_path("boxes.png")).unwrap().to_rgb8();
        let tile = r.read_tile(37, 52, 64, 64).unwrap();
        assert_eq!(tile.len(), 64 * 64 * 3);
        for ty in 0..64u32 {
            for tx in 0..64u32 {
                let want = png.get_pixel(37 + tx, 52 + ty).0;
                let i = ((ty * 64 + tx) * 3) as usize;
                assert_eq!(&tile[i..i + 3], &want, "pixel ({tx}, {ty})");
            }
        }
    }

    #[test]
    fn downsampled_tiles_approximate_the_area_average_of_level_zero() {
        let r = SlideReader::open(slide_path("CMU-1-Small-Region.svs")).unwrap();
        // 3x downsample on a single-level slide: read 300 px, average 3x3 blocks.
        let full = r.read_region(0, 600, 900, 300, 300).unwrap();
        let tile = r.read_tile(600, 900, 300, 100).unwrap();
        for (ty, tx) in [(0usize, 0usize), (50, 50), (99, 13), (7, 99)] {
            for c in 0..3 {
                let mut sum = 0u32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        sum += u32::from(full[((ty * 3 + dy) * 300 + tx * 3 + dx) * 3 + c]);
                    }
                }
                let mean = f64::from(sum) / 9.0;
                let got = f64::from(tile[(ty * 100 + tx) * 3 + c]);
                assert!(
                    (got - mean).abs() <= 0.51,
                    "({tx}, {ty}) channel {c}: {got} vs {mean}"
                );
            }
        }
    }

    #[test]
    fn overview_covers_the_slide_at_the_requested_scale() {
        let r = SlideReader::open(slide_path("boxes.tiff")).unwrap();
        let o = r.read_overview(10.0).unwrap();
        assert_eq!((o.width, o.height), (30, 25));
        assert_eq!(o.rgb.len(), 30 * 25 * 3);
        assert!((o.scale_x - 10.0).abs() < 1e-9);
        // Compare with the PNG averaged over the same 10x10 blocks.
        let png = image::open(slide_path("boxes.png")).unwrap().to_rgb8();
        let mut total_error = 0f64;
        for oy in 0..25u32 {
            for ox in 0..30u32 {
                for c in 0..3 {
                    let mut sum = 0f64;
                    for dy in 0..10 {
                        for dx in 0..10 {
                            sum += f64::from(png.get_pixel(ox * 10 + dx, oy * 10 + dy).0[c]);
                        }
                    }
                    let got = f64::from(o.rgb[((oy * 30 + ox) * 3) as usize + c]);
                    total_error += (got - sum / 100.0).abs();
                }
            }
        }
        // Read from the 8x level and resampled: box edges blur over a pixel, flat areas match.
        let mean_error = total_error / (30.0 * 25.0 * 3.0);
        assert!(mean_error < 6.0, "mean channel error {mean_error}");
        // The middle of the blue box is pure blue.
        assert_eq!(&o.rgb[((14 * 30 + 13) * 3) as usize..][..3], &[0, 0, 255]);
    }

    #[test]
    fn broken_slides_name_the_file_and_openslides_message() {
        let err = SlideReader::open(slide_path("unopenable.tiff"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unopenable.tiff"), "{err}");
        assert!(err.starts_with("cannot open slide"), "{err}");
        let err = SlideReader::open("/nonexistent/slide.svs")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/slide.svs"), "{err}");
        let failure = SlideReader::open(slide_path("unreadable.svs"))
            .and_then(|r| r.read_tile(0, 0, 16, 16).map(|_| ()));
        let err = failure.unwrap_err().to_string();
        assert!(err.contains("unreadable.svs"), "{err}");
    }
}
