//! The direct tile reader: for JPEG-compressed tiled TIFF and Aperio SVS (the common case) it
//! reads each TIFF tile's compressed bytes itself, splices in the shared JPEGTables and decodes
//! with libjpeg-turbo straight into the caller's RGB buffer, skipping OpenSlide's per-tile
//! overhead (libtiff's RGBA path, ARGB cache, cairo compositing). Anything it does not handle
//! — other vendors, other compressions, levels whose geometry does not match OpenSlide's —
//! is left to OpenSlide by the caller, so the fast path is invisible except in speed.

use crate::reader::LevelInfo;
use crate::tiff_dir::{read_directories, Directory, TiffDirError};
use crate::turbo::{JpegColorspace, JpegDecoder};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// TIFF compression 7: JPEG ("new-style", tables in JPEGTables).
const COMPRESSION_JPEG: u64 = 7;
const PHOTOMETRIC_RGB: u64 = 2;
const PHOTOMETRIC_YCBCR: u64 = 6;
/// Decoded TIFF tiles kept per reader for requests that straddle tile boundaries (overlapping
/// or misaligned tiles), so a TIFF tile shared by neighbouring requests is decoded once.
const CACHE_TILES: usize = 32;

/// OpenSlide vendors whose pyramid levels are exactly the file's tiled directories.
const DIRECT_VENDORS: [&str; 2] = ["aperio", "generic-tiff"];

/// Why the direct path is not used for a slide, a level or a region (the caller then reads
/// through OpenSlide).
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("vendor `{0}` is left to OpenSlide")]
    Vendor(String),
    #[error(transparent)]
    Tiff(#[from] TiffDirError),
    #[error("the file's tiled directories do not match OpenSlide's levels")]
    LevelMismatch,
    #[error("no level is JPEG-compressed 8-bit RGB/YCbCr")]
    NoUsableLevel,
    #[error("libturbojpeg could not create a decompressor")]
    Decoder,
    #[error("reading tile {index} of level {level}: {message}")]
    Tile {
        level: u32,
        index: usize,
        message: String,
    },
}

/// One pyramid level the direct path reads.
#[derive(Debug)]
struct LevelLayout {
    width: u64,
    height: u64,
    tile_w: u64,
    tile_h: u64,
    across: u64,
    offsets: Vec<u64>,
    counts: Vec<u64>,
    /// What each tile's stream (minus its own SOI) is appended to: SOI, an Adobe marker
    /// saying "RGB, no transform" for RGB-photometric levels, and the JPEGTables' tables.
    prefix: Vec<u8>,
    /// Photometric RGB (decoded without colour conversion) rather than YCbCr.
    photometric_rgb: bool,
}

/// A slide's direct reader; one per reading thread (owns a decoder and a tile cache).
#[derive(Debug)]
pub struct DirectReader {
    file: File,
    /// Indexed by OpenSlide level; None where OpenSlide reads.
    levels: Vec<Option<LevelLayout>>,
    decoder: JpegDecoder,
    /// Spliced JPEG stream of the tile being decoded (reused).
    stream: Vec<u8>,
    cache: Vec<(TileKey, Vec<u8>)>,
}

/// A `w x h` rectangle of one level, top-left `(x, y)` in that level's pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelRegion {
    pub level: u32,
    pub x: u64,
    pub y: u64,
    pub w: u32,
    pub h: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TileKey {
    level: u32,
    index: usize,
}

