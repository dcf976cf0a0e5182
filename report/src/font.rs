//! Text in figures needs a TrueType font: plotters' `ab_glyph` backend draws with whatever
//! font is registered, so one is looked up on the system (Debian: `fonts-dejavu-core`, which
//! `scripts/setup.sh` installs) or taken from `TESSERA_FONT`, and registered once.

use crate::error::ReportError;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where common systems keep a sans-serif TrueType font, most wanted first.
const CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Any `.ttf` under `dir` (depth-first, sorted), for systems with fonts elsewhere.
fn any_ttf(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in &entries {
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")) {
            return Some(p.clone());
        }
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| any_ttf(p, depth - 1))
}

/// The font file to use: `TESSERA_FONT`, else a known system font, else any `.ttf` found
/// under /usr/share/fonts.
pub fn find_font() -> Result<PathBuf, ReportError> {
    if let Some(p) = std::env::var_os("TESSERA_FONT") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ReportError::Font(format!(
                "TESSERA_FONT={} is not a file",
                p.display()
            )))
        };
    }
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| any_ttf(Path::new("/usr/share/fonts"), 4))
        .ok_or_else(|| {
            ReportError::Font(
                "no TrueType font found; install one (Debian/Ubuntu: `apt-get install fonts-dejavu-core`) or set TESSERA_FONT=/path/to/font.ttf".into(),
            )
        })
}

/// Registers the font as plotters' `sans-serif` (normal and bold), once per process.
pub fn ensure_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = REGISTERED.get_or_init(|| {
        let path = find_font().map_err(|e| e.to_string())?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        for style in [FontStyle::Normal, FontStyle::Bold] {
            register_font("sans-serif", style, bytes)
                .map_err(|_| format!("{}: not a usable TrueType font", path.display()))?;
        }
        Ok(path)
    });
    result
        .as_ref()
        .map(|_| ())
        .map_err(|m| ReportError::Font(m.clone()))
}
