//! The tile grid of one slide: every tile position fully inside the scanned area, kept when
//! enough of it is tissue.

use crate::reader::Rect;
use crate::tissue::Mask;

/// One kept tile, in level-0 pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridTile {
    pub x: u64,
    pub y: u64,
    /// Tissue fraction of the tile's area on the mask.
    pub tissue: f64,
}

/// Top-left corners (row-major, the order that keeps TIFF tile reads local) of the tiles of
/// side `size0` stepping by `stride0` that fit entirely inside `bounds`.
pub fn grid_positions(bounds: Rect, size0: u64, stride0: u64) -> Vec<(u64, u64)> {
    let count = |extent: u64| {
        if extent < size0 {
            0
        } else {
            (extent - size0) / stride0.max(1) + 1
        }
    };
    let (nx, ny) = (count(bounds.w), count(bounds.h));
    let mut out = Vec::with_capacity((nx * ny) as usize);
    for j in 0..ny {
        for i in 0..nx {
            out.push((bounds.x + i * stride0, bounds.y + j * stride0));
        }
    }
    out
}

/// Level-0 pixels per mask pixel, horizontally and vertically.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskScale {
    pub x: f64,
    pub y: f64,
}

/// The grid positions whose tissue fraction on `mask` is at least `min_tissue`.
pub fn tissue_tiles(
    positions: &[(u64, u64)],
    size0: u64,
    mask: &Mask,
    scale: MaskScale,
    min_tissue: f64,
) -> Vec<GridTile> {
    positions
        .iter()
        .filter_map(|&(x, y)| {
            let s = size0 as f64;
            let tissue = mask.fraction(
                x as f64 / scale.x,
                y as f64 / scale.y,
                (x as f64 + s) / scale.x,
                (y as f64 + s) / scale.y,
            );
            // Tolerate float noise on exact boundaries (a tile exactly half on tissue, 0.5).
            (tissue + 1e-9 >= min_tissue).then_some(GridTile { x, y, tissue })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_fit_inside_the_bounds_with_the_overlap_stride() {
        let b = Rect {
            x: 10,
            y: 20,
            w: 1000,
            h: 600,
        };
        // 512 px tiles, 128 px overlap: stride 384; x: 10, 394 (394 + 512 = 906 <= 1010), 778 too far.
        let p = grid_positions(b, 512, 384);
        assert_eq!(p, vec![(10, 20), (394, 20)]);
        assert!(grid_positions(b, 1001, 100).is_empty());
        assert_eq!(
            grid_positions(
                Rect {
                    x: 0,
                    y: 0,
                    w: 4,
                    h: 2
                },
                2,
                1
            )
            .len(),
            3
        );
    }

    #[test]
    fn tiles_are_kept_by_their_tissue_fraction() {
        // 4x4 mask, left half tissue; mask pixels are 10 level-0 px.
        let data = (0..16).map(|i| u8::from(i % 4 < 2)).collect();
        let mask = Mask {
            width: 4,
            height: 4,
            data,
        };
        let scale = MaskScale { x: 10.0, y: 10.0 };
        let positions = grid_positions(
            Rect {
                x: 0,
                y: 0,
                w: 40,
                h: 40,
            },
            20,
            10,
        );
        let kept = tissue_tiles(&positions, 20, &mask, scale, 0.5);
        let xs: Vec<u64> = kept.iter().map(|t| t.x).collect();
        // x = 0 (all tissue), 10 (half) kept; 20 (none) dropped; 3 rows each.
        assert_eq!(xs, vec![0, 10, 0, 10, 0, 10]);
        assert_eq!(kept[1].tissue, 0.5);
        assert_eq!(tissue_tiles(&positions, 20, &mask, scale, 0.0).len(), 9);
    }
}
