//! The `tile` stage run through the engine's harness on the shared test slides.

use arrow::array::{
    Array, BinaryArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
};
use std::path::PathBuf;
use std::sync::Arc;
use tessera_pipeline::testing::{test_slides, Harness, HarnessOutput};
use tessera_pipeline::{Slide, SlideHandle, StageKind};
use tessera_tile::plan::plan_slide;
use tessera_tile::tissue::{saturation, TissueParams};
use tessera_tile::{SlideReader, TileParams};

fn slide_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("TESSERA_TEST_SLIDES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/slides")
        });
    dir.join(name)
}

fn slide(index: usize, id: &str, file: &str, mpp: Option<f64>) -> SlideHandle {
    Arc::new(Slide {
        index,
        id: id.into(),
        path: Some(slide_path(file)),
        label: None,
        split: None,
        case_id: None,
        mpp,
        extra: Default::default(),
    })
}

/// One row of the emitted table.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    x: i64,
    y: i64,
    size: i64,
    level: i32,
    mpp: Option<f64>,
    tissue: f32,
    pixels: Option<Vec<u8>>,
}

fn rows(out: &HarnessOutput, slide_id: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    for (_, b) in out.batches.iter().filter(|(s, _)| s == slide_id) {
        rows.extend(batch_rows(b));
    }
    rows
}

fn batch_rows(b: &RecordBatch) -> Vec<Row> {
    let i64s = |n: &str| {
        b.column_by_name(n)
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .clone()
    };
    let (x, y, size) = (i64s("x"), i64s("y"), i64s("tile_size"));
    let level = b
        .column_by_name("level")
        .unwrap()
        .as_any()
        .downcast_ref::<Int32Array>()
        .unwrap()
        .clone();
    let mpp = b
        .column_by_name("mpp")
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap()
        .clone();
    let tissue = b
        .column_by_name("tissue_fraction")
        .unwrap()
        .as_any()
        .downcast_ref::<Float32Array>()
        .unwrap()
        .clone();
    let pixels = b
        .column_by_name("pixels")
        .map(|c| c.as_any().downcast_ref::<BinaryArray>().unwrap().clone());
    (0..b.num_rows())
        .map(|i| Row {
            x: x.value(i),
            y: y.value(i),
            size: size.value(i),
            level: level.value(i),
            mpp: mpp.is_valid(i).then(|| mpp.value(i)),
            tissue: tissue.value(i),
            pixels: pixels.as_ref().map(|p| p.value(i).to_vec()),
        })
        .collect()
}

fn params(f: impl FnOnce(&mut TileParams)) -> TileParams {
    let mut p = TileParams::default();
    f(&mut p);
    p.validate().unwrap();
    p
}

