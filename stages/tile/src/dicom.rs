//! DICOM WSI slides (OpenSlide 4). A DICOM slide is a series of instances — one file per
//! pyramid level, plus label and overview images — usually delivered as one folder. The
//! dataset CSV may name that folder or any instance file of it; OpenSlide opens one file and
//! finds the rest of the series next to it by itself.
//!
//! OpenSlide is lenient with a broken series: an instance that is missing or whose header is
//! cut off is silently left out (a missing level 0 makes the next level "level 0", with other
//! coordinates and mpp), and a file truncated inside its pixel data opens fine and fails on
//! the first tile read from its end. Tiling such a slide would give wrong tiles or fail
//! halfway, so the checks here refuse it up front with the instance and the reason.

use crate::error::{TileError, TileResult};
use crate::library::{openslide_reads_dicom, openslide_version};
use openslide_rs::OpenSlide;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A DICOM Part 10 file: a 128-byte preamble, then these four bytes.
const MAGIC_OFFSET: usize = 128;
const MAGIC: &[u8; 4] = b"DICM";

/// The media directory of a DICOM file set: DICOM, but not an image of the slide.
const DICOMDIR: &str = "DICOMDIR";

/// OpenSlide's property naming the series of the slide it opened.
const SERIES_PROPERTY: &str = "dicom.SeriesInstanceUID";

/// Whether `path` is a file that starts like DICOM (preamble and `DICM`).
pub fn is_dicom_file(path: &Path) -> bool {
    let mut head = [0u8; MAGIC_OFFSET + 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[MAGIC_OFFSET..] == MAGIC
}

/// Whether the slide at `path` is DICOM: a folder (it holds DICOM instances or nothing a slide
/// reader knows) or a DICOM file.
pub fn is_dicom_slide(path: &Path) -> bool {
    path.is_dir() || is_dicom_file(path)
}

fn has_dcm_extension(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("dcm"))
}

