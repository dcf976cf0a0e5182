//! Pictures: tile scores blended over the slide's thumbnail, and the top-scoring tiles side
//! by side.
//!
//! Colours: scores of one sign (attention weights, most instance scores) run from their
//! minimum to their maximum on a sequential map (viridis: dark purple = lowest, yellow =
//! highest); signed scores (class activation maps, gradient x input) use a diverging map
//! centred on 0 (blue = against the class, light grey = neutral, red = for it), scaled by the
//! largest magnitude, so the colour of 0 never moves.

use std::path::Path;

use tessera_tile::{Overview, SlideReader};

use crate::HeatmapError;

/// Viridis, sampled at 9 points.
const VIRIDIS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 44, 122],
    [59, 81, 139],
    [44, 113, 142],
    [33, 144, 141],
    [39, 173, 129],
    [92, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
];

/// Blue - light grey - red (Moreland's cool-warm).
const COOLWARM: [[u8; 3]; 5] = [
    [59, 76, 192],
    [141, 176, 254],
    [221, 221, 221],
    [244, 154, 123],
    [180, 4, 38],
];

/// Distinct colours for classes (QuPath classifications), cycled.
const CLASS_COLORS: [[u8; 3]; 8] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
];

/// The display colour of class `c`.
pub fn class_color(c: usize) -> [u8; 3] {
    CLASS_COLORS[c % CLASS_COLORS.len()]
}

fn interpolate(stops: &[[u8; 3]], t: f32) -> [u8; 3] {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = t * (stops.len() - 1) as f32;
    let k = (pos.floor() as usize).min(stops.len() - 2);
    let f = pos - k as f32;
    let mut out = [0u8; 3];
    for (ch, o) in out.iter_mut().enumerate() {
        let a = f32::from(stops[k][ch]);
        let b = f32::from(stops[k + 1][ch]);
        *o = (a + (b - a) * f).round() as u8;
    }
    out
}

/// How scores map to colours (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColorScale {
    /// Viridis from `lo` to `hi`.
    Sequential { lo: f32, hi: f32 },
    /// Cool-warm from `-m` to `m`.
    Diverging { m: f32 },
}

impl ColorScale {
    /// The scale for a set of scores.
    pub fn for_scores(values: &[f32]) -> ColorScale {
        let lo = values.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !lo.is_finite() || !hi.is_finite() {
            return ColorScale::Sequential { lo: 0.0, hi: 1.0 };
        }
        if lo < 0.0 && hi > 0.0 {
            ColorScale::Diverging {
                m: lo.abs().max(hi.abs()),
            }
        } else {
            ColorScale::Sequential { lo, hi }
        }
    }

    /// The colour of `v`.
    pub fn color(&self, v: f32) -> [u8; 3] {
        match *self {
            ColorScale::Sequential { lo, hi } => {
                let t = if hi > lo { (v - lo) / (hi - lo) } else { 1.0 };
                interpolate(&VIRIDIS, t)
            }
            ColorScale::Diverging { m } => {
                let t = if m > 0.0 { 0.5 + 0.5 * v / m } else { 0.5 };
                interpolate(&COOLWARM, t)
            }
        }
    }
}

/// A tile to draw: level-0 top-left corner and size, and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredTile {
    pub x: i64,
    pub y: i64,
    pub size: i64,
    pub score: f32,
}

/// Height of the colour bar drawn under the heatmap.
const BAR: usize = 12;

