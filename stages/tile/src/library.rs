//! Which OpenSlide this build runs on. The formats a slide can be in depend on it (DICOM
//! needs OpenSlide 4; Debian ships 3.4.1, `scripts/setup.sh` installs 4.0.1 from PyPI's
//! `openslide-bin`), so `tessera --version`, run.json and error messages say it.

use openslide_rs::OpenSlide;
use std::sync::OnceLock;

/// The first OpenSlide release that reads DICOM WSI.
pub const DICOM_MAJOR: u32 = 4;

/// The version string of the OpenSlide library loaded at run time (`openslide_get_version`),
/// e.g. `4.0.1`; `unknown` if the library does not say.
pub fn openslide_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| OpenSlide::version().unwrap_or_else(|_| "unknown".to_string()))
}

/// The major version of [`openslide_version`], when it parses.
pub fn openslide_major() -> Option<u32> {
    major_of(openslide_version())
}

/// Whether the loaded OpenSlide reads DICOM WSI folders (OpenSlide 4 or later).
pub fn openslide_reads_dicom() -> bool {
    openslide_major().is_some_and(|m| m >= DICOM_MAJOR)
}

fn major_of(version: &str) -> Option<u32> {
    version.split('.').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_versions_parse() {
        assert_eq!(major_of("3.4.1"), Some(3));
        assert_eq!(major_of("4.0.1"), Some(4));
        assert_eq!(major_of("unknown"), None);
    }

    #[test]
    fn the_loaded_library_reports_a_release() {
        let v = openslide_version();
        let major = openslide_major().unwrap_or_else(|| panic!("version `{v}`"));
        assert!((3..=9).contains(&major), "{v}");
    }
}