#[test]
fn real_slide_tiles_lie_on_tissue_inside_the_slide() {
    let dir = tempfile::tempdir().unwrap();
    let slides = vec![slide(0, "cmu", "CMU-1-Small-Region.svs", None)];
    let p = params(|p| p.batch_size = 16);
    let out = Harness::new(slides.clone(), dir.path())
        .run(p.clone())
        .unwrap();
    assert_eq!(out.ended, vec!["cmu"]);
    assert!(out.batches.iter().all(|(_, b)| b.num_rows() <= 16));
    let rows = rows(&out, "cmu");
    assert!(rows.len() > 20, "{} tiles", rows.len());

    // Against the mask and grid: exactly the grid positions with enough tissue are kept.
    let reader = SlideReader::open(slide_path("CMU-1-Small-Region.svs")).unwrap();
    let plan = plan_slide(&reader, None, &p_plan(&p)).unwrap();
    let mut kept = 0;
    for gy in (0..=2967 - 256).step_by(256) {
        for gx in (0..=2220 - 256).step_by(256) {
            let f = plan.mask.fraction(
                gx as f64 / plan.mask_scale.x,
                gy as f64 / plan.mask_scale.y,
                (gx + 256) as f64 / plan.mask_scale.x,
                (gy + 256) as f64 / plan.mask_scale.y,
            );
            let row = rows.iter().find(|r| r.x == gx && r.y == gy);
            assert_eq!(row.is_some(), f >= 0.5, "tile ({gx}, {gy}) with tissue {f}");
            if let Some(r) = row {
                kept += 1;
                assert!((f64::from(r.tissue) - f).abs() < 1e-6);
            }
        }
    }
    assert_eq!(kept, rows.len());

    // Independently of the mask: kept tiles are stained (saturated) far more than rejected ones.
    let saturated =
        |px: &[u8]| saturation(px).iter().filter(|&&s| s > 25).count() as f64 / (256.0 * 256.0);
    let kept_sat: f64 = rows
        .iter()
        .map(|r| saturated(r.pixels.as_ref().unwrap()))
        .sum::<f64>()
        / rows.len() as f64;
    let mut rejected = Vec::new();
    for gy in (0..=2967 - 256).step_by(256) {
        for gx in (0..=2220 - 256).step_by(256) {
            if !rows.iter().any(|r| r.x == gx && r.y == gy) {
                rejected.push(saturated(
                    &reader.read_tile(gx as u64, gy as u64, 256, 256).unwrap(),
                ));
            }
        }
    }
    let rejected_sat = rejected.iter().sum::<f64>() / rejected.len().max(1) as f64;
    assert!(
        kept_sat > 0.5 && rejected_sat < 0.25,
        "kept {kept_sat}, rejected {rejected_sat}"
    );

    for r in &rows {
        assert_eq!((r.size, r.level), (256, 0));
        assert!(r.x + 256 <= 2220 && r.y + 256 <= 2967);
        assert!((r.mpp.unwrap() - 0.499).abs() < 1e-3);
        assert_eq!(r.pixels.as_ref().unwrap().len(), 256 * 256 * 3);
    }
    // Pixels are the slide's pixels, in row order.
    let r = &rows[rows.len() / 2];
    assert_eq!(
        r.pixels.as_deref().unwrap(),
        &reader.read_tile(r.x as u64, r.y as u64, 256, 256).unwrap()[..]
    );
    let size = out.batches[0].1.column_by_name("pixels_size").unwrap();
    assert_eq!(
        size.as_any().downcast_ref::<Int32Array>().unwrap().value(0),
        256
    );

    // The thumbnail users look at.
    let thumb = image::open(dir.path().join("out/thumbnails/cmu.png")).unwrap();
    assert_eq!(thumb.height(), 1024);
}

fn p_plan(p: &TileParams) -> tessera_tile::plan::PlanOptions {
    tessera_tile::plan::PlanOptions {
        target: tessera_tile::Target::Native,
        tile_px: p.tile_size,
        overlap_px: p.overlap,
        min_tissue: p.min_tissue,
        tissue: p.tissue.clone(),
        picture_max_side: None,
    }
}

#[test]
fn paper_setting_512_px_with_128_px_overlap_at_10x() {
    let dir = tempfile::tempdir().unwrap();
    let slides = vec![slide(0, "cmu", "CMU-1-Small-Region.svs", None)];
    let p = params(|p| {
        p.tile_size = 512;
        p.overlap = 128;
        p.magnification = Some(10.0);
        p.emit_pixels = false;
        p.min_tissue = 0.0;
    });
    let rows = rows(&Harness::new(slides, dir.path()).run(p).unwrap(), "cmu");
    // 10x = 1.0 µm/px on a 0.499 µm/px scan: 512 px tiles cover 1026 level-0 px, step 770.
    let size0 = (512.0f64 / 0.4990).round() as i64;
    let stride0 = (384.0f64 / 0.4990).round() as i64;
    assert!(
        rows.iter().all(|r| r.size == size0 && r.pixels.is_none()),
        "{:?}",
        rows[0]
    );
    let xs: Vec<i64> = rows.iter().filter(|r| r.y == 0).map(|r| r.x).collect();
    assert_eq!(
        xs,
        vec![0, stride0],
        "2220 px wide: two 1026 px tiles at stride {stride0}"
    );
    let ys: Vec<i64> = rows.iter().filter(|r| r.x == 0).map(|r| r.y).collect();
    assert_eq!(ys, vec![0, stride0, 2 * stride0]);
    assert!((rows[0].mpp.unwrap() - 1.0).abs() < 2e-3);
}

