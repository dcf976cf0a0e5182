//! Resampling for tiles whose target resolution falls between pyramid levels, and for the
//! low-resolution overview. Downscaling averages every covered source pixel by its covered
//! area (OpenCV's `INTER_AREA`, the usual choice for tiles: no aliasing of nuclei texture);
//! upscaling is bilinear. Both are separable: one pass along rows, one along columns.

/// A rectangle of the source image, in source pixels (fractional edges allowed), that is
/// mapped onto the whole destination image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl Window {
    /// The whole of a `w x h` source.
    pub fn full(w: usize, h: usize) -> Self {
        Window {
            x: 0.0,
            y: 0.0,
            w: w as f64,
            h: h as f64,
        }
    }
}

/// For each destination index along one axis: which source indices contribute, and how much.
struct Taps {
    /// `offsets[i]..offsets[i + 1]` indexes `index`/`weight` for destination `i`.
    offsets: Vec<usize>,
    index: Vec<usize>,
    weight: Vec<f32>,
}

impl Taps {
    fn of(&self, i: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let range = self.offsets[i]..self.offsets[i + 1];
        self.index[range.clone()]
            .iter()
            .copied()
            .zip(self.weight[range].iter().copied())
    }

    fn min_max(&self) -> (usize, usize) {
        let min = self.index.iter().copied().min().unwrap_or(0);
        let max = self.index.iter().copied().max().unwrap_or(0);
        (min, max)
    }
}

/// Taps mapping `dst_len` destination pixels onto `[start, start + span)` of a source axis of
/// `src_len` pixels; positions outside the source replicate its edge.
fn axis_taps(src_len: usize, start: f64, span: f64, dst_len: usize) -> Taps {
    let scale = span / dst_len as f64;
    let last = src_len.saturating_sub(1) as i64;
    let clamp = |j: i64| j.clamp(0, last) as usize;
    let mut taps = Taps {
        offsets: vec![0],
        index: Vec::new(),
        weight: Vec::new(),
    };
    for i in 0..dst_len {
        let first = taps.index.len();
        if scale >= 1.0 {
            // Area average of [a, b).
            let a = start + i as f64 * scale;
            let b = a + scale;
            let mut j = a.floor() as i64;
            while (j as f64) < b {
                let covered = (b.min(j as f64 + 1.0) - a.max(j as f64)).max(0.0);
                if covered > 1e-9 {
                    let idx = clamp(j);
                    // Merge replicated edge taps into one.
                    if taps.index.len() > first && taps.index.last() == Some(&idx) {
                        if let Some(w) = taps.weight.last_mut() {
                            *w += covered as f32;
                        }
                    } else {
                        taps.index.push(idx);
                        taps.weight.push(covered as f32);
                    }
                }
                j += 1;
            }
        } else {
            // Bilinear around the destination pixel's centre.
            let c = start + (i as f64 + 0.5) * scale - 0.5;
            let j0 = c.floor();
            let t = (c - j0) as f32;
            taps.index.push(clamp(j0 as i64));
            taps.weight.push(1.0 - t);
            taps.index.push(clamp(j0 as i64 + 1));
            taps.weight.push(t);
        }
        let total: f32 = taps.weight[first..].iter().sum();
        if total > 0.0 {
            for w in &mut taps.weight[first..] {
                *w /= total;
            }
        }
        taps.offsets.push(taps.index.len());
    }
    taps
}