impl DirectReader {
    /// Builds the reader for a slide OpenSlide opened as `vendor` with `levels`; refuses
    /// (with the reason) unless the TIFF's tiled directories match those levels exactly.
    pub fn open(path: &Path, vendor: &str, levels: &[LevelInfo]) -> Result<Self, DirectError> {
        if !DIRECT_VENDORS.contains(&vendor) {
            return Err(DirectError::Vendor(vendor.to_string()));
        }
        let file = File::open(path).map_err(TiffDirError::from)?;
        let tiled: Vec<Directory> = read_directories(&file)?
            .into_iter()
            .filter(Directory::is_tiled)
            .collect();
        let matched = match_levels(tiled, levels).ok_or(DirectError::LevelMismatch)?;
        let mut decoder = JpegDecoder::new().ok_or(DirectError::Decoder)?;
        let mut stream = Vec::new();
        let layouts: Vec<Option<LevelLayout>> = matched
            .into_iter()
            .map(|dir| {
                let layout = layout_of(dir)?;
                probe_level(&file, &layout, &mut decoder, &mut stream).then_some(layout)
            })
            .collect();
        if layouts.iter().all(Option::is_none) {
            return Err(DirectError::NoUsableLevel);
        }
        Ok(DirectReader {
            file,
            levels: layouts,
            decoder,
            stream,
            cache: Vec::with_capacity(CACHE_TILES),
        })
    }

    /// Tiles of `level` and their size, for tools that decode streams themselves (the
    /// decoder comparison of the tiling bench); None when the level is not direct.
    pub fn tile_grid(&self, level: u32) -> Option<(usize, u32, u32)> {
        let layout = self.levels.get(level as usize)?.as_ref()?;
        Some((
            layout.offsets.len(),
            layout.tile_w as u32,
            layout.tile_h as u32,
        ))
    }

    /// The complete (spliced) JPEG stream of tile `index` of `level`, into `out`.
    pub fn tile_stream(
        &self,
        level: u32,
        index: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), DirectError> {
        let error = |message: String| DirectError::Tile {
            level,
            index,
            message,
        };
        let layout = self
            .levels
            .get(level as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| error("level not read directly".into()))?;
        if index >= layout.offsets.len() {
            return Err(error("no such tile".into()));
        }
        splice_tile(&self.file, layout, index, out).map_err(error)
    }

    /// Whether `level` is read directly.
    pub fn handles_level(&self, level: u32) -> bool {
        matches!(self.levels.get(level as usize), Some(Some(_)))
    }

    /// Reads `w x h` RGB8 pixels of `level` at level coordinates `(x, y)` into `out`, areas
    /// outside the level taking `background` (as OpenSlide's transparent pixels do after
    /// compositing). Ok(false): the level is not handled, `out` untouched.
    pub fn read_region(
        &mut self,
        region: LevelRegion,
        background: [u8; 3],
        out: &mut Vec<u8>,
    ) -> Result<bool, DirectError> {
        let LevelRegion { level, x, y, w, h } = region;
        let Some(Some(layout)) = self.levels.get(level as usize) else {
            return Ok(false);
        };
        let (w64, h64) = (u64::from(w), u64::from(h));
        let pitch = w as usize * 3;
        out.clear();
        let inside = x + w64 <= layout.width && y + h64 <= layout.height;
        if inside {
            // Every pixel is written below.
            out.resize(pitch * h as usize, 0);
        } else {
            out.reserve(pitch * h as usize);
            for _ in 0..w as usize * h as usize {
                out.extend_from_slice(&background);
            }
        }
        if x >= layout.width || y >= layout.height || w == 0 || h == 0 {
            return Ok(true);
        }
        let (tw, th) = (layout.tile_w, layout.tile_h);
        let aligned = x.is_multiple_of(tw) && y.is_multiple_of(th);
        let (c0, r0) = (x / tw, y / th);
        let c1 = (x + w64 - 1).min(layout.width - 1) / tw;
        let r1 = (y + h64 - 1).min(layout.height - 1) / th;
        for r in r0..=r1 {
            for c in c0..=c1 {
                let (tx, ty) = (c * tw, r * th);
                // The tile's pixels inside the level and inside the request.
                let vx0 = tx.max(x);
                let vy0 = ty.max(y);
                let vx1 = (tx + tw).min(layout.width).min(x + w64);
                let vy1 = (ty + th).min(layout.height).min(y + h64);
                let index = (r * layout.across + c) as usize;
                let whole = vx0 == tx && vy0 == ty && vx1 == tx + tw && vy1 == ty + th;
                let dst_offset = ((vy0 - y) as usize * w as usize + (vx0 - x) as usize) * 3;
                if aligned && whole {
                    // Straight into the output: no copy, nothing cached.
                    splice_tile(&self.file, layout, index, &mut self.stream)
                        .and_then(|()| {
                            self.decoder.decode_rgb(
                                &self.stream,
                                tw as u32,
                                th as u32,
                                out,
                                dst_offset,
                                pitch,
                            )
                        })
                        .map_err(|message| DirectError::Tile {
                            level,
                            index,
                            message,
                        })?;
                    continue;
                }
                let key = TileKey { level, index };
                let tile = cached_tile(&mut self.cache, key, || -> Result<Vec<u8>, String> {
                    splice_tile(&self.file, layout, index, &mut self.stream)?;
                    let mut pixels = vec![0u8; (tw * th * 3) as usize];
                    self.decoder.decode_rgb(
                        &self.stream,
                        tw as u32,
                        th as u32,
                        &mut pixels,
                        0,
                        tw as usize * 3,
                    )?;
                    Ok(pixels)
                })
                .map_err(|message| DirectError::Tile {
                    level,
                    index,
                    message,
                })?;
                let row_bytes = (vx1 - vx0) as usize * 3;
                for row in 0..(vy1 - vy0) as usize {
                    let src =
                        ((vy0 - ty) as usize + row) * tw as usize * 3 + (vx0 - tx) as usize * 3;
                    let dst = dst_offset + row * pitch;
                    out[dst..dst + row_bytes].copy_from_slice(&tile[src..src + row_bytes]);
                }
            }
        }
        Ok(true)
    }
}