fn dicom_error(path: &Path, message: impl Into<String>) -> TileError {
    TileError::Dicom {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The DICOM instances in `folder`, sorted by file name: every file starting with the DICOM
/// signature (files without an extension included, as PACS exports write them), DICOMDIR
/// left out. A `.dcm` file without the signature is an error (cut off before its header
/// ended, or not DICOM at all), named, since OpenSlide would silently leave it out.
pub fn instances(folder: &Path) -> TileResult<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(folder).map_err(|e| dicom_error(folder, format!("cannot list: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| dicom_error(folder, format!("cannot list: {e}")))?;
        let path = entry.path();
        if !path.is_file() || entry.file_name() == DICOMDIR {
            continue;
        }
        if is_dicom_file(&path) {
            files.push(path);
        } else if has_dcm_extension(&path) {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            return Err(dicom_error(
                folder,
                format!(
                    "instance {} ({size} bytes) is not DICOM: it has no DICM signature after the \
                     128-byte preamble (truncated, or not a DICOM file)",
                    file_name(&path)
                ),
            ));
        }
    }
    files.sort();
    Ok(files)
}

/// The file OpenSlide opens for the slide at `path`: `path` itself, or for a folder its first
/// DICOM instance (OpenSlide opens files, and finds the rest of the series from any one).
pub fn openable_path(path: &Path) -> TileResult<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    instances(path)?.into_iter().next().ok_or_else(|| {
        dicom_error(
            path,
            "the folder holds no DICOM instance (a slide folder must hold the .dcm files of one \
             DICOM WSI series)",
        )
    })
}

/// The reason OpenSlide `version` fails to open a DICOM slide, when it is too old to read
/// DICOM at all; `None` when the failure has another cause.
pub fn unsupported_reason(path: &Path) -> Option<String> {
    (!openslide_reads_dicom() && is_dicom_slide(path)).then(|| {
        format!(
            "DICOM slides need OpenSlide 4 or later, and this tessera runs on OpenSlide {}; \
             install OpenSlide 4 with `scripts/setup.sh` and rebuild (README: OpenSlide)",
            openslide_version()
        )
    })
}

/// Refuses a series whose level 0 is missing: OpenSlide would take the largest instance
/// present as level 0, and a DICOM level made by downsampling says so in its image type
/// (`RESAMPLED`). `image_type` is level 0's `ImageType` values, `size` its width and height.
pub fn check_level_zero(path: &Path, image_type: &[String], size: (u64, u64)) -> TileResult<()> {
    if image_type.iter().any(|v| v.trim() == "RESAMPLED") {
        return Err(dicom_error(
            path,
            format!(
                "level 0 is missing: the largest instance of the series ({}x{} px, image type {}) \
                 is a downsampled level; the full-resolution instance is absent from the folder \
                 or unreadable",
                size.0,
                size.1,
                image_type.join("\\")
            ),
        ));
    }
    Ok(())
}

/// Checks that every DICOM instance next to the slide opens in OpenSlide and, when the slide
/// was named by its folder, that the folder holds one series only (`series`: the series
/// OpenSlide opened). An instance that does not open (a header cut off) is named.
pub fn check_instances(path: &Path, series: Option<&str>) -> TileResult<()> {
    let named_folder = path.is_dir();
    let folder = if named_folder {
        path
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    };
    let mut others = BTreeSet::new();
    for file in instances(folder)? {
        let slide = OpenSlide::new(&file).map_err(|e| {
            dicom_error(
                path,
                format!(
                    "instance {} does not open ({e}): it is truncated or damaged",
                    file_name(&file)
                ),
            )
        })?;
        let uid = slide.property_value(SERIES_PROPERTY).ok();
        if uid.as_deref() != series {
            others.insert(uid.unwrap_or_default());
        }
    }
    if named_folder && !others.is_empty() {
        return Err(dicom_error(
            path,
            format!(
                "the folder holds {} DICOM series; name one instance file of the slide's series \
                 in the dataset CSV instead of the folder",
                others.len() + 1
            ),
        ));
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{dicom_slide, openslide4_or_skip, slide_path};
    use crate::SlideReader;
    use tempfile::TempDir;

    /// A file with the DICOM preamble and signature and `body` after it.
    fn fake_instance(path: &Path, body: &[u8]) {
        let mut bytes = vec![0u8; MAGIC_OFFSET];
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(body);
        std::fs::write(path, bytes).unwrap();
    }

    /// A copy of the DICOM test slide's folder, to break.
    fn copy_of_dicom_slide() -> TempDir {
        let dir = TempDir::new().unwrap();
        for entry in std::fs::read_dir(dicom_slide()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        dir
    }

    fn truncate(path: &Path, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    #[test]
    fn a_folder_opens_through_its_first_instance() {
        let dir = TempDir::new().unwrap();
        fake_instance(&dir.path().join("b.dcm"), b"x");
        fake_instance(&dir.path().join("a"), b"x"); // no extension, as PACS exports write
        fake_instance(&dir.path().join(DICOMDIR), b"x");
        std::fs::write(dir.path().join("notes.txt"), "not a slide").unwrap();
        assert_eq!(
            instances(dir.path()).unwrap(),
            vec![dir.path().join("a"), dir.path().join("b.dcm")]
        );
        assert_eq!(openable_path(dir.path()).unwrap(), dir.path().join("a"));
        // A file is opened as it is.
        let file = dir.path().join("b.dcm");
        assert_eq!(openable_path(&file).unwrap(), file);
        assert!(is_dicom_slide(&file) && is_dicom_slide(dir.path()));
        assert!(!is_dicom_slide(&slide_path("CMU-1-Small-Region.svs")));
    }

    #[test]
    fn an_empty_folder_and_a_cut_off_header_are_named() {
        let dir = TempDir::new().unwrap();
        let err = openable_path(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no DICOM instance"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        fake_instance(&dir.path().join("level-0.dcm"), b"x");
        std::fs::write(dir.path().join("level-1.dcm"), [0u8; 60]).unwrap();
        let err = openable_path(dir.path()).unwrap_err().to_string();
        assert!(err.starts_with("DICOM slide "), "{err}");
        assert!(err.contains("level-1.dcm (60 bytes) is not DICOM"), "{err}");
    }

    #[test]
    fn a_resampled_level_zero_means_the_original_is_missing() {
        let p = Path::new("/data/slide");
        let original: Vec<String> = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
            .map(String::from)
            .into();
        assert!(check_level_zero(p, &original, (900, 900)).is_ok());
        let derived: Vec<String> = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
            .map(String::from)
            .into();
        let err = check_level_zero(p, &derived, (450, 450))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/data/slide") && err.contains("level 0 is missing"),
            "{err}"
        );
        assert!(err.contains("450x450"), "{err}");
    }

    /// Level 0 of the DICOM slide holds the SVS's own JPEG tiles (scripts/make-dicom-slide.py):
    /// tiled on one grid, every tile has the pixels of the SVS region it came from, exactly,
    /// whether the SVS is decoded directly or by OpenSlide; partial edge tiles included.
    #[test]
    fn dicom_tiles_have_the_pixels_of_the_svs_they_came_from() {
        if !openslide4_or_skip("dicom_tiles_have_the_pixels_of_the_svs_they_came_from") {
            return;
        }
        // Where the crop sits in CMU-1-Small-Region.svs.
        let (x0, y0) = (480u64, 960u64);
        let dicom = SlideReader::open(dicom_slide()).unwrap();
        assert_eq!(dicom.dimensions(), (900, 900));
        assert_eq!(dicom.levels().len(), 3);
        assert!((dicom.mpp().unwrap() - 0.499).abs() < 1e-6);
        assert!(!dicom.reads_directly(0));
        dicom.verify().unwrap();
        let svs = slide_path("CMU-1-Small-Region.svs");
        for mode in [crate::ReaderMode::Auto, crate::ReaderMode::Openslide] {
            let svs = SlideReader::open_with(&svs, mode).unwrap();
            // Whole tiles inside the 900 px slide (beyond its edge the SVS goes on, the DICOM not).
            for y in (0..=900 - 224).step_by(224) {
                for x in (0..=900 - 224).step_by(224) {
                    let a = dicom.read_tile(x, y, 224, 224).unwrap();
                    let b = svs.read_tile(x0 + x, y0 + y, 224, 224).unwrap();
                    assert!(a == b, "tile ({x}, {y}), {mode:?}: pixels differ");
                }
            }
            // The last partial frame (180 x 180 px) at the bottom-right corner.
            let a = dicom.read_region(0, 720, 720, 180, 180).unwrap();
            let b = svs.read_region(0, x0 + 720, y0 + 720, 180, 180).unwrap();
            assert!(a == b, "edge frame, {mode:?}: pixels differ");
        }
    }

    #[test]
    fn a_dicom_slide_opens_by_folder_and_by_instance_alike() {
        if !openslide4_or_skip("a_dicom_slide_opens_by_folder_and_by_instance_alike") {
            return;
        }
        let by_folder = SlideReader::open(dicom_slide()).unwrap();
        let by_file = SlideReader::open(dicom_slide().join("level-1.dcm")).unwrap();
        assert_eq!(by_folder.levels(), by_file.levels());
        assert_eq!(by_file.path(), dicom_slide().join("level-1.dcm"));
        by_file.verify().unwrap();
        assert_eq!(
            by_folder.read_tile(100, 200, 256, 128).unwrap(),
            by_file.read_tile(100, 200, 256, 128).unwrap()
        );
    }

    #[test]
    fn a_missing_level_zero_is_refused() {
        if !openslide4_or_skip("a_missing_level_zero_is_refused") {
            return;
        }
        let dir = copy_of_dicom_slide();
        std::fs::remove_file(dir.path().join("level-0.dcm")).unwrap();
        let err = SlideReader::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains("level 0 is missing"), "{err}");
        assert!(err.contains("450x450"), "{err}");
    }

    #[test]
    fn a_truncated_instance_is_refused_naming_the_level() {
        if !openslide4_or_skip("a_truncated_instance_is_refused_naming_the_level") {
            return;
        }
        let dir = copy_of_dicom_slide();
        let file = dir.path().join("level-0.dcm");
        let len = std::fs::metadata(&file).unwrap().len();
        // Cut inside the pixel data: OpenSlide opens it; the last frame is gone.
        truncate(&file, len / 2);
        let reader = SlideReader::open(dir.path()).unwrap();
        let err = reader.verify().unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains("level 0 (900x900 px)"), "{err}");
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn an_instance_cut_in_its_header_is_named() {
        if !openslide4_or_skip("an_instance_cut_in_its_header_is_named") {
            return;
        }
        let dir = copy_of_dicom_slide();
        // level-1 cut after the signature, inside its header: OpenSlide drops it silently.
        truncate(&dir.path().join("level-1.dcm"), 300);
        let reader = SlideReader::open(dir.path()).unwrap();
        assert_eq!(reader.levels().len(), 2, "OpenSlide left the level out");
        let err = reader.verify().unwrap_err().to_string();
        assert!(err.contains("instance level-1.dcm does not open"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn a_folder_of_two_series_asks_for_a_file() {
        if !openslide4_or_skip("a_folder_of_two_series_asks_for_a_file") {
            return;
        }
        let dir = copy_of_dicom_slide();
        // A second series: the same level with another SeriesInstanceUID.
        let mut bytes = std::fs::read(dir.path().join("level-2.dcm")).unwrap();
        let reader = SlideReader::open(dir.path()).unwrap();
        let uid = reader.property(SERIES_PROPERTY).unwrap();
        let at = bytes
            .windows(uid.len())
            .position(|w| w == uid.as_bytes())
            .unwrap();
        let last = bytes[at + uid.len() - 1];
        bytes[at + uid.len() - 1] = if last == b'1' { b'2' } else { b'1' };
        std::fs::write(dir.path().join("other-series.dcm"), bytes).unwrap();
        let err = SlideReader::open(dir.path())
            .and_then(|r| r.verify())
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds 2 DICOM series"), "{err}");
        // Named by one of its files, the slide is unambiguous.
        let reader = SlideReader::open(dir.path().join("level-0.dcm")).unwrap();
        reader.verify().unwrap();
    }

    /// OpenSlide 3 cannot read DICOM: the error says what to install instead of
    /// "unsupported format".
    #[test]
    fn openslide3_says_that_dicom_needs_openslide4() {
        if openslide_reads_dicom() {
            // Covered by `unsupported_reason` returning None below.
            assert_eq!(unsupported_reason(&dicom_slide()), None);
            return;
        }
        let err = SlideReader::open(dicom_slide()).unwrap_err().to_string();
        assert!(err.contains("DICOM slides need OpenSlide 4"), "{err}");
        assert!(err.contains(openslide_version()), "{err}");
    }
}
