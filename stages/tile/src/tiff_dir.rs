//! A minimal TIFF / BigTIFF directory reader: just the tags the direct JPEG tile reader needs
//! (geometry, compression, colour model, tile offsets and byte counts, shared JPEG tables).
//! OpenSlide still opens every slide; this only lets tessera fetch compressed tiles itself.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Directories beyond this count are not read (a pyramid has a handful).
const MAX_DIRECTORIES: usize = 1024;
/// Entries beyond this count in one directory mean a corrupt file.
const MAX_ENTRIES: u64 = 4096;
/// Tile arrays larger than this (entries) are refused rather than allocated.
const MAX_TILES: u64 = 1 << 26;

const TAG_IMAGE_WIDTH: u16 = 256;
const TAG_IMAGE_LENGTH: u16 = 257;
const TAG_BITS_PER_SAMPLE: u16 = 258;
const TAG_COMPRESSION: u16 = 259;
const TAG_PHOTOMETRIC: u16 = 262;
const TAG_SAMPLES_PER_PIXEL: u16 = 277;
const TAG_PLANAR_CONFIG: u16 = 284;
const TAG_TILE_WIDTH: u16 = 322;
const TAG_TILE_LENGTH: u16 = 323;
const TAG_TILE_OFFSETS: u16 = 324;
const TAG_TILE_BYTE_COUNTS: u16 = 325;
const TAG_JPEG_TABLES: u16 = 347;

/// Why a file's directories could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TiffDirError {
    #[error("reading the TIFF structure: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a TIFF file")]
    NotTiff,
    #[error("malformed TIFF directory: {0}")]
    Malformed(String),
}

/// One image file directory, reduced to what tile reading needs. Fields the file lacks hold
/// TIFF's defaults (or 0 / empty where there is none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Directory {
    pub width: u64,
    pub height: u64,
    /// 0 for stripped (untiled) images.
    pub tile_width: u64,
    pub tile_height: u64,
    pub compression: u64,
    pub photometric: u64,
    pub samples_per_pixel: u64,
    /// First value of BitsPerSample.
    pub bits_per_sample: u64,
    pub planar_config: u64,
    pub tile_offsets: Vec<u64>,
    pub tile_byte_counts: Vec<u64>,
    /// The JPEGTables tag: an abbreviated JPEG stream (SOI, tables, EOI) shared by all tiles.
    pub jpeg_tables: Option<Vec<u8>>,
}

impl Directory {
    /// Whether the image is stored in tiles (OpenSlide's pyramid levels are the tiled ones).
    pub fn is_tiled(&self) -> bool {
        self.tile_width > 0 && self.tile_height > 0
    }
}

/// Byte order and offset width of a file.
#[derive(Debug, Clone, Copy)]
struct Layout {
    little: bool,
    big: bool,
}