#[test]
fn level_is_chosen_by_target_mpp_with_a_dataset_override() {
    let dir = tempfile::tempdir().unwrap();
    // boxes.tiff has no mpp: without an override, asking for mpp is a clear per-slide error.
    let slides = vec![
        slide(0, "boxes", "boxes.tiff", None),
        slide(1, "boxes_mpp", "boxes.tiff", Some(0.25)),
    ];
    let p = params(|p| {
        p.tile_size = 16;
        p.mpp = Some(1.0);
        p.tissue.downsample = 4.0;
        p.tissue.median_kernel = 3;
    });
    let out = Harness::new(slides, dir.path()).run(p).unwrap();
    let report = out.report.as_ref().unwrap();
    let errors: Vec<String> = report.errors.iter().map(|e| e.message.clone()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("boxes.tiff") && errors[0].contains("`mpp` column"),
        "{}",
        errors[0]
    );
    let rows = rows(&out, "boxes_mpp");
    assert!(!rows.is_empty());
    let png = image::open(slide_path("boxes.png")).unwrap().to_rgb8();
    for r in &rows {
        // 4 level-0 px per output px: the 4x level (2), 64 px tiles, within 300 x 250.
        assert_eq!((r.size, r.level), (64, 2), "{r:?}");
        assert!(r.x % 64 == 0 && r.y % 64 == 0 && r.x + 64 <= 300 && r.y + 64 <= 250);
        // Pixel centre of the tile against the PNG oracle where the picture is flat.
        let px = r.pixels.as_ref().unwrap();
        let centre = &px[(8 * 16 + 8) * 3..(8 * 16 + 8) * 3 + 3];
        let (cx, cy) = (r.x as u32 + 34, r.y as u32 + 34);
        let flat = (cx - 6..cx + 6)
            .all(|x| (cy - 6..cy + 6).all(|y| png.get_pixel(x, y) == png.get_pixel(cx, cy)));
        if flat {
            let want = png.get_pixel(cx, cy).0;
            assert!(
                centre.iter().zip(want).all(|(&a, b)| a.abs_diff(b) <= 2),
                "{r:?}: {centre:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn magnification_converts_through_the_slide_mpp() {
    let dir = tempfile::tempdir().unwrap();
    let slides = vec![slide(0, "boxes", "boxes.tiff", Some(0.25))];
    // 5x = 2 µm/px = 8 level-0 px per output px: the coarsest level at most 8x (within 1%).
    let p = params(|p| {
        p.tile_size = 8;
        p.magnification = Some(5.0);
        p.min_tissue = 0.0;
        p.emit_pixels = false;
    });
    let rows = rows(&Harness::new(slides, dir.path()).run(p).unwrap(), "boxes");
    assert_eq!(rows.len(), (300 / 64) * (250 / 64));
    let levels = SlideReader::open(slide_path("boxes.tiff"))
        .unwrap()
        .levels()
        .to_vec();
    let want = levels
        .iter()
        .rposition(|l| l.downsample <= 8.0 * 1.01)
        .unwrap() as i32;
    assert!(want >= 2, "{levels:?}");
    assert!(
        rows.iter()
            .all(|r| r.size == 64 && r.level == want && r.mpp == Some(2.0)),
        "{:?} {levels:?}",
        rows[0]
    );
}

#[test]
fn broken_slides_fail_alone_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let slides = vec![
        slide(0, "bad_open", "unopenable.tiff", None),
        slide(1, "bad_read", "unreadable.svs", None),
        slide(2, "cmu", "CMU-1-Small-Region.svs", None),
    ];
    let p = params(|p| {
        p.tile_size = 8;
        p.min_tissue = 0.0;
        p.thumbnails = false;
    });
    // 8 px tiles so that unreadable.svs (16 x 16) has tiles to read.
    let p = TileParams {
        tissue: TissueParams {
            downsample: 4.0,
            ..TissueParams::default()
        },
        ..p
    };
    let out = Harness::new(slides, dir.path()).run(p).unwrap();
    let errors = &out.report.as_ref().unwrap().errors;
    let message = |id: &str| {
        errors
            .iter()
            .find(|e| e.slide.as_deref() == Some(id))
            .map(|e| e.message.clone())
    };
    let open = message("bad_open").expect("unopenable.tiff reported");
    assert!(
        open.contains("unopenable.tiff") && open.contains("cannot open slide"),
        "{open}"
    );
    let read = message("bad_read").expect("unreadable.svs reported");
    assert!(read.contains("unreadable.svs"), "{read}");
    assert!(out.rows_of("cmu") > 0);
    assert!(out.ended.contains(&"cmu".to_string()));
}

#[test]
fn no_tissue_gives_zero_rows_and_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let slides = vec![
        slide(0, "blank", "CMU-1-Small-Region.svs", None),
        slide(1, "tiny", "small.svs", None),
    ];
    // A threshold nothing exceeds: no tissue anywhere.
    let p = params(|p| p.tissue.threshold = Some(255));
    let out = Harness::new(slides, dir.path()).run(p).unwrap();
    assert_eq!(out.rows_of("blank"), 0);
    assert_eq!(out.rows_of("tiny"), 0);
    assert_eq!(out.ended.len(), 2, "both slides end even without rows");
    let report = out.report.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let warnings: Vec<_> = report
        .stages
        .iter()
        .flat_map(|s| s.warnings.iter())
        .collect();
    let about = |id: &str| {
        warnings
            .iter()
            .find(|w| w.slide.as_deref() == Some(id))
            .map(|w| w.message.clone())
    };
    assert!(about("blank").unwrap().contains("no tissue tiles"));
    assert!(about("tiny").unwrap().contains("smaller than one tile"));
}

#[test]
fn cached_runs_persist_coordinates_and_re_read_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let slides = test_slides(&[("cmu", slide_path("CMU-1-Small-Region.svs").to_str(), None)]);
    let p = params(|p| {
        p.tile_size = 128;
        p.mpp = Some(1.5);
        p.batch_size = 10;
    });
    let mut harness = Harness::new(slides, dir.path());
    harness.cache = true;
    let first = harness.run(p.clone()).unwrap();
    let thumbs = dir.path().join("out/thumbnails");
    assert!(thumbs.join("cmu.png").exists());
    std::fs::remove_dir_all(&thumbs).unwrap();
    let second = harness.run(p.clone()).unwrap();
    assert!(
        thumbs.join("cmu.png").exists(),
        "a replay that re-reads pixels writes the thumbnail too"
    );
    let tile_report = |o: &HarnessOutput| {
        let s = o.report.as_ref().unwrap().stage("tile").unwrap();
        (s.cache_hits, s.cache_misses)
    };
    assert_eq!(tile_report(&first), (0, 1));
    assert_eq!(tile_report(&second), (1, 0));
    let (a, b) = (rows(&first, "cmu"), rows(&second, "cmu"));
    assert!(!a.is_empty());
    assert_eq!(a, b, "replayed rows and re-read pixels are identical");
    assert!(second.batches.iter().all(|(_, b)| b.num_rows() <= 10));
    // Resampled from level 0 (3x): every tile 128 px.
    assert!(a
        .iter()
        .all(|r| r.pixels.as_ref().unwrap().len() == 128 * 128 * 3 && r.level == 0));
}
