//! Tissue detection on a low-resolution overview, the CLAM/slideflow recipe: HSV saturation,
//! median blur, a threshold (Otsu's by default), morphological closing. Stained tissue is
//! saturated; glass, background and most pen-free artefacts are grey.

use serde::{Deserialize, Serialize};

/// A binary image: 1 for tissue, 0 for background.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Mask {
    /// Fraction of tissue pixels in the whole mask.
    pub fn coverage(&self) -> f64 {
        if self.data.is_empty() {
            return 0.0;
        }
        self.data.iter().filter(|&&v| v != 0).count() as f64 / self.data.len() as f64
    }

    /// Tissue fraction of the rectangle `[x0, x1) x [y0, y1)` given in (fractional) mask
    /// pixels, each mask pixel weighted by the area of it the rectangle covers.
    pub fn fraction(&self, x0: f64, y0: f64, x1: f64, y1: f64) -> f64 {
        let (x0, x1) = (x0.max(0.0), x1.min(self.width as f64));
        let (y0, y1) = (y0.max(0.0), y1.min(self.height as f64));
        if x1 <= x0 || y1 <= y0 {
            return 0.0;
        }
        let mut tissue = 0.0;
        let mut y = y0.floor() as usize;
        while (y as f64) < y1 && y < self.height {
            let wy = y1.min(y as f64 + 1.0) - y0.max(y as f64);
            let row = &self.data[y * self.width..(y + 1) * self.width];
            let mut x = x0.floor() as usize;
            let mut row_sum = 0.0;
            while (x as f64) < x1 && x < self.width {
                if row[x] != 0 {
                    row_sum += x1.min(x as f64 + 1.0) - x0.max(x as f64);
                }
                x += 1;
            }
            tissue += wy * row_sum;
            y += 1;
        }
        tissue / ((x1 - x0) * (y1 - y0))
    }
}

/// The detection recipe's knobs, in overview pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TissueParams {
    /// Level-0 pixels per pixel of the overview that tissue is detected on (CLAM segments at
    /// about 64x, slideflow at about 32x). Kernel sizes below are in overview pixels.
    pub downsample: f64,
    /// Side of the median blur applied to the saturation channel (odd; 1 disables it).
    pub median_kernel: u32,
    /// Fixed saturation threshold (0-255): tissue is saturation > threshold. Unset: Otsu's
    /// threshold of the blurred saturation histogram.
    pub threshold: Option<u8>,
    /// Lower bound on Otsu's threshold, so a blank slide (all low saturation) is not split in
    /// two "classes" of glass (CLAM's fixed default is 8).
    pub min_threshold: u8,
    /// Side of the square structuring element of the morphological closing that fills small
    /// holes and gaps in the mask (0 or 1 disables it; CLAM uses 4).
    pub close_kernel: u32,
}

impl Default for TissueParams {
    fn default() -> Self {
        TissueParams {
            downsample: 32.0,
            median_kernel: 7,
            threshold: None,
            min_threshold: 8,
            close_kernel: 4,
        }
    }
}

/// Runs the whole recipe on an RGB8 overview of `width x height`.
pub fn detect_tissue(rgb: &[u8], width: usize, height: usize, params: &TissueParams) -> Mask {
    let sat = saturation(rgb);
    let blurred = median_blur(&sat, width, height, params.median_kernel as usize);
    let threshold = match params.threshold {
        Some(t) => t,
        None => otsu_threshold(&histogram(&blurred)).max(params.min_threshold),
    };
    let binary: Vec<u8> = blurred.iter().map(|&s| u8::from(s > threshold)).collect();
    let data = close(&binary, width, height, params.close_kernel as usize);
    Mask {
        width,
        height,
        data,
    }
}

