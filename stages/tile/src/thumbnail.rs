//! The per-slide picture users check before trusting a run: the slide, the tissue mask's
//! outline and every kept tile drawn on top, saved as PNG.

use crate::error::{TileError, TileResult};
use crate::grid::GridTile;
use crate::reader::Overview;
use crate::resample::resize_nearest;
use crate::tissue::Mask;
use std::path::Path;

const MASK_EDGE: [u8; 3] = [0, 200, 0];
const TILE_EDGE: [u8; 3] = [20, 60, 230];
/// How much the non-tissue background is faded towards white.
const FADE: f32 = 0.5;
/// Opacity of the tint over each kept tile.
const TILE_TINT: f32 = 0.2;

/// Draws `mask` (outlined in green, background faded) and `tiles` (tinted and outlined in
/// blue) on `picture` and returns the RGB8 image.
pub fn render(picture: &Overview, mask: &Mask, tiles: &[GridTile], size0: u64) -> Vec<u8> {
    let (w, h) = (picture.width, picture.height);
    let mut rgb = picture.rgb.clone();
    let m = resize_nearest(&mask.data, mask.width, mask.height, w, h);
    let blend = |px: &mut [u8], color: [u8; 3], alpha: f32| {
        for (c, t) in px.iter_mut().zip(color) {
            *c = (f32::from(*c) * (1.0 - alpha) + f32::from(t) * alpha).round() as u8;
        }
    };
    for i in 0..w * h {
        if m[i] == 0 {
            blend(&mut rgb[i * 3..i * 3 + 3], [255, 255, 255], FADE);
        }
    }
    // Tiles: tint the area, outline when the tile is large enough on the picture.
    for t in tiles {
        let x0 = (t.x as f64 / picture.scale_x).floor() as usize;
        let y0 = (t.y as f64 / picture.scale_y).floor() as usize;
        let x1 = (((t.x + size0) as f64 / picture.scale_x).ceil() as usize).min(w);
        let y1 = (((t.y + size0) as f64 / picture.scale_y).ceil() as usize).min(h);
        if x0 >= x1 || y0 >= y1 {
            continue;
        }
        let outline = x1 - x0 >= 4 && y1 - y0 >= 4;
        for y in y0..y1 {
            for x in x0..x1 {
                let edge = outline && (x == x0 || y == y0 || x == x1 - 1 || y == y1 - 1);
                let px = &mut rgb[(y * w + x) * 3..(y * w + x) * 3 + 3];
                if edge {
                    px.copy_from_slice(&TILE_EDGE);
                } else {
                    blend(px, TILE_EDGE, TILE_TINT);
                }
            }
        }
    }
    // Mask outline last so it stays visible over tiles.
    for y in 0..h {
        for x in 0..w {
            if m[y * w + x] == 0 {
                continue;
            }
            let background = |dx: isize, dy: isize| {
                let (nx, ny) = (x as isize + dx, y as isize + dy);
                nx < 0
                    || ny < 0
                    || nx >= w as isize
                    || ny >= h as isize
                    || m[ny as usize * w + nx as usize] == 0
            };
            if background(-1, 0) || background(1, 0) || background(0, -1) || background(0, 1) {
                rgb[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&MASK_EDGE);
            }
        }
    }
    rgb
}

/// Renders and writes the thumbnail PNG at `path`, creating its folder.
pub fn write(
    path: &Path,
    picture: &Overview,
    mask: &Mask,
    tiles: &[GridTile],
    size0: u64,
) -> TileResult<()> {
    let fail = |message: String| TileError::Thumbnail {
        path: path.to_path_buf(),
        message,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    }
    let rgb = render(picture, mask, tiles, size0);
    let (w, h) = (picture.width as u32, picture.height as u32);
    image::save_buffer_with_format(
        path,
        &rgb,
        w,
        h,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_mask_outline_faded_background_and_tile_edges() {
        let picture = Overview {
            rgb: vec![100; 20 * 10 * 3],
            width: 20,
            height: 10,
            scale_x: 2.0,
            scale_y: 2.0,
        };
        // Mask on the left half (10 x 10 of 20 x 10), at half the picture's resolution.
        let mask = Mask {
            width: 10,
            height: 5,
            data: (0..50).map(|i| u8::from(i % 10 < 5)).collect(),
        };
        let tiles = [GridTile {
            x: 4,
            y: 4,
            tissue: 1.0,
        }];
        let rgb = render(&picture, &mask, &tiles, 10);
        let px = |x: usize, y: usize| &rgb[(y * 20 + x) * 3..(y * 20 + x) * 3 + 3];
        assert_eq!(
            px(15, 5),
            &[178, 178, 178],
            "background faded halfway to white"
        );
        assert_eq!(px(9, 5), &MASK_EDGE, "mask border");
        // The tile covers picture pixels 2..7: edge at 2, tint inside.
        assert_eq!(px(2, 4), &TILE_EDGE);
        assert_ne!(px(4, 4), &[100, 100, 100]);
        assert_eq!(px(1, 8), &[100, 100, 100], "tissue outside tiles untouched");
    }

    #[test]
    fn writes_a_png_of_the_picture_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("thumbnails/s1.png");
        let picture = Overview {
            rgb: vec![200; 8 * 6 * 3],
            width: 8,
            height: 6,
            scale_x: 1.0,
            scale_y: 1.0,
        };
        let mask = Mask {
            width: 8,
            height: 6,
            data: vec![1; 48],
        };
        write(&path, &picture, &mask, &[], 4).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (8, 6));
    }
}