/// Resamples `window` of an interleaved 8-bit image (`channels` per pixel, `sw x sh`) to a
/// `dw x dh` image.
pub fn resize(
    src: &[u8],
    sw: usize,
    sh: usize,
    channels: usize,
    window: Window,
    dw: usize,
    dh: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; dw * dh * channels];
    if sw == 0 || sh == 0 || dw == 0 || dh == 0 {
        return out;
    }
    debug_assert!(src.len() >= sw * sh * channels);
    let xt = axis_taps(sw, window.x, window.w, dw);
    let yt = axis_taps(sh, window.y, window.h, dh);
    let (y_min, y_max) = yt.min_max();
    let row_len = dw * channels;
    // Horizontal pass over the source rows the vertical pass will need.
    let mut rows = vec![0f32; (y_max - y_min + 1) * row_len];
    for (r, sy) in (y_min..=y_max).enumerate() {
        let src_row = &src[sy * sw * channels..(sy + 1) * sw * channels];
        let dst_row = &mut rows[r * row_len..(r + 1) * row_len];
        for dx in 0..dw {
            let acc = &mut dst_row[dx * channels..(dx + 1) * channels];
            for (sx, w) in xt.of(dx) {
                let px = &src_row[sx * channels..(sx + 1) * channels];
                for (a, &v) in acc.iter_mut().zip(px) {
                    *a += w * f32::from(v);
                }
            }
        }
    }
    // Vertical pass.
    let mut acc = vec![0f32; row_len];
    for dy in 0..dh {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (sy, w) in yt.of(dy) {
            let row = &rows[(sy - y_min) * row_len..(sy - y_min + 1) * row_len];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += w * v;
            }
        }
        for (o, &a) in out[dy * row_len..(dy + 1) * row_len].iter_mut().zip(&acc) {
            *o = (a + 0.5).clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Nearest-neighbour resize of a one-byte-per-pixel image (masks must stay binary).
pub fn resize_nearest(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
    let mut out = vec![0u8; dw * dh];
    if sw == 0 || sh == 0 {
        return out;
    }
    for y in 0..dh {
        let sy = ((y as f64 + 0.5) * sh as f64 / dh as f64) as usize;
        let sy = sy.min(sh - 1);
        for x in 0..dw {
            let sx = (((x as f64 + 0.5) * sw as f64 / dw as f64) as usize).min(sw - 1);
            out[y * dw + x] = src[sy * sw + sx];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct definition of area averaging: each source pixel weighted by the exact area of
    /// its overlap with the destination pixel's footprint (2-D, not separable).
    fn area_oracle(
        src: &[u8],
        sw: usize,
        sh: usize,
        win: Window,
        dw: usize,
        dh: usize,
    ) -> Vec<f64> {
        let overlap = |a0: f64, a1: f64, b0: f64, b1: f64| (a1.min(b1) - a0.max(b0)).max(0.0);
        let (fw, fh) = (win.w / dw as f64, win.h / dh as f64);
        let mut out = vec![0.0; dw * dh];
        for dy in 0..dh {
            for dx in 0..dw {
                let (x0, y0) = (win.x + dx as f64 * fw, win.y + dy as f64 * fh);
                let mut sum = 0.0;
                for sy in 0..sh {
                    for sx in 0..sw {
                        let area = overlap(x0, x0 + fw, sx as f64, sx as f64 + 1.0)
                            * overlap(y0, y0 + fh, sy as f64, sy as f64 + 1.0);
                        sum += area * f64::from(src[sy * sw + sx]);
                    }
                }
                out[dy * dw + dx] = sum / (fw * fh);
            }
        }
        out
    }

    fn pattern(w: usize, h: usize) -> Vec<u8> {
        (0..w * h)
            .map(|i| ((i * 37 + (i / w) * 11) % 251) as u8)
            .collect()
    }

    #[test]
    fn integer_downscale_is_the_block_mean() {
        let src = pattern(8, 6);
        let out = resize(&src, 8, 6, 1, Window::full(8, 6), 4, 3);
        for dy in 0..3 {
            for dx in 0..4 {
                let s: u32 = [(0, 0), (1, 0), (0, 1), (1, 1)]
                    .iter()
                    .map(|(ox, oy)| u32::from(src[(2 * dy + oy) * 8 + 2 * dx + ox]))
                    .sum();
                let mean = (f64::from(s) / 4.0 + 0.5).floor() as u8;
                assert_eq!(out[dy * 4 + dx], mean, "at ({dx}, {dy})");
            }
        }
    }

    #[test]
    fn fractional_downscale_matches_the_area_integral() {
        let (sw, sh) = (23, 17);
        let src = pattern(sw, sh);
        // A window with fractional edges, scaled by ~2.7: the tile case between levels.
        let win = Window {
            x: 1.3,
            y: 0.6,
            w: 18.9,
            h: 13.5,
        };
        let (dw, dh) = (7, 5);
        let out = resize(&src, sw, sh, 1, win, dw, dh);
        let oracle = area_oracle(&src, sw, sh, win, dw, dh);
        for (i, (&o, &e)) in out.iter().zip(&oracle).enumerate() {
            assert!((f64::from(o) - e).abs() <= 0.51, "pixel {i}: {o} vs {e}");
        }
    }

    #[test]
    fn channels_are_resampled_independently_and_constants_stay_constant() {
        let src: Vec<u8> = (0..10 * 10).flat_map(|_| [200u8, 100, 7]).collect();
        for (dw, dh) in [(3, 4), (10, 10), (25, 13)] {
            let out = resize(&src, 10, 10, 3, Window::full(10, 10), dw, dh);
            assert!(out.chunks(3).all(|p| p == [200, 100, 7]), "{dw}x{dh}");
        }
    }

    #[test]
    fn upscale_is_bilinear_between_neighbours() {
        // 2 px -> 4 px: centres at 0.25, 0.75 of the two source pixels.
        let out = resize(&[0, 200], 2, 1, 1, Window::full(2, 1), 4, 1);
        assert_eq!(out, vec![0, 50, 150, 200]);
    }

    #[test]
    fn nearest_keeps_mask_values() {
        let out = resize_nearest(&[0, 1, 1, 0], 2, 2, 4, 4);
        assert_eq!(out, vec![0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0]);
    }
}