/// Blends every tile's colour over `picture` with opacity `alpha` (tiles drawn in increasing
/// score order, so where tiles overlap the higher score shows), adds a colour bar along the
/// bottom (the scale's low end on the left), and returns the RGB8 image and its size.
pub fn overlay(
    picture: &Overview,
    tiles: &[ScoredTile],
    scale: ColorScale,
    alpha: f32,
) -> (Vec<u8>, usize, usize) {
    let (w, h) = (picture.width, picture.height);
    let mut rgb = picture.rgb.clone();
    let mut order: Vec<&ScoredTile> = tiles.iter().collect();
    order.sort_by(|a, b| a.score.total_cmp(&b.score));
    for t in order {
        let color = scale.color(t.score);
        let x0 = (t.x.max(0) as f64 / picture.scale_x).floor() as usize;
        let y0 = (t.y.max(0) as f64 / picture.scale_y).floor() as usize;
        let x1 = (((t.x + t.size).max(0) as f64 / picture.scale_x).ceil() as usize).min(w);
        let y1 = (((t.y + t.size).max(0) as f64 / picture.scale_y).ceil() as usize).min(h);
        for y in y0..y1 {
            for x in x0..x1 {
                let px = &mut rgb[(y * w + x) * 3..(y * w + x) * 3 + 3];
                for (c, t) in px.iter_mut().zip(color) {
                    *c = (f32::from(*c) * (1.0 - alpha) + f32::from(t) * alpha).round() as u8;
                }
            }
        }
    }
    // Colour bar.
    for _ in 0..BAR {
        for x in 0..w {
            let t = if w > 1 {
                x as f32 / (w - 1) as f32
            } else {
                1.0
            };
            let v = match scale {
                ColorScale::Sequential { lo, hi } => lo + t * (hi - lo),
                ColorScale::Diverging { m } => -m + 2.0 * m * t,
            };
            rgb.extend_from_slice(&scale.color(v));
        }
    }
    (rgb, w, h + BAR)
}

/// Reads the slide's thumbnail: the whole slide with its longest side about `max_side` px.
pub fn thumbnail(reader: &SlideReader, max_side: u32) -> Result<Overview, HeatmapError> {
    let (w0, h0) = reader.dimensions();
    let downsample = (w0.max(h0) as f64 / f64::from(max_side.max(1))).max(1.0);
    Ok(reader.read_overview(downsample)?)
}

/// For slides without a file (features computed elsewhere): a light grey canvas covering the
/// tiles' bounding box, longest side about `max_side` px, and the tiles shifted onto it.
pub fn blank_canvas(tiles: &[ScoredTile], max_side: u32) -> (Overview, Vec<ScoredTile>) {
    let x0 = tiles.iter().map(|t| t.x).min().unwrap_or(0);
    let y0 = tiles.iter().map(|t| t.y).min().unwrap_or(0);
    let x1 = tiles.iter().map(|t| t.x + t.size).max().unwrap_or(1);
    let y1 = tiles.iter().map(|t| t.y + t.size).max().unwrap_or(1);
    let (w0, h0) = ((x1 - x0).max(1) as f64, (y1 - y0).max(1) as f64);
    let scale = (w0.max(h0) / f64::from(max_side.max(1))).max(1e-9);
    let (w, h) = (
        ((w0 / scale).round() as usize).max(1),
        ((h0 / scale).round() as usize).max(1),
    );
    let picture = Overview {
        rgb: vec![235; w * h * 3],
        width: w,
        height: h,
        scale_x: w0 / w as f64,
        scale_y: h0 / h as f64,
    };
    let shifted = tiles
        .iter()
        .map(|t| ScoredTile {
            x: t.x - x0,
            y: t.y - y0,
            ..*t
        })
        .collect();
    (picture, shifted)
}

/// Width of the gap and frame around each tile of a strip.
const FRAME: usize = 4;

/// The `tiles` (already ranked) read from the slide at `px` x `px`, side by side, each framed
/// in its score's colour.
pub fn strip(
    reader: &SlideReader,
    tiles: &[ScoredTile],
    scale: ColorScale,
    px: u32,
) -> Result<(Vec<u8>, usize, usize), HeatmapError> {
    let side = px as usize;
    let cell = side + 2 * FRAME;
    let (w, h) = ((cell * tiles.len().max(1)) + FRAME, cell + 2 * FRAME);
    let mut rgb = vec![255u8; w * h * 3];
    for (k, t) in tiles.iter().enumerate() {
        let pixels = reader.read_tile(
            t.x.max(0) as u64,
            t.y.max(0) as u64,
            t.size.max(1) as u64,
            px,
        )?;
        let color = scale.color(t.score);
        let (ox, oy) = (FRAME + k * cell, FRAME);
        for y in 0..cell {
            for x in 0..cell {
                let (ix, iy) = (x as isize - FRAME as isize, y as isize - FRAME as isize);
                let inside = ix >= 0 && iy >= 0 && (ix as usize) < side && (iy as usize) < side;
                let src: [u8; 3] = if inside {
                    let i = (iy as usize * side + ix as usize) * 3;
                    [pixels[i], pixels[i + 1], pixels[i + 2]]
                } else {
                    color
                };
                let o = ((oy + y) * w + ox + x) * 3;
                rgb[o..o + 3].copy_from_slice(&src);
            }
        }
    }
    Ok((rgb, w, h))
}