/// The decoded tile under `key`, decoding it with `decode` on a miss (least recently used
/// entries leave first).
fn cached_tile(
    cache: &mut Vec<(TileKey, Vec<u8>)>,
    key: TileKey,
    decode: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<&[u8], String> {
    if let Some(pos) = cache.iter().position(|(k, _)| *k == key) {
        let entry = cache.remove(pos);
        cache.push(entry);
    } else {
        let pixels = decode()?;
        if cache.len() >= CACHE_TILES {
            cache.remove(0);
        }
        cache.push((key, pixels));
    }
    Ok(cache.last().map(|(_, p)| p.as_slice()).unwrap_or(&[]))
}

/// Pairs the tiled directories with OpenSlide's levels: in file order (Aperio) or by
/// decreasing width (OpenSlide's generic TIFF order); None unless every size matches.
fn match_levels(mut tiled: Vec<Directory>, levels: &[LevelInfo]) -> Option<Vec<Directory>> {
    let fits = |dirs: &[Directory]| {
        dirs.len() == levels.len()
            && dirs
                .iter()
                .zip(levels)
                .all(|(d, l)| d.width == l.width && d.height == l.height)
    };
    if fits(&tiled) {
        return Some(tiled);
    }
    tiled.sort_by_key(|d| std::cmp::Reverse(d.width));
    fits(&tiled).then_some(tiled)
}

/// The level's layout if it is JPEG-compressed 8-bit 3-sample contiguous RGB/YCbCr with
/// consistent tile arrays.
fn layout_of(dir: Directory) -> Option<LevelLayout> {
    let supported = dir.compression == COMPRESSION_JPEG
        && dir.samples_per_pixel == 3
        && dir.bits_per_sample == 8
        && dir.planar_config == 1
        && matches!(dir.photometric, PHOTOMETRIC_RGB | PHOTOMETRIC_YCBCR)
        && dir.tile_width <= 1 << 16
        && dir.tile_height <= 1 << 16;
    if !supported || dir.width == 0 || dir.height == 0 {
        return None;
    }
    let across = dir.width.div_ceil(dir.tile_width);
    let down = dir.height.div_ceil(dir.tile_height);
    let tiles = (across * down) as usize;
    if dir.tile_offsets.len() != tiles || dir.tile_byte_counts.len() != tiles {
        return None;
    }
    let photometric_rgb = dir.photometric == PHOTOMETRIC_RGB;
    let mut prefix = vec![0xFF, 0xD8];
    if photometric_rgb {
        // libtiff decodes RGB-photometric JPEG (Aperio's usual kind: component ids 0,1,2, no
        // JFIF/Adobe marker) without colour conversion; libjpeg would guess YCbCr for such a
        // stream. An Adobe APP14 marker with transform 0 makes it RGB, as libtiff has it.
        prefix.extend_from_slice(&ADOBE_RGB_MARKER);
    }
    match dir.jpeg_tables {
        None => {}
        Some(t) if t.len() >= 4 && t.starts_with(&[0xFF, 0xD8]) && t.ends_with(&[0xFF, 0xD9]) => {
            prefix.extend_from_slice(&t[2..t.len() - 2]);
        }
        Some(_) => return None,
    }
    Some(LevelLayout {
        width: dir.width,
        height: dir.height,
        tile_w: dir.tile_width,
        tile_h: dir.tile_height,
        across,
        offsets: dir.tile_offsets,
        counts: dir.tile_byte_counts,
        prefix,
        photometric_rgb,
    })
}

/// Whether the stream of the first non-empty tile decodes to the colour model the TIFF
/// declares, at the tile size: libtiff hands RGB-photometric JPEG to libjpeg without colour
/// conversion and YCbCr with it, which TurboJPEG only matches when the stream says the same.
fn probe_level(
    file: &File,
    layout: &LevelLayout,
    decoder: &mut JpegDecoder,
    stream: &mut Vec<u8>,
) -> bool {
    let expect_rgb = layout.photometric_rgb;
    let Some(index) = layout.counts.iter().position(|&n| n > 0) else {
        return false;
    };
    if splice_tile(file, layout, index, stream).is_err() {
        return false;
    }
    match decoder.header(stream) {
        Ok(h) => {
            let model_ok = match h.colorspace {
                JpegColorspace::Rgb => expect_rgb,
                JpegColorspace::YCbCr => !expect_rgb,
                JpegColorspace::Other(_) => false,
            };
            model_ok && u64::from(h.width) == layout.tile_w && u64::from(h.height) == layout.tile_h
        }
        Err(_) => false,
    }
}

/// APP14 "Adobe" segment, version 100, no flags, transform 0 (components are RGB as stored).
const ADOBE_RGB_MARKER: [u8; 16] = [
    0xFF, 0xEE, 0x00, 0x0E, b'A', b'd', b'o', b'b', b'e', 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// Fills `stream` with tile `index`'s complete JPEG stream: the level's prefix (SOI, colour
/// marker, shared tables) followed by the tile's abbreviated stream without its SOI marker.
fn splice_tile(
    file: &File,
    layout: &LevelLayout,
    index: usize,
    stream: &mut Vec<u8>,
) -> Result<(), String> {
    let offset = layout.offsets[index];
    let count = layout.counts[index];
    // Compressed tiles are far smaller than raw ones; a bigger count means a corrupt file,
    // not a buffer to allocate.
    let limit = layout.tile_w * layout.tile_h * 3 + (1 << 20);
    if !(4..=limit).contains(&count) {
        return Err(format!("tile has {count} bytes of data"));
    }
    let count = count as usize;
    stream.clear();
    let prefix = layout.prefix.len();
    stream.extend_from_slice(&layout.prefix);
    stream.resize(prefix - 2 + count, 0);
    // The tile's SOI lands on the prefix's last two bytes; they are restored below.
    let saved = [stream[prefix - 2], stream[prefix - 1]];
    file.read_exact_at(&mut stream[prefix - 2..], offset)
        .map_err(|e| format!("reading {count} bytes at {offset}: {e}"))?;
    if stream[prefix - 2..prefix] != [0xFF, 0xD8] {
        return Err("tile data does not start with a JPEG SOI marker".into());
    }
    stream[prefix - 2..prefix].copy_from_slice(&saved);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::{ReaderMode, SlideReader};
    use crate::test_data::slide_path;
    use std::process::Command;

    /// Max and mean absolute channel difference between two RGB buffers.
    fn diff(a: &[u8], b: &[u8]) -> (u8, f64) {
        assert_eq!(a.len(), b.len());
        let mut max = 0u8;
        let mut sum = 0u64;
        for (x, y) in a.iter().zip(b) {
            let d = x.abs_diff(*y);
            max = max.max(d);
            sum += u64::from(d);
        }
        (max, sum as f64 / a.len().max(1) as f64)
    }

    /// Reads every region both ways and checks the direct pixels equal OpenSlide's; returns
    /// the worst (max, mean) difference seen.
    /// The direct reader is called itself (not through SlideReader, which would silently
    /// fall back to OpenSlide on a failure).
    fn compare(path: &Path, vendor: &str, regions: &[(u32, u64, u64, u32, u32)]) -> (u8, f64) {
        let fast = SlideReader::open_with(path, ReaderMode::Auto).unwrap();
        let slow = SlideReader::open_with(path, ReaderMode::Openslide).unwrap();
        assert!(
            fast.reads_directly(0),
            "{}: level 0 not direct",
            path.display()
        );
        assert!(!slow.reads_directly(0));
        let mut direct = DirectReader::open(path, vendor, slow.levels()).unwrap();
        let mut worst = (0u8, 0f64);
        for &(level, x, y, w, h) in regions {
            let ds = slow.levels()[level as usize].downsample;
            let (lx, ly) = (x as f64 / ds, y as f64 / ds);
            assert!(
                lx.fract() == 0.0 && ly.fract() == 0.0,
                "test region off the pixel grid"
            );
            let mut a = Vec::new();
            assert!(direct
                .read_region(
                    LevelRegion {
                        level,
                        x: lx as u64,
                        y: ly as u64,
                        w,
                        h
                    },
                    [255, 255, 255],
                    &mut a
                )
                .unwrap());
            assert_eq!(a, fast.read_region(level, x, y, w, h).unwrap());
            let b = slow.read_region(level, x, y, w, h).unwrap();
            assert_eq!(a.len(), (w * h * 3) as usize);
            let (max, mean) = diff(&a, &b);
            eprintln!(
                "{} level {level} ({x}, {y}) {w}x{h}: max abs diff {max}, mean {mean:.5}",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            assert!(
                max <= 1 && mean < 0.01,
                "level {level} ({x}, {y}) {w}x{h}: max {max}, mean {mean}"
            );
            worst = (worst.0.max(max), worst.1.max(mean));
        }
        worst
    }

    #[test]
    fn aperio_svs_pixels_equal_openslides() {
        // CMU-1-Small-Region: 2220 x 2967, 240 px JPEG tiles, one level.
        let regions = [
            (0, 0, 0, 240, 240),       // one TIFF tile, aligned
            (0, 480, 720, 480, 480),   // 2 x 2 TIFF tiles, aligned
            (0, 37, 52, 256, 256),     // misaligned: composed from 4 tiles
            (0, 1000, 1000, 512, 300), // misaligned, several tiles
            (0, 2160, 2880, 240, 240), // partial edge tile at the bottom-right corner
            (0, 2100, 2900, 256, 256), // region running past both borders
            (0, 2300, 3000, 64, 64),   // entirely outside the slide: background
        ];
        let (max, mean) = compare(&slide_path("CMU-1-Small-Region.svs"), "aperio", &regions);
        eprintln!("CMU-1-Small-Region.svs worst: max {max}, mean {mean:.5}");
    }

    /// A small pyramidal JPEG TIFF made with vips the way make_big_slide.sh makes the big one
    /// (1000 x 700 px: partial edge tiles at 256 px; levels 2x and 4x exact).
    fn small_jpeg_tiff(dir: &Path) -> std::path::PathBuf {
        let src = slide_path("CMU-1-Small-Region.svs");
        let run = |args: &[&str]| {
            let status = Command::new("vips")
                .args(args)
                .status()
                .expect("running vips (Debian libvips-tools, installed by scripts/setup.sh)");
            assert!(status.success(), "vips {args:?} failed");
        };
        let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
        run(&[
            "openslideload",
            &src.to_string_lossy(),
            &p("rgba.v"),
            "--level",
            "0",
        ]);
        run(&["extract_band", &p("rgba.v"), &p("rgb.v"), "0", "--n", "3"]);
        run(&[
            "crop",
            &p("rgb.v"),
            &p("crop.v"),
            "300",
            "500",
            "1000",
            "700",
        ]);
        let out = p("small.tif");
        run(&[
            "tiffsave",
            &p("crop.v"),
            &out,
            "--tile",
            "--tile-width",
            "256",
            "--tile-height",
            "256",
            "--pyramid",
            "--compression",
            "jpeg",
            "--Q",
            "90",
            "--bigtiff",
        ]);
        dir.join("small.tif")
    }

    #[test]
    fn generated_jpeg_tiff_pixels_equal_openslides_on_every_exact_level() {
        let tmp = tempfile::tempdir().unwrap();
        let path = small_jpeg_tiff(tmp.path());
        let fast = SlideReader::open(&path).unwrap();
        assert_eq!(fast.dimensions(), (1000, 700));
        assert!(fast.levels().len() >= 3, "{:?}", fast.levels());
        assert!(fast.reads_directly(1) && fast.reads_directly(2));
        assert_eq!(fast.levels()[1].downsample, 2.0);
        let regions = [
            (0, 0, 0, 256, 256),     // aligned
            (0, 256, 256, 512, 512), // 2 x 2 aligned, bottom row partial (700 < 768)
            (0, 768, 512, 256, 256), // the corner tile: 232 x 188 valid pixels
            (0, 100, 100, 300, 300), // misaligned
            (0, 900, 600, 200, 200), // past both borders
            (1, 0, 0, 256, 256),     // level 1 (500 x 350): x/2 = 0
            (1, 512, 512, 256, 256), // level 1 at (256, 256): partial tile
            (2, 4, 8, 200, 100),     // level 4x: misaligned, whole level + background
        ];
        compare(&path, "generic-tiff", &regions);
        // Tiles through the public tile API (what the stage and pool call) agree too.
        let slow = SlideReader::open_with(&path, ReaderMode::Openslide).unwrap();
        for (x, y, size0, px) in [(0, 0, 512, 512), (256, 0, 512, 256), (600, 300, 400, 100)] {
            let (max, _) = diff(
                &fast.read_tile(x, y, size0, px).unwrap(),
                &slow.read_tile(x, y, size0, px).unwrap(),
            );
            assert!(max <= 1, "tile ({x}, {y}, {size0} -> {px}): max {max}");
        }
    }

    #[test]
    fn other_formats_and_non_jpeg_levels_stay_with_openslide() {
        // boxes.tiff is a generic tiled TIFF; only JPEG levels may be direct, and whatever
        // is read must still match the PNG-checked OpenSlide path.
        let path = slide_path("boxes.tiff");
        let fast = SlideReader::open(&path).unwrap();
        let slow = SlideReader::open_with(&path, ReaderMode::Openslide).unwrap();
        let a = fast.read_region(0, 10, 20, 100, 80).unwrap();
        let b = slow.read_region(0, 10, 20, 100, 80).unwrap();
        assert!(diff(&a, &b).0 <= 1);
        // A file that is not JPEG-tiled TIFF at all is refused with a reason.
        let err = DirectReader::open(&path, "hamamatsu", &[]).unwrap_err();
        assert!(matches!(err, DirectError::Vendor(_)), "{err}");
    }

    #[test]
    fn levels_must_match_openslides_sizes() {
        let path = slide_path("CMU-1-Small-Region.svs");
        let wrong = [LevelInfo {
            width: 2220,
            height: 2968,
            downsample: 1.0,
        }];
        let err = DirectReader::open(&path, "aperio", &wrong).unwrap_err();
        assert!(matches!(err, DirectError::LevelMismatch), "{err}");
    }
}
