//! JPEG decoding with libjpeg-turbo's TurboJPEG API (Debian `libturbojpeg0-dev`), bound
//! directly: the five functions of the 2.x API tessera needs. It is the same libjpeg-turbo
//! code OpenSlide decodes with (through libtiff), with the same defaults (accurate integer
//! IDCT, fancy upsampling), so pixels match OpenSlide's, only without its per-tile overhead.

use std::ffi::{c_char, c_int, c_uchar, c_ulong, c_void, CStr};

type TjHandle = *mut c_void;

#[link(name = "turbojpeg")]
extern "C" {
    fn tjInitDecompress() -> TjHandle;
    fn tjDestroy(handle: TjHandle) -> c_int;
    fn tjGetErrorStr2(handle: TjHandle) -> *mut c_char;
    fn tjDecompressHeader3(
        handle: TjHandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        width: *mut c_int,
        height: *mut c_int,
        jpeg_subsamp: *mut c_int,
        jpeg_colorspace: *mut c_int,
    ) -> c_int;
    fn tjDecompress2(
        handle: TjHandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        dst_buf: *mut c_uchar,
        width: c_int,
        pitch: c_int,
        height: c_int,
        pixel_format: c_int,
        flags: c_int,
    ) -> c_int;
}

/// TJPF_RGB: 3 bytes per pixel, R first.
const PIXEL_FORMAT_RGB: c_int = 0;

/// The colour space a JPEG stream declares (TurboJPEG's TJCS_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JpegColorspace {
    Rgb,
    YCbCr,
    Other(i32),
}

/// What a JPEG stream's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegHeader {
    pub width: u32,
    pub height: u32,
    pub colorspace: JpegColorspace,
}

/// A TurboJPEG decompressor: one per reading thread (it is not thread-safe).
#[derive(Debug)]
pub struct JpegDecoder {
    handle: TjHandle,
}

// SAFETY: the handle is owned exclusively by this value; TurboJPEG handles may move between
// threads as long as one thread uses them at a time, which `&mut self` guarantees.
unsafe impl Send for JpegDecoder {}

impl JpegDecoder {
    /// A new decompressor, or None when libturbojpeg cannot allocate one.
    pub fn new() -> Option<Self> {
        // SAFETY: plain constructor call; a null result is handled.
        let handle = unsafe { tjInitDecompress() };
        (!handle.is_null()).then_some(JpegDecoder { handle })
    }

    fn error(&self) -> String {
        // SAFETY: tjGetErrorStr2 returns a NUL-terminated string owned by the handle (or a
        // static one), valid until the next call on it; we copy it at once.
        unsafe {
            let s = tjGetErrorStr2(self.handle);
            if s.is_null() {
                "unknown TurboJPEG error".into()
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        }
    }

    /// Parses the stream's frame header.
    pub fn header(&mut self, jpeg: &[u8]) -> Result<JpegHeader, String> {
        let (mut w, mut h, mut sub, mut cs) = (0, 0, 0, 0);
        // SAFETY: the buffer pointer and length come from a live slice; the outputs are
        // local integers.
        let rc = unsafe {
            tjDecompressHeader3(
                self.handle,
                jpeg.as_ptr(),
                jpeg.len() as c_ulong,
                &mut w,
                &mut h,
                &mut sub,
                &mut cs,
            )
        };
        if rc != 0 {
            return Err(self.error());
        }
        Ok(JpegHeader {
            width: u32::try_from(w).map_err(|_| format!("bad JPEG width {w}"))?,
            height: u32::try_from(h).map_err(|_| format!("bad JPEG height {h}"))?,
            colorspace: match cs {
                0 => JpegColorspace::Rgb,
                1 => JpegColorspace::YCbCr,
                other => JpegColorspace::Other(other),
            },
        })
    }

    /// Decodes a `width x height` stream (checked against its header by the caller) as RGB8
    /// into `dst`, starting at byte `offset`, one row every `pitch` bytes.
    pub fn decode_rgb(
        &mut self,
        jpeg: &[u8],
        width: u32,
        height: u32,
        dst: &mut [u8],
        offset: usize,
        pitch: usize,
    ) -> Result<(), String> {
        let row = width as usize * 3;
        if width == 0 || height == 0 || pitch < row {
            return Err(format!(
                "bad decode geometry {width}x{height}, pitch {pitch}"
            ));
        }
        let end = offset + (height as usize - 1) * pitch + row;
        if end > dst.len() {
            return Err(format!(
                "decode target too small: needs {end} bytes, has {}",
                dst.len()
            ));
        }
        let (w, h, p) = (
            c_int::try_from(width).map_err(|e| e.to_string())?,
            c_int::try_from(height).map_err(|e| e.to_string())?,
            c_int::try_from(pitch).map_err(|e| e.to_string())?,
        );
        // SAFETY: `end <= dst.len()` was checked above, so TurboJPEG's writes (height rows of
        // width * 3 bytes, pitch apart, from `offset`) stay inside `dst`. The caller checked
        // that the stream's own size equals width x height, so TurboJPEG does not scale.
        let rc = unsafe {
            tjDecompress2(
                self.handle,
                jpeg.as_ptr(),
                jpeg.len() as c_ulong,
                dst.as_mut_ptr().add(offset),
                w,
                p,
                h,
                PIXEL_FORMAT_RGB,
                0,
            )
        };
        if rc != 0 {
            return Err(self.error());
        }
        Ok(())
    }
}

impl Drop for JpegDecoder {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitDecompress and is destroyed once.
        unsafe {
            tjDestroy(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_jpeg_made_by_the_image_crate() {
        // A 16x8 picture: left half red, right half blue, encoded at high quality.
        let mut rgb = Vec::new();
        for _y in 0..8 {
            for x in 0..16 {
                rgb.extend_from_slice(if x < 8 {
                    &[250, 10, 10]
                } else {
                    &[10, 10, 250]
                });
            }
        }
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 100)
            .encode(&rgb, 16, 8, image::ExtendedColorType::Rgb8)
            .unwrap();
        let mut dec = JpegDecoder::new().unwrap();
        let h = dec.header(&jpeg).unwrap();
        assert_eq!((h.width, h.height), (16, 8));
        // Decode into the middle of a wider canvas.
        let pitch = 20 * 3;
        let mut canvas = vec![0u8; pitch * 8];
        dec.decode_rgb(&jpeg, 16, 8, &mut canvas, 6, pitch).unwrap();
        assert_eq!(&canvas[..6], &[0; 6], "left margin untouched");
        let px = |x: usize, y: usize| &canvas[y * pitch + 6 + x * 3..][..3];
        assert!(px(2, 3)[0] > 200 && px(2, 3)[2] < 60, "{:?}", px(2, 3));
        assert!(px(13, 3)[2] > 200 && px(13, 3)[0] < 60, "{:?}", px(13, 3));
        assert!(dec
            .decode_rgb(&jpeg, 16, 8, &mut canvas, 60, pitch)
            .is_err());
        // A truncated stream is an error (libjpeg's warnings count as errors), never pixels.
        assert!(dec
            .decode_rgb(&jpeg[..jpeg.len() / 2], 16, 8, &mut canvas, 0, pitch)
            .is_err());
    }
}
