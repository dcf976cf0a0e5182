//! Per-tile image statistics on RGB8 row-major pixels, as the `pixels` column carries them.

/// Luma of one RGB pixel (ITU-R BT.601 weights), 0 to 255.
fn luma(px: &[u8]) -> f32 {
    0.299 * px[0] as f32 + 0.587 * px[1] as f32 + 0.114 * px[2] as f32
}

/// Mean luma of an RGB8 image, 0 (black) to 255 (white); 0 for an empty image.
pub fn mean_luma(rgb: &[u8]) -> f32 {
    let n = rgb.len() / 3;
    if n == 0 {
        return 0.0;
    }
    let sum: f64 = rgb.chunks_exact(3).map(|px| luma(px) as f64).sum();
    (sum / n as f64) as f32
}

/// Variance of the 4-neighbour Laplacian of luma over the interior pixels of a `side x side`
/// RGB8 image: the classic focus measure (blurry images have little high-frequency energy).
/// 0 for images smaller than 3 x 3.
pub fn laplacian_variance(rgb: &[u8], side: usize) -> f32 {
    if side < 3 || rgb.len() < side * side * 3 {
        return 0.0;
    }
    let gray: Vec<f32> = rgb.chunks_exact(3).take(side * side).map(luma).collect();
    let (mut sum, mut sum_sq, mut n) = (0f64, 0f64, 0f64);
    for y in 1..side - 1 {
        for x in 1..side - 1 {
            let i = y * side + x;
            let lap = (gray[i - 1] + gray[i + 1] + gray[i - side] + gray[i + side] - 4.0 * gray[i])
                as f64;
            sum += lap;
            sum_sq += lap * lap;
            n += 1.0;
        }
    }
    let mean = sum / n;
    (sum_sq / n - mean * mean).max(0.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray_image(side: usize, f: impl Fn(usize, usize) -> u8) -> Vec<u8> {
        (0..side * side)
            .flat_map(|i| [f(i / side, i % side); 3])
            .collect()
    }

    #[test]
    fn mean_luma_of_known_colours() {
        assert_eq!(mean_luma(&gray_image(4, |_, _| 0)), 0.0);
        assert!((mean_luma(&gray_image(4, |_, _| 255)) - 255.0).abs() < 1e-3);
        // pure red, green, blue: their weights times 255
        assert!((mean_luma(&[255, 0, 0]) - 0.299 * 255.0).abs() < 1e-3);
        assert!((mean_luma(&[0, 255, 0, 0, 0, 255]) - (0.587 + 0.114) * 255.0 / 2.0).abs() < 1e-3);
    }

    #[test]
    fn laplacian_variance_is_zero_on_flat_and_ramps_and_known_on_a_checkerboard() {
        assert_eq!(laplacian_variance(&gray_image(6, |_, _| 120), 6), 0.0);
        // a linear ramp has zero Laplacian everywhere
        assert!(laplacian_variance(&gray_image(6, |y, x| (10 * x + 5 * y) as u8), 6) < 1e-6);
        // a 0/255 checkerboard: the Laplacian alternates between -1020 and +1020
        let checker = gray_image(6, |y, x| if (x + y).is_multiple_of(2) { 0 } else { 255 });
        let v = laplacian_variance(&checker, 6);
        assert!(
            (v - 1020.0 * 1020.0).abs() / (1020.0 * 1020.0) < 1e-4,
            "{v}"
        );
        assert_eq!(laplacian_variance(&[0; 12], 2), 0.0);
    }
}