impl Layout {
    fn u16(&self, b: &[u8]) -> u16 {
        let a = [b[0], b[1]];
        if self.little {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        }
    }
    fn u32(&self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.little {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    }
    fn u64(&self, b: &[u8]) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        if self.little {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    }
    /// Size of an offset / inline value field.
    fn word(&self) -> usize {
        if self.big {
            8
        } else {
            4
        }
    }
    fn offset(&self, b: &[u8]) -> u64 {
        if self.big {
            self.u64(b)
        } else {
            u64::from(self.u32(b))
        }
    }
}

/// Bytes per value of a TIFF field type, or None for types tessera never reads.
fn type_size(field_type: u16) -> Option<u64> {
    match field_type {
        1 | 2 | 6 | 7 => Some(1),
        3 | 8 => Some(2),
        4 | 9 | 11 | 13 => Some(4),
        5 | 10 | 12 | 16 | 17 | 18 => Some(8),
        _ => None,
    }
}

/// Reads every directory of the main IFD chain, in file order.
pub fn read_directories(file: &File) -> Result<Vec<Directory>, TiffDirError> {
    let mut header = [0u8; 16];
    file.read_exact_at(&mut header[..8], 0)?;
    let little = match &header[..2] {
        b"II" => true,
        b"MM" => false,
        _ => return Err(TiffDirError::NotTiff),
    };
    let probe = Layout { little, big: false };
    let (layout, first) = match probe.u16(&header[2..4]) {
        42 => (probe, u64::from(probe.u32(&header[4..8]))),
        43 => {
            file.read_exact_at(&mut header[8..16], 8)?;
            let layout = Layout { little, big: true };
            if layout.u16(&header[4..6]) != 8 {
                return Err(TiffDirError::Malformed(
                    "BigTIFF offset size is not 8".into(),
                ));
            }
            (layout, layout.u64(&header[8..16]))
        }
        _ => return Err(TiffDirError::NotTiff),
    };
    let file_len = file.metadata()?.len();
    let mut directories = Vec::new();
    let mut seen = HashSet::new();
    let mut next = first;
    while next != 0 {
        if !seen.insert(next) || directories.len() >= MAX_DIRECTORIES {
            return Err(TiffDirError::Malformed("directory chain loops".into()));
        }
        let (dir, following) = read_directory(file, file_len, layout, next)?;
        directories.push(dir);
        next = following;
    }
    Ok(directories)
}

/// Reads the directory at `at`; returns it and the offset of the next one (0 at the end).
fn read_directory(
    file: &File,
    file_len: u64,
    layout: Layout,
    at: u64,
) -> Result<(Directory, u64), TiffDirError> {
    let word = layout.word();
    let (count_size, entry_size) = if layout.big { (8, 20) } else { (2, 12) };
    let mut count_bytes = [0u8; 8];
    file.read_exact_at(&mut count_bytes[..count_size], at)?;
    let count = if layout.big {
        layout.u64(&count_bytes)
    } else {
        u64::from(layout.u16(&count_bytes))
    };
    if count > MAX_ENTRIES {
        return Err(TiffDirError::Malformed(format!(
            "{count} entries in the directory at {at}"
        )));
    }
    let mut block = vec![0u8; count as usize * entry_size + word];
    file.read_exact_at(&mut block, at + count_size as u64)?;
    let mut dir = Directory {
        compression: 1,
        photometric: u64::MAX,
        samples_per_pixel: 1,
        bits_per_sample: 1,
        planar_config: 1,
        ..Directory::default()
    };
    for entry in block[..count as usize * entry_size].chunks_exact(entry_size) {
        let tag = layout.u16(&entry[0..2]);
        let field_type = layout.u16(&entry[2..4]);
        let n = if layout.big {
            layout.u64(&entry[4..12])
        } else {
            u64::from(layout.u32(&entry[4..8]))
        };
        let value_field = &entry[entry_size - word..];
        let wanted = matches!(
            tag,
            TAG_IMAGE_WIDTH
                | TAG_IMAGE_LENGTH
                | TAG_BITS_PER_SAMPLE
                | TAG_COMPRESSION
                | TAG_PHOTOMETRIC
                | TAG_SAMPLES_PER_PIXEL
                | TAG_PLANAR_CONFIG
                | TAG_TILE_WIDTH
                | TAG_TILE_LENGTH
                | TAG_TILE_OFFSETS
                | TAG_TILE_BYTE_COUNTS
                | TAG_JPEG_TABLES
        );
        if !wanted {
            continue;
        }
        let size = type_size(field_type).ok_or_else(|| {
            TiffDirError::Malformed(format!("tag {tag} has unknown type {field_type}"))
        })?;
        let total = n.saturating_mul(size);
        if n > MAX_TILES || total > file_len {
            return Err(TiffDirError::Malformed(format!("tag {tag} has {n} values")));
        }
        let bytes = if total <= word as u64 {
            value_field[..total as usize].to_vec()
        } else {
            let mut data = vec![0u8; total as usize];
            file.read_exact_at(&mut data, layout.offset(value_field))?;
            data
        };
        if tag == TAG_JPEG_TABLES {
            dir.jpeg_tables = Some(bytes);
            continue;
        }
        let values: Vec<u64> = bytes
            .chunks_exact(size as usize)
            .map(|v| match size {
                1 => u64::from(v[0]),
                2 => u64::from(layout.u16(v)),
                4 => u64::from(layout.u32(v)),
                _ => layout.u64(v),
            })
            .collect();
        let first = values.first().copied().unwrap_or(0);
        match tag {
            TAG_IMAGE_WIDTH => dir.width = first,
            TAG_IMAGE_LENGTH => dir.height = first,
            TAG_BITS_PER_SAMPLE => dir.bits_per_sample = first,
            TAG_COMPRESSION => dir.compression = first,
            TAG_PHOTOMETRIC => dir.photometric = first,
            TAG_SAMPLES_PER_PIXEL => dir.samples_per_pixel = first,
            TAG_PLANAR_CONFIG => dir.planar_config = first,
            TAG_TILE_WIDTH => dir.tile_width = first,
            TAG_TILE_LENGTH => dir.tile_height = first,
            TAG_TILE_OFFSETS => dir.tile_offsets = values,
            TAG_TILE_BYTE_COUNTS => dir.tile_byte_counts = values,
            _ => {}
        }
    }
    let next = layout.offset(&block[count as usize * entry_size..]);
    Ok((dir, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::slide_path;

    #[test]
    fn aperio_svs_directories_hold_jpeg_tiles_and_a_stripped_thumbnail() {
        let file = File::open(slide_path("CMU-1-Small-Region.svs")).unwrap();
        let dirs = read_directories(&file).unwrap();
        assert!(dirs.len() >= 2, "{dirs:?}");
        let level0 = &dirs[0];
        assert_eq!((level0.width, level0.height), (2220, 2967));
        assert_eq!((level0.tile_width, level0.tile_height), (240, 240));
        assert_eq!(level0.compression, 7);
        let tiles = 10 * 13; // ceil(2220 / 240) x ceil(2967 / 240)
        assert_eq!(level0.tile_offsets.len(), tiles);
        assert_eq!(level0.tile_byte_counts.len(), tiles);
        // The thumbnail is stripped: not a pyramid level for OpenSlide.
        assert!(!dirs[1].is_tiled());
    }

    #[test]
    fn directories_pointing_past_the_end_are_errors_not_allocations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tif");
        // Classic little-endian header whose first directory lies beyond the file.
        std::fs::write(&path, b"II*\0\xe8\x03\0\0").unwrap();
        let err = read_directories(&File::open(&path).unwrap()).unwrap_err();
        assert!(matches!(err, TiffDirError::Io(_)), "{err}");
        // One entry (tile offsets) claiming 2^20 LONGs stored past the end of the file.
        let mut bytes = b"II*\0\x08\0\0\0".to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&324u16.to_le_bytes());
        bytes.extend_from_slice(&4u16.to_le_bytes());
        bytes.extend_from_slice(&(1u32 << 20).to_le_bytes());
        bytes.extend_from_slice(&64u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = read_directories(&File::open(&path).unwrap()).unwrap_err();
        assert!(matches!(err, TiffDirError::Malformed(_)), "{err}");
    }

    #[test]
    fn non_tiff_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tif");
        std::fs::write(&path, b"PK\x03\x04 not a tiff at all").unwrap();
        let err = read_directories(&File::open(&path).unwrap()).unwrap_err();
        assert!(matches!(err, TiffDirError::NotTiff), "{err}");
    }
}