/// Saves an RGB8 image as PNG (through a temporary file renamed at the end).
pub fn save_png(path: &Path, rgb: &[u8], w: usize, h: usize) -> Result<(), HeatmapError> {
    let fail = |message: String| HeatmapError::Write {
        path: path.display().to_string(),
        message,
    };
    let tmp = path.with_extension("png.tmp");
    image::save_buffer_with_format(
        &tmp,
        rgb,
        w as u32,
        h as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|e| fail(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_pick_sequential_or_diverging_and_keep_zero_neutral() {
        assert_eq!(
            ColorScale::for_scores(&[0.1, 0.3]),
            ColorScale::Sequential { lo: 0.1, hi: 0.3 }
        );
        let d = ColorScale::for_scores(&[-2.0, 1.0]);
        assert_eq!(d, ColorScale::Diverging { m: 2.0 });
        assert_eq!(d.color(0.0), COOLWARM[2]);
        assert_eq!(d.color(-2.0), COOLWARM[0]);
        assert_eq!(d.color(2.0), COOLWARM[4]);
        let s = ColorScale::Sequential { lo: 0.0, hi: 1.0 };
        assert_eq!(s.color(0.0), VIRIDIS[0]);
        assert_eq!(s.color(1.0), VIRIDIS[8]);
        assert_eq!(s.color(0.5), VIRIDIS[4]);
    }

    #[test]
    fn overlay_colours_tiles_at_their_scaled_positions() {
        let picture = Overview {
            rgb: vec![255; 10 * 10 * 3],
            width: 10,
            height: 10,
            scale_x: 10.0,
            scale_y: 10.0,
        };
        let tiles = [
            ScoredTile {
                x: 0,
                y: 0,
                size: 30,
                score: 0.0,
            },
            ScoredTile {
                x: 50,
                y: 50,
                size: 30,
                score: 1.0,
            },
        ];
        let scale = ColorScale::Sequential { lo: 0.0, hi: 1.0 };
        let (rgb, w, h) = overlay(&picture, &tiles, scale, 1.0);
        assert_eq!((w, h), (10, 10 + BAR));
        let px = |x: usize, y: usize| {
            [
                rgb[(y * w + x) * 3],
                rgb[(y * w + x) * 3 + 1],
                rgb[(y * w + x) * 3 + 2],
            ]
        };
        assert_eq!(px(1, 1), VIRIDIS[0]);
        assert_eq!(px(6, 6), VIRIDIS[8]);
        assert_eq!(px(4, 4), [255, 255, 255], "between the tiles");
        assert_eq!(px(0, 11), VIRIDIS[0], "colour bar starts low");
        assert_eq!(px(9, 11), VIRIDIS[8], "and ends high");
    }

    #[test]
    fn blank_canvas_covers_the_tiles_bounding_box() {
        let tiles = [
            ScoredTile {
                x: 1000,
                y: 500,
                size: 100,
                score: 0.0,
            },
            ScoredTile {
                x: 1300,
                y: 600,
                size: 100,
                score: 1.0,
            },
        ];
        let (picture, shifted) = blank_canvas(&tiles, 40);
        assert_eq!((picture.width, picture.height), (40, 20));
        assert_eq!((shifted[0].x, shifted[0].y), (0, 0));
        assert_eq!((shifted[1].x, shifted[1].y), (300, 100));
        assert!((picture.scale_x - 10.0).abs() < 1e-9);
    }
}
