//! One table of tile embeddings, written by `scripts/feature-formats-fixtures.py` in TRIDENT's,
//! STAMP's and slideflow's layouts (as those tools write them), imports to the same embeddings
//! and level-0 coordinates as the table itself, through each importer stage.

use arrow::array::{Array, FixedSizeListArray, Float32Array, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tessera_features::*;
use tessera_pipeline::testing::Harness;
use tessera_pipeline::{Slide, SlideHandle, StageKind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats")
}

/// Per slide, in row order: (x, y, tile_size, embedding).
type Rows = BTreeMap<String, Vec<(i64, i64, i64, Vec<f32>)>>;

fn rows_of<'a>(batches: impl IntoIterator<Item = &'a RecordBatch>) -> Rows {
    let mut out = Rows::new();
    for b in batches {
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let ids = col("slide_id");
        let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
        let int = |n: &str| {
            col(n)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone()
        };
        let (x, y, t) = (int("x"), int("y"), int("tile_size"));
        let emb = col("embedding");
        let emb = emb.as_any().downcast_ref::<FixedSizeListArray>().unwrap();
        for i in 0..b.num_rows() {
            let v = emb.value(i);
            let v = v.as_any().downcast_ref::<Float32Array>().unwrap();
            out.entry(ids.value(i).to_string()).or_default().push((
                x.value(i),
                y.value(i),
                t.value(i),
                v.values().to_vec(),
            ));
        }
    }
    out
}

fn reference() -> Rows {
    let file = std::fs::File::open(fixtures().join("reference.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    rows_of(&batches)
}

/// The fixture's dataset, with each slide's level-0 mpp from the CSV.
fn slides() -> Vec<SlideHandle> {
    let csv = std::fs::read_to_string(fixtures().join("dataset.csv")).unwrap();
    csv.lines()
        .skip(1)
        .enumerate()
        .map(|(index, line)| {
            let f: Vec<&str> = line.split(',').collect();
            Arc::new(Slide {
                index,
                id: f[0].to_string(),
                path: None,
                label: Some(f[1].to_string()),
                split: None,
                case_id: None,
                mpp: Some(f[2].parse().unwrap()),
                extra: Default::default(),
            })
        })
        .collect()
}

fn import<K: StageKind>(params: K, dir: &Path) -> Rows {
    let out = Harness::new(slides(), dir).run(params).unwrap();
    let report = out.report.as_ref().unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    rows_of(out.batches.iter().map(|(_, b)| b))
}

fn path(sub: &str) -> String {
    fixtures().join(sub).to_string_lossy().into_owned()
}

#[test]
fn trident_stamp_and_slideflow_files_import_to_the_table_they_were_written_from() {
    let dir = tempfile::tempdir().unwrap();
    let want = reference();
    assert_eq!(want.len(), 2);
    let trident = H5FeaturesParams {
        path: path("trident"),
        ..Default::default()
    };
    assert_eq!(import(trident, &dir.path().join("t")), want, "TRIDENT");
    let stamp = H5FeaturesParams {
        path: path("stamp"),
        layout: H5Layout::Stamp,
        ..Default::default()
    };
    assert_eq!(import(stamp, &dir.path().join("s")), want, "STAMP");
    let slideflow = SlideflowParams {
        path: path("slideflow"),
        ..Default::default()
    };
    assert_eq!(import(slideflow, &dir.path().join("f")), want, "slideflow");
    let parquet = FeaturesParams {
        path: path("reference.parquet"),
        ..Default::default()
    };
    assert_eq!(import(parquet, &dir.path().join("p")), want, "Parquet");
}

/// TRIDENT tiles a 40x slide at 20x with 256 px patches: 512 level-0 px apart. Dividing the
/// level-0 coordinates by the 20x patch size (256) would put neighbours two cells apart; the
/// importer's tile size is the level-0 one, so the tile grid (what `sparse_map` divides by)
/// has them one cell apart, on the 40x slide as on the 20x one.
#[test]
fn neighbours_of_a_40x_slide_tiled_at_20x_are_one_grid_cell_apart() {
    let p = H5FeaturesParams {
        path: path("trident"),
        ..Default::default()
    };
    for (slide, level0) in [("s40x", 512), ("s20x", 256)] {
        let s = p
            .read(&fixtures().join(format!("trident/{slide}.h5")), None)
            .unwrap();
        assert_eq!(s.tile_size, level0, "{slide}");
        // The first three tiles are a row of neighbours.
        let cells: Vec<i64> = s.coords[..3].iter().map(|c| c[0] / s.tile_size).collect();
        assert_eq!(cells[1] - cells[0], 1, "{slide}: {cells:?}");
        assert_eq!(cells[2] - cells[1], 1, "{slide}: {cells:?}");
        // The pitfall, for the record: the 20x patch size as the divisor.
        let wrong: Vec<i64> = s.coords[..2].iter().map(|c| c[0] / 256).collect();
        assert_eq!(wrong[1] - wrong[0], level0 / 256, "{slide}");
    }
    // STAMP's micrometres and slideflow's centres give the same level-0 grid.
    let stamp = H5FeaturesParams {
        path: path("stamp"),
        layout: H5Layout::Stamp,
        ..Default::default()
    };
    let s = stamp
        .read(&fixtures().join("stamp/s40x.h5"), Some(0.25))
        .unwrap();
    assert_eq!(s.tile_size, 512);
    assert_eq!(s.coords[1][0] - s.coords[0][0], 512);
}

#[test]
fn micrometre_coordinates_need_the_slides_level0_mpp() {
    let stamp = H5FeaturesParams {
        path: path("stamp"),
        layout: H5Layout::Stamp,
        ..Default::default()
    };
    let err = stamp
        .read(&fixtures().join("stamp/s40x.h5"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("s40x.h5") && err.contains("`mpp`") && err.contains("not the slide's"),
        "{err}"
    );
    // The `mpp` parameter serves slides without one in the CSV.
    let with_mpp = H5FeaturesParams {
        mpp: Some(0.5),
        ..stamp
    };
    let s = with_mpp
        .read(&fixtures().join("stamp/s20x.h5"), None)
        .unwrap();
    assert_eq!(s.tile_size, 256);
    // slideflow: without an mpp the tile size (tile_um / mpp) is unknown.
    let sf = SlideflowParams {
        path: path("slideflow"),
        ..Default::default()
    };
    let err = sf
        .read(&fixtures().join("slideflow/s20x.pt"), Some(128.0), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("s20x.pt") && err.contains("`mpp`"), "{err}");
    // A bag whose index is missing names the index file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("slideflow/s20x.pt"),
        dir.path().join("lone.pt"),
    )
    .unwrap();
    let err = sf
        .read(&dir.path().join("lone.pt"), Some(128.0), Some(0.5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("lone.index.npz"), "{err}");
}
