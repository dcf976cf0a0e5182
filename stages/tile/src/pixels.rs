//! OpenSlide hands out premultiplied ARGB (one native-endian `u32` per pixel); every consumer
//! downstream wants plain RGB8. This conversion runs once per decoded pixel, so it is the
//! hot loop of tiling and is written to stay branch-light on the common opaque case.

/// Converts premultiplied ARGB pixels (native-endian `u32`, as `openslide_read_region` writes
/// them) into RGB8, compositing transparent areas over `background` (the slide's
/// `openslide.background-color`, white by default) so that areas outside the scan look like
/// glass, not black.
pub fn argb_to_rgb(argb: &[u8], background: [u8; 3], out: &mut Vec<u8>) {
    let pixels = argb.len() / 4;
    out.clear();
    out.resize(pixels * 3, 0);
    for (px, dst) in argb.chunks_exact(4).zip(out.chunks_exact_mut(3)) {
        let v = u32::from_ne_bytes([px[0], px[1], px[2], px[3]]);
        let a = v >> 24;
        let (r, g, b) = ((v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff);
        if a == 255 {
            dst.copy_from_slice(&[r as u8, g as u8, b as u8]);
        } else {
            // Premultiplied "over": c + bg * (1 - a).
            let inv = 255 - a;
            let over =
                |c: u32, bg: u8| -> u8 { (c + (u32::from(bg) * inv + 127) / 255).min(255) as u8 };
            dst.copy_from_slice(&[
                over(r, background[0]),
                over(g, background[1]),
                over(b, background[2]),
            ]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argb(a: u8, r: u8, g: u8, b: u8) -> [u8; 4] {
        (u32::from(a) << 24 | u32::from(r) << 16 | u32::from(g) << 8 | u32::from(b)).to_ne_bytes()
    }

    #[test]
    fn opaque_pixels_keep_their_colour() {
        let mut input = Vec::new();
        input.extend_from_slice(&argb(255, 10, 20, 30));
        input.extend_from_slice(&argb(255, 255, 0, 128));
        let mut out = Vec::new();
        argb_to_rgb(&input, [255, 255, 255], &mut out);
        assert_eq!(out, vec![10, 20, 30, 255, 0, 128]);
    }

    #[test]
    fn transparent_pixels_take_the_background_and_half_alpha_blends() {
        let mut input = Vec::new();
        input.extend_from_slice(&argb(0, 0, 0, 0));
        // 50% alpha red, premultiplied: r = 128.
        input.extend_from_slice(&argb(128, 128, 0, 0));
        let mut out = Vec::new();
        argb_to_rgb(&input, [240, 230, 220], &mut out);
        assert_eq!(&out[..3], &[240, 230, 220]);
        // 128 + 240 * 127 / 255 = 128 + 119.5 -> 247/248; green 0 + 230 * 127/255 = 114.5.
        assert!((247..=248).contains(&out[3]), "{}", out[3]);
        assert!((114..=115).contains(&out[4]), "{}", out[4]);
        assert!((109..=110).contains(&out[5]), "{}", out[5]);
    }
}
