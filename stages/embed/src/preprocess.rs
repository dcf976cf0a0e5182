//! Tile pixels (RGB8, row-major) to the model's normalised NCHW input: resize to the model's
//! input size when the tiles were cut at another size, then `(p / 255 - mean) / std`.

use crate::error::{EmbedError, EmbedResult};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{ImageBuffer, Rgb};
use rayon::prelude::*;

/// ImageNet channel means, the normalisation torchvision's and most pathology models expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How pixels become model input: the side the model sees and the per-channel normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Side, in pixels, of the square images the model is fed.
    pub input_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The resampling filter of a model card's `Resize` (both antialiased when shrinking, like
/// PIL's and torchvision's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeFilter {
    /// Triangle / bilinear (torchvision's default).
    #[default]
    Bilinear,
    /// Cubic (a = -0.5, PIL's bicubic; timm's transforms for most ViTs).
    Bicubic,
}

/// How tiles become the model's input size, as a model card's transform does it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Resize {
    /// The resampling filter.
    pub filter: ResizeFilter,
    /// Centre crop: resize to `floor(input_size / crop)` first, then cut the central
    /// `input_size` square, as torchvision's `Resize(256)` + `CenterCrop(224)` (0.875, timm's
    /// `crop_pct`). `None`: resize straight to the input size (nothing happens to tiles of that
    /// size).
    pub crop: Option<f32>,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            input_size: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