/// The S channel of HSV as OpenCV computes it for 8-bit images: `255 * (max - min) / max`.
pub fn saturation(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .map(|p| {
            let max = p[0].max(p[1]).max(p[2]);
            let min = p[0].min(p[1]).min(p[2]);
            if max == 0 {
                0
            } else {
                ((255 * u32::from(max - min) + u32::from(max) / 2) / u32::from(max)) as u8
            }
        })
        .collect()
}

/// 256-bin histogram of a single-channel image.
pub fn histogram(values: &[u8]) -> [u64; 256] {
    let mut h = [0u64; 256];
    for &v in values {
        h[v as usize] += 1;
    }
    h
}

/// Otsu's threshold: the `t` maximising the between-class variance of `{<= t}` and `{> t}`
/// (the first such `t` on ties, as OpenCV returns). 0 for an empty histogram.
pub fn otsu_threshold(hist: &[u64; 256]) -> u8 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let total_f = total as f64;
    let sum_all: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &c)| i as f64 * c as f64)
        .sum();
    let (mut w0, mut sum0) = (0.0f64, 0.0f64);
    let (mut best, mut best_t) = (-1.0f64, 0u8);
    for (t, &c) in hist.iter().enumerate() {
        w0 += c as f64;
        sum0 += t as f64 * c as f64;
        let w1 = total_f - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let m0 = sum0 / w0;
        let m1 = (sum_all - sum0) / w1;
        let between = w0 * w1 * (m0 - m1) * (m0 - m1);
        if between > best * (1.0 + 1e-12) {
            best = between;
            best_t = t as u8;
        }
    }
    best_t
}

/// Median filter with a `k x k` window (k odd; even k is rounded up), edges replicated like
/// OpenCV's `medianBlur`. Huang's running histogram: O(k) per pixel.
pub fn median_blur(src: &[u8], width: usize, height: usize, k: usize) -> Vec<u8> {
    if k <= 1 || width == 0 || height == 0 {
        return src.to_vec();
    }
    let r = (k / 2) as isize;
    let side = 2 * r as usize + 1;
    let rank = (side * side - 1) / 2;
    let at = |x: isize, y: isize| -> u8 {
        let xc = x.clamp(0, width as isize - 1) as usize;
        let yc = y.clamp(0, height as isize - 1) as usize;
        src[yc * width + xc]
    };
    let mut out = vec![0u8; width * height];
    for y in 0..height as isize {
        let mut hist = [0u32; 256];
        for dy in -r..=r {
            for dx in -r..=r {
                hist[at(dx, y + dy) as usize] += 1;
            }
        }
        // `below` counts window values < `median`.
        let (mut median, mut below) = (0usize, 0usize);
        for x in 0..width as isize {
            if x > 0 {
                for dy in -r..=r {
                    let old = at(x - r - 1, y + dy) as usize;
                    hist[old] -= 1;
                    if old < median {
                        below -= 1;
                    }
                    let new = at(x + r, y + dy) as usize;
                    hist[new] += 1;
                    if new < median {
                        below += 1;
                    }
                }
            }
            while below > rank {
                median -= 1;
                below -= hist[median] as usize;
            }
            while below + hist[median] as usize <= rank {
                below += hist[median] as usize;
                median += 1;
            }
            out[y as usize * width + x as usize] = median as u8;
        }
    }
    out
}

/// Morphological closing (dilation then erosion) of a 0/1 mask by a `k x k` square. The
/// outside of the overview counts as background, so tissue near the border is not smeared
/// up to it (OpenCV's default border would).
pub fn close(mask: &[u8], width: usize, height: usize, k: usize) -> Vec<u8> {
    if k <= 1 || width == 0 || height == 0 {
        return mask.to_vec();
    }
    // Work on a copy padded with background wider than the kernel's reach.
    let pad = k;
    let (pw, ph) = (width + 2 * pad, height + 2 * pad);
    let mut padded = vec![0u8; pw * ph];
    for y in 0..height {
        padded[(y + pad) * pw + pad..(y + pad) * pw + pad + width]
            .copy_from_slice(&mask[y * width..(y + 1) * width]);
    }
    // Offsets [-a, k - 1 - a] for dilation and the reflected set for erosion, so that the
    // closing is extensive and idempotent even for even k.
    let a = (k / 2) as isize;
    let (lo, hi) = (-a, k as isize - 1 - a);
    let dilated = rect_filter(&padded, pw, ph, lo, hi, true);
    let closed = rect_filter(&dilated, pw, ph, -hi, -lo, false);
    let mut out = Vec::with_capacity(width * height);
    for y in 0..height {
        out.extend_from_slice(&closed[(y + pad) * pw + pad..(y + pad) * pw + pad + width]);
    }
    out
}

