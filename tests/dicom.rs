//! DICOM WSI slides through the binary: `tessera --version` names the OpenSlide it runs on;
//! the README's DICOM example (`examples/dicom/dicom.yaml`) tiles and embeds its slide, named
//! by folder and by file; a series with its level 0 missing, one with an instance cut off and
//! one with a header cut off are reported by slide and skipped while the good slides go on.
//! On OpenSlide 3 (no DICOM) the DICOM slides are reported as needing OpenSlide 4, and the
//! OpenSlide 4 checks are skipped loudly, or fail where `TESSERA_REQUIRE_OPENSLIDE4` is set
//! (CI, whose `scripts/setup.sh` installs OpenSlide 4).

mod common;

use common::{cmu1, count, run, stage, tessera, tessera_with, tile_embed_stages};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// The OpenSlide version `tessera --version` reports.
fn openslide_version() -> String {
    let r = tessera_with(&["--version"]);
    assert!(r.ok(), "{r:?}");
    let (_, after) = r
        .stdout
        .split_once("OpenSlide ")
        .unwrap_or_else(|| panic!("no OpenSlide version in `tessera --version`: {r:?}"));
    after
        .split(|c: char| c == ')' || c == ',' || c.is_whitespace())
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Whether the binary runs on OpenSlide 4; on 3 says loudly what is skipped (or fails, where
/// TESSERA_REQUIRE_OPENSLIDE4 is set).
fn openslide4_or_skip(test: &str) -> bool {
    let version = openslide_version();
    if version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        >= Some(4)
    {
        return true;
    }
    let message = format!(
        "{test}: tessera runs on OpenSlide {version}, which cannot read DICOM; run \
         scripts/setup.sh and rebuild (README: OpenSlide)"
    );
    if std::env::var_os("TESSERA_REQUIRE_OPENSLIDE4").is_some() {
        panic!("{message} (TESSERA_REQUIRE_OPENSLIDE4 is set)");
    }
    // Straight to the terminal: the test harness captures eprintln! of passing tests.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {message} ***\n");
    false
}

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dicom")
}

/// A copy of the example's DICOM folder under `dir`, to break.
fn copy_series(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir(&to).unwrap();
    for entry in std::fs::read_dir(example_dir().join("CMU-1-crop")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    to
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
fn version_names_the_openslide_library() {
    let version = openslide_version();
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("OpenSlide version `{version}`"));
    assert!(major >= 3, "{version}");
    if std::env::var_os("TESSERA_REQUIRE_OPENSLIDE4").is_some() {
        assert!(
            major >= 4,
            "TESSERA_REQUIRE_OPENSLIDE4 is set, OpenSlide is {version}"
        );
    }
}

/// `tessera run examples/dicom/dicom.yaml`, as the README says, into a temporary cache and
/// output folder.
#[test]
fn the_readme_dicom_example_tiles_its_slide() {
    if !openslide4_or_skip("the_readme_dicom_example_tiles_its_slide") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("out");
    let r = tessera()
        .env("TESSERA_CACHE_DIR", dir.path().join("cache"))
        .arg("run")
        .arg(example_dir().join("dicom.yaml"))
        .arg("--out")
        .arg(&out)
        .arg("--quiet")
        .output()
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert!(r.status.success(), "{r:?}");
    assert_eq!(report["status"], "ok", "{report:#}");
    assert_eq!(report["errors"].as_array().unwrap().len(), 0, "{report:#}");
    assert_eq!(count(&report, "tiles", "items_out"), 2, "{report:#}");
    let rows = count(&report, "tiles", "rows_out");
    // 900 px at 224 px: at most 4 x 4 tiles, each slide; tissue keeps most of them.
    assert!((2 * 8..=2 * 16).contains(&rows), "{report:#}");
    assert_eq!(count(&report, "embed", "rows_out"), rows, "{report:#}");
    let version = &stage(&report, "tiles")["details"]["openslide"];
    assert!(
        version.as_str().is_some_and(|v| v.starts_with('4')),
        "{report:#}"
    );
    assert!(out.join("thumbnails/cmu1-crop-by-folder.png").is_file());
}

/// Good and broken DICOM series among an SVS: the broken ones are named and skipped.
#[test]
fn broken_dicom_series_are_reported_and_skipped() {
    let dir = TempDir::new().unwrap();
    let good = example_dir().join("CMU-1-crop");
    let no_level0 = copy_series(dir.path(), "no-level0");
    std::fs::remove_file(no_level0.join("level-0.dcm")).unwrap();
    let truncated = copy_series(dir.path(), "truncated");
    let file = truncated.join("level-0.dcm");
    truncate(&file, std::fs::metadata(&file).unwrap().len() / 2);
    let cut_header = copy_series(dir.path(), "cut-header");
    truncate(&cut_header.join("level-1.dcm"), 300);
    let slides: [(&str, &Path); 6] = [
        ("svs", &cmu1()),
        ("dicom", &good),
        ("dicom-file", &good.join("level-0.dcm")),
        ("no-level0", &no_level0),
        ("truncated", &truncated),
        ("cut-header", &cut_header),
    ];
    let mut csv = String::from("slide_id,path,label\n");
    for (id, path) in slides {
        csv.push_str(&format!("{id},{},tumor\n", path.display()));
    }
    std::fs::write(dir.path().join("dataset.csv"), csv).unwrap();
    let yaml = format!(
        "name: dicom-broken\ndataset: dataset.csv\ncache_dir: cache\n{}",
        tile_embed_stages(224, 0.5, 0.25)
    );
    let file = common::write_yaml(dir.path(), "exp.yaml", &yaml);
    let (r, report) = run(&file, &dir.path().join("out"), &[]);
    let report = report.unwrap_or_else(|| panic!("{r:?}"));
    assert!(r.ok(), "{r:?}");
    let errors = report["errors"].as_array().unwrap();
    let error_of = |id: &str| {
        errors
            .iter()
            .find(|e| e["slide"] == id)
            .unwrap_or_else(|| panic!("no error for {id}: {report:#}"))["message"]
            .as_str()
            .unwrap()
            .to_string()
    };
    if !openslide4_or_skip("broken_dicom_series_are_reported_and_skipped") {
        // OpenSlide 3: every DICOM slide is refused with what to install; the SVS goes on.
        assert_eq!(errors.len(), 5, "{report:#}");
        assert!(error_of("dicom").contains("DICOM slides need OpenSlide 4"));
        assert_eq!(count(&report, "tile", "items_out"), 1, "{report:#}");
        return;
    }
    assert_eq!(errors.len(), 3, "{report:#}");
    for (id, folder, what) in [
        ("no-level0", &no_level0, "level 0 is missing"),
        (
            "truncated",
            &truncated,
            "level 0 (900x900 px) does not decode",
        ),
        (
            "cut-header",
            &cut_header,
            "instance level-1.dcm does not open",
        ),
    ] {
        let message = error_of(id);
        assert!(message.contains(&folder.display().to_string()), "{message}");
        assert!(message.contains(what), "{message}");
        assert!(r.stderr.contains(what), "{r:?}");
    }
    assert!(r.stdout.contains("Ok with 3 error(s)"), "{r:?}");
    // The SVS and the DICOM slide named twice went all the way through.
    assert_eq!(count(&report, "tile", "items_out"), 3, "{report:#}");
    assert_eq!(count(&report, "embed", "items_out"), 3, "{report:#}");
}
