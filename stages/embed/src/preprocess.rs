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
                let rgb: &[u8] = if *px == s {
                    bytes
                } else {
                    resized = resize_rgb(bytes, *px, s);
                    &resized
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
    let Some(img) = ImageBuffer::<Rgb<u8>, &[u8]>::from_raw(from as u32, from as u32, bytes) else {
        return vec![0; to * to * 3];
    };
    image::imageops::resize(&img, to as u32, to as u32, FilterType::Triangle).into_raw()
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