/// Max (`dilate`) or min filter over offsets `[lo, hi]` on both axes, ignoring outside pixels.
fn rect_filter(
    src: &[u8],
    width: usize,
    height: usize,
    lo: isize,
    hi: isize,
    dilate: bool,
) -> Vec<u8> {
    let pass = |src: &[u8], len: usize, count: usize, stride_in: usize, stride_out: usize| {
        let mut out = vec![0u8; src.len()];
        for line in 0..count {
            for i in 0..len as isize {
                let from = (i + lo).max(0) as usize;
                let to = ((i + hi).min(len as isize - 1)) as usize;
                let mut v = if dilate { 0 } else { 1 };
                for j in from..=to {
                    let s = src[line * stride_out + j * stride_in];
                    v = if dilate { v.max(s) } else { v.min(s) };
                }
                out[line * stride_out + i as usize * stride_in] = v;
            }
        }
        out
    };
    let rows = pass(src, width, height, 1, width);
    pass(&rows, height, width, width, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_median(src: &[u8], w: usize, h: usize, k: usize) -> Vec<u8> {
        let r = (k / 2) as isize;
        let mut out = vec![0; w * h];
        for y in 0..h as isize {
            for x in 0..w as isize {
                let mut v = Vec::new();
                for dy in -r..=r {
                    for dx in -r..=r {
                        let xc = (x + dx).clamp(0, w as isize - 1) as usize;
                        let yc = (y + dy).clamp(0, h as isize - 1) as usize;
                        v.push(src[yc * w + xc]);
                    }
                }
                v.sort_unstable();
                out[y as usize * w + x as usize] = v[v.len() / 2];
            }
        }
        out
    }

    fn mask_from(rows: &[&str]) -> (Vec<u8>, usize, usize) {
        let w = rows[0].len();
        let data = rows
            .iter()
            .flat_map(|r| r.bytes().map(|b| u8::from(b == b'#')))
            .collect();
        (data, w, rows.len())
    }

    #[test]
    fn otsu_on_a_hand_computed_histogram() {
        // Values 0 (x3), 1 (x1), 5 (x1), 6 (x3): between-class variance
        // t=0: 3*5*(0-4.8)^2=345.6; t=1: 4*4*(0.25-5.75)^2=484; t=2..4 the same; t=5: 5*3*(1.2-6)^2=345.6.
        let mut h = [0u64; 256];
        h[0] = 3;
        h[1] = 1;
        h[5] = 1;
        h[6] = 3;
        assert_eq!(otsu_threshold(&h), 1);
    }

    #[test]
    fn otsu_separates_two_clusters_and_handles_degenerate_histograms() {
        let mut h = [0u64; 256];
        h[10..20].fill(50);
        h[150..170].fill(30);
        let t = otsu_threshold(&h);
        assert!((19..150).contains(&t), "{t}");
        let mut one = [0u64; 256];
        one[42] = 10;
        assert_eq!(otsu_threshold(&one), 0);
        assert_eq!(otsu_threshold(&[0; 256]), 0);
    }

    #[test]
    fn saturation_matches_opencv() {
        // Grey has none, pure colours are fully saturated, (200, 100, 50): 255*150/200 = 191.25.
        assert_eq!(
            saturation(&[128, 128, 128, 255, 0, 0, 200, 100, 50, 0, 0, 0]),
            vec![0, 255, 191, 0]
        );
    }

    #[test]
    fn median_blur_removes_salt_and_matches_the_definition() {
        let (w, h) = (6, 5);
        let mut src = vec![10u8; w * h];
        src[2 * w + 3] = 255; // isolated salt
        let out = median_blur(&src, w, h, 3);
        assert!(out.iter().all(|&v| v == 10));
        // Against the direct definition on a varied image, odd and even kernels.
        let img: Vec<u8> = (0..17 * 11)
            .map(|i| ((i * 97 + i / 17 * 31) % 256) as u8)
            .collect();
        for k in [3, 5, 7] {
            assert_eq!(
                median_blur(&img, 17, 11, k),
                naive_median(&img, 17, 11, k),
                "k={k}"
            );
        }
        assert_eq!(median_blur(&img, 17, 11, 4), naive_median(&img, 17, 11, 5));
    }

    #[test]
    fn closing_fills_gaps_and_holes_and_keeps_shapes() {
        let (src, w, h) = mask_from(&[
            "..........",
            ".####.###.",
            ".####.###.",
            ".##.#.###.",
            ".####.###.",
            "..........",
        ]);
        let out = close(&src, w, h, 3);
        let (want, _, _) = mask_from(&[
            "..........",
            ".########.",
            ".########.",
            ".########.",
            ".########.",
            "..........",
        ]);
        assert_eq!(out, want);
        // Extensive: never removes tissue; idempotent.
        assert!(src.iter().zip(&out).all(|(&s, &o)| o >= s));
        assert_eq!(close(&out, w, h, 3), out);
        // Gaps wider than the kernel stay open.
        let (far, w2, h2) = mask_from(&["##....##", "##....##"]);
        assert_eq!(close(&far, w2, h2, 3), far);
        // Even kernels close a 3-px gap at k=4 but not at k=3.
        let (gap3, w3, h3) = mask_from(&["##...##", "##...##"]);
        assert_eq!(close(&gap3, w3, h3, 3), gap3);
        assert!(close(&gap3, w3, h3, 4).iter().all(|&v| v == 1));
    }

    #[test]
    fn fraction_weights_partially_covered_pixels() {
        let (m, w, h) = mask_from(&["##..", "##..", "....", "...."]);
        let mask = Mask {
            width: w,
            height: h,
            data: m,
        };
        assert_eq!(mask.fraction(0.0, 0.0, 2.0, 2.0), 1.0);
        assert_eq!(mask.fraction(0.0, 0.0, 4.0, 4.0), 0.25);
        assert!((mask.fraction(1.5, 0.0, 2.5, 1.0) - 0.5).abs() < 1e-12);
        assert_eq!(mask.fraction(2.0, 2.0, 9.0, 9.0), 0.0);
        assert_eq!(mask.coverage(), 0.25);
    }

    #[test]
    fn detection_finds_a_stained_square_on_glass() {
        let (w, h) = (40, 30);
        let mut rgb = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                let inside = (10..30).contains(&x) && (8..22).contains(&y);
                let p = if inside {
                    [180, 80, 160]
                } else {
                    [235, 233, 236]
                };
                rgb[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&p);
            }
        }
        let mask = detect_tissue(&rgb, w, h, &TissueParams::default());
        assert_eq!(mask.fraction(11.0, 9.0, 29.0, 21.0), 1.0);
        assert_eq!(mask.fraction(0.0, 0.0, 8.0, 30.0), 0.0);
        // A blank slide stays blank thanks to the Otsu floor.
        let blank: Vec<u8> = (0..w * h)
            .flat_map(|i| [230 + (i % 5) as u8, 232, 231])
            .collect();
        assert_eq!(
            detect_tissue(&blank, w, h, &TissueParams::default()).coverage(),
            0.0
        );
    }
}
