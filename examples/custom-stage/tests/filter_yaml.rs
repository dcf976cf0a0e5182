//! Runs `tessera-custom` on the example experiment (`filter.yaml`, the real CMU-1 slide) and
//! checks from run.json that the user-defined stage ran inside the engine and dropped tiles.

use std::path::Path;
use std::process::Command;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera-custom"))
}

#[test]
fn filter_yaml_runs_and_drops_some_tiles() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let slide = here.join("../../../shared/data/slides/CMU-1-Small-Region.svs");
    assert!(slide.exists(), "test slide missing: {}", slide.display());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let status = binary()
        .arg("run")
        .arg(here.join("filter.yaml"))
        .arg("--out")
        .arg(&out)
        .arg("--quiet")
        .env("TESSERA_CACHE_DIR", tmp.path().join("cache"))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "ok");
    assert_eq!(report["errors"].as_array().unwrap().len(), 0, "{report:#}");
    let stage = |name: &str| {
        report["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap()
    };
    let (tile, qc, embed) = (stage("tile"), stage("qc"), stage("embed"));
    assert_eq!(qc["kind"], "tile_filter");
    let tiles = tile["rows_out"].as_u64().unwrap();
    let kept = qc["rows_out"].as_u64().unwrap();
    assert_eq!(qc["rows_in"].as_u64().unwrap(), tiles);
    assert!(
        kept > 0 && kept < tiles,
        "the filter kept {kept} of {tiles} tiles"
    );
    assert_eq!(
        embed["rows_out"].as_u64().unwrap(),
        kept,
        "embed sees only the kept tiles"
    );
}

#[test]
fn the_extra_kind_is_listed_with_its_parameters() {
    let out = binary().args(["stages", "tile_filter"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for param in [
        "min_tissue",
        "min_brightness",
        "max_brightness",
        "min_sharpness",
    ] {
        assert!(text.contains(param), "{text}");
    }
    let all = binary().arg("stages").output().unwrap();
    let text = String::from_utf8_lossy(&all.stdout);
    assert!(
        text.contains("tile_filter") && text.contains("embed"),
        "{text}"
    );
}