impl Preprocess {
    /// A 256-entry table per channel mapping a byte to its normalised value, so the hot loop is
    /// a lookup instead of a division.
    fn lookup(&self) -> [[f32; 256]; 3] {
        let mut table = [[0f32; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            for (v, out) in row.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        table
    }

    /// Builds the `[B, 3, S, S]` f32 batch from square RGB8 tiles of side `px` each.
    pub fn to_tensor(&self, pixels: &[&[u8]], px: usize, device: &Device) -> EmbedResult<Tensor> {
        let images: Vec<(&[u8], usize)> = pixels.iter().map(|p| (*p, px)).collect();
        self.to_tensor_sized(&images, device)
    }

    /// Like [`Preprocess::to_tensor`], for tiles whose sides may differ from row to row.
    pub fn to_tensor_sized(
        &self,
        images: &[(&[u8], usize)],
        device: &Device,
    ) -> EmbedResult<Tensor> {
        self.to_tensor_resized(images, Resize::default(), device)
    }

    /// Like [`Preprocess::to_tensor_sized`], resizing (and cropping) as `resize` says.
    pub fn to_tensor_resized(
        &self,
        images: &[(&[u8], usize)],
        resize: Resize,
        device: &Device,
    ) -> EmbedResult<Tensor> {
        let s = self.input_size;
        let plane = s * s;
        let table = self.lookup();
        let mut data = vec![0f32; images.len() * 3 * plane];
        data.par_chunks_mut(3 * plane)
            .zip(images.par_iter())
            .enumerate()
            .try_for_each(|(row, (out, (bytes, px)))| -> EmbedResult<()> {
                let expected = px * px * 3;
                if *px == 0 || bytes.len() != expected {
                    return Err(EmbedError::Pixels {
                        row,
                        message: format!(
                            "{} bytes of pixels, expected {px} x {px} x 3 = {expected}",
                            bytes.len()
                        ),
                    });
                }
                let resized;
                let rgb: &[u8] = match resize.crop {
                    None if *px == s => bytes,
                    None => {
                        resized = resize_rgb_with(bytes, *px, s, resize.filter);
                        &resized
                    }
                    Some(crop) => {
                        let big = ((s as f64 / crop as f64).floor() as usize).max(s);
                        resized = if *px == big {
                            center_crop(bytes, big, s)
                        } else {
                            center_crop(&resize_rgb_with(bytes, *px, big, resize.filter), big, s)
                        };
                        &resized
                    }
                };
                let (r, rest) = out.split_at_mut(plane);
                let (g, b) = rest.split_at_mut(plane);
                for (i, px) in rgb.chunks_exact(3).enumerate() {
                    r[i] = table[0][px[0] as usize];
                    g[i] = table[1][px[1] as usize];
                    b[i] = table[2][px[2] as usize];
                }
                Ok(())
            })?;
        Ok(Tensor::from_vec(data, (images.len(), 3, s, s), device)?)
    }
}

/// Resizes a square RGB8 image with a triangle (bilinear) filter whose support widens when
/// shrinking, i.e. antialiased like PIL's and torchvision's `Resize`.
pub fn resize_rgb(bytes: &[u8], from: usize, to: usize) -> Vec<u8> {
    resize_rgb_with(bytes, from, to, ResizeFilter::Bilinear)
}

/// [`resize_rgb`] with the given filter.
pub fn resize_rgb_with(bytes: &[u8], from: usize, to: usize, filter: ResizeFilter) -> Vec<u8> {
    let Some(img) = ImageBuffer::<Rgb<u8>, &[u8]>::from_raw(from as u32, from as u32, bytes) else {
        return vec![0; to * to * 3];
    };
    let filter = match filter {
        ResizeFilter::Bilinear => FilterType::Triangle,
        ResizeFilter::Bicubic => FilterType::CatmullRom,
    };
    image::imageops::resize(&img, to as u32, to as u32, filter).into_raw()
}

/// The central `to x to` square of a `from x from` RGB8 image (torchvision's `CenterCrop`:
/// offset `round((from - to) / 2)`, Python's rounding).
fn center_crop(bytes: &[u8], from: usize, to: usize) -> Vec<u8> {
    let off = ((from - to) as f64 / 2.0).round_ties_even() as usize;
    let mut out = Vec::with_capacity(to * to * 3);
    for y in off..off + to {
        out.extend_from_slice(&bytes[(y * from + off) * 3..(y * from + off + to) * 3]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_each_channel_with_its_mean_and_std() {
        let pre = Preprocess {
            input_size: 2,
            mean: [0.5, 0.0, 1.0],
            std: [0.5, 1.0, 2.0],
        };
        let tile: Vec<u8> = [255u8, 0, 51].repeat(4);
        let t = pre.to_tensor(&[&tile], 2, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 2, 2]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..4 {
            assert!((v[i] - 1.0).abs() < 1e-6, "red: (1 - 0.5) / 0.5");
            assert!(v[4 + i].abs() < 1e-6, "green: 0");
            assert!(
                (v[8 + i] - (0.2 - 1.0) / 2.0).abs() < 1e-6,
                "blue: (0.2 - 1) / 2"
            );
        }
    }

    #[test]
    fn lays_out_rows_then_columns_per_channel() {
        let pre = Preprocess {
            input_size: 2,
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
        };
        // Pixel (row, col) has red = 10 * row + col.
        let mut tile = vec![0u8; 12];
        for r in 0..2 {
            for c in 0..2 {
                tile[(r * 2 + c) * 3] = (10 * r + c) as u8;
            }
        }
        let t = pre.to_tensor(&[&tile], 2, &Device::Cpu).unwrap();
        let red = t.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(red, vec![vec![0.0, 1.0], vec![10.0, 11.0]]);
    }

    #[test]
    fn resizes_tiles_of_another_size_and_keeps_flat_colour() {
        let pre = Preprocess {
            input_size: 4,
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
        };
        let tile: Vec<u8> = [200u8, 100, 50].repeat(8 * 8);
        let t = pre.to_tensor(&[&tile], 8, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 4, 4]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v[..16].iter().all(|x| (x - 200.0).abs() < 1e-3));
        assert!(v[32..].iter().all(|x| (x - 50.0).abs() < 1e-3));
    }

    #[test]
    fn centre_crop_resizes_up_then_cuts_the_middle() {
        let pre = Preprocess {
            input_size: 4,
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
        };
        // 0.5: resize the 4x4 tile to 8x8, keep rows and columns 2..6. A tile with a bright
        // centre 2x2 keeps it, twice as large, in the middle.
        let mut tile = vec![0u8; 4 * 4 * 3];
        for (y, x) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            tile[(y * 4 + x) * 3] = 200;
        }
        let resize = Resize {
            filter: ResizeFilter::Bicubic,
            crop: Some(0.5),
        };
        let t = pre
            .to_tensor_resized(&[(&tile, 4)], resize, &Device::Cpu)
            .unwrap();
        let red = t.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        assert!(red[1][1] > 150.0 && red[2][2] > 150.0, "{red:?}");
        assert!(red[0][0] < red[1][1] && red[3][3] < red[2][2], "{red:?}");
        assert_eq!(
            center_crop(&[1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4], 2, 1),
            vec![1, 1, 1]
        );
    }

    #[test]
    fn rejects_pixels_of_the_wrong_length_naming_the_row() {
        let pre = Preprocess::default();
        let good = vec![0u8; 224 * 224 * 3];
        let bad = vec![0u8; 10];
        let err = pre
            .to_tensor(&[&good, &bad], 224, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 1") && err.contains("10 bytes"), "{err}");
    }
}
