//! `features` (Parquet import) driven through the engine's test harness.

use arrow::array::{
    Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, Float64Array, Int64Array,
    ListArray, StringArray,
};
use arrow::datatypes::{DataType, Field, Float64Type, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use std::path::Path;
use std::sync::Arc;
use tessera_features::*;
use tessera_pipeline::schema::embedding_type;
use tessera_pipeline::testing::{test_slides, Harness};
use tessera_pipeline::StageKind;

fn embeddings_of(batch: &RecordBatch) -> Vec<Vec<f32>> {
    let col = batch
        .column_by_name("embedding")
        .unwrap()
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .unwrap();
    (0..col.len())
        .map(|i| {
            let v = col.value(i);
            if let Some(f) = v.as_any().downcast_ref::<Float32Array>() {
                f.values().to_vec()
            } else {
                v.as_any()
                    .downcast_ref::<Float16Array>()
                    .unwrap()
                    .values()
                    .iter()
                    .map(|h| h.to_f32())
                    .collect()
            }
        })
        .collect()
}

fn test_build_context(dir: &Path) -> tessera_pipeline::BuildContext {
    tessera_pipeline::BuildContext {
        stage_name: "features".into(),
        seed: 0,
        device: tessera_pipeline::DeviceSpec::Cpu,
        out_dir: dir.into(),
        cache_dir: dir.into(),
        base_dir: dir.into(),
        slides: Arc::from(Vec::new()),
        task: Default::default(),
        workers: 1,
        worker: 0,
    }
}

fn write_features(path: &Path, rows: &[(&str, i64)], dim: usize) {
    let n = rows.len();
    let schema = Arc::new(Schema::new(vec![
        Field::new("slide_id", DataType::Utf8, false),
        Field::new("x", DataType::Int64, false),
        Field::new("y", DataType::Int64, false),
        Field::new("tile_size", DataType::Int64, false),
        Field::new("embedding", embedding_type(dim, false), false),
        Field::new("extra", DataType::Utf8, false),
    ]));
    let values: Vec<f32> = rows
        .iter()
        .flat_map(|(_, x)| (0..dim).map(move |d| *x as f32 + d as f32 / 10.0))
        .collect();
    let DataType::FixedSizeList(item, _) = embedding_type(dim, false) else {
        unreachable!()
    };
    let emb =
        FixedSizeListArray::try_new(item, dim as i32, Arc::new(Float32Array::from(values)), None)
            .unwrap();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(vec![7; n])),
        Arc::new(Int64Array::from(vec![256; n])),
        Arc::new(emb),
        Arc::new(StringArray::from(vec!["z"; n])),
    ];
    write_batch(path, RecordBatch::try_new(schema, cols).unwrap());
}

fn write_batch(path: &Path, batch: RecordBatch) {
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(2))
        .build();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn features(path: &Path) -> FeaturesParams {
    FeaturesParams {
        path: path.to_string_lossy().into_owned(),
        ..Default::default()
    }
}

#[test]
fn features_reads_each_slides_rows_and_fails_missing_slides() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("feats.parquet");
    // Row groups of 2 rows: slide b spans two of them, between rows of a and c.
    write_features(
        &file,
        &[("a", 1), ("b", 2), ("b", 3), ("b", 4), ("c", 5)],
        4,
    );
    let slides = test_slides(&[
        ("b", None, None),
        ("a", None, None),
        ("missing", None, None),
    ]);
    let out = Harness::new(slides, dir.path().join("run"))
        .run(features(&file))
        .unwrap();
    assert_eq!(out.rows_of("b"), 3);
    assert_eq!(out.rows_of("a"), 1);
    let b: Vec<&RecordBatch> = out
        .batches
        .iter()
        .filter(|(s, _)| s == "b")
        .map(|(_, b)| b)
        .collect();
    let xs: Vec<i64> = b
        .iter()
        .flat_map(|b| {
            b.column(1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect();
    assert_eq!(xs, vec![2, 3, 4]);
    assert_eq!(embeddings_of(b[0])[0], vec![2.0, 2.1, 2.2, 2.3]);
    assert_eq!(b[0].num_columns(), 5, "extra columns are dropped");
    let report = out.report.unwrap();
    let errors = format!(
        "{:?}{:?}",
        report.errors,
        report.stage("features").unwrap().errors
    );
    assert!(
        errors.contains("missing") && errors.contains("feats.parquet"),
        "{errors}"
    );
    assert!(!out.ended.contains(&"missing".to_string()));
}

#[test]
fn features_reads_a_folder_and_a_slide_id_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("f");
    std::fs::create_dir(&folder).unwrap();
    write_features(&folder.join("s1.parquet"), &[("s1", 1), ("s1", 2)], 3);
    write_features(&folder.join("s2.parquet"), &[("s2", 9)], 3);
    std::fs::write(folder.join("notes.txt"), "not parquet").unwrap();
    let slides = test_slides(&[("s1", None, None), ("s2", None, None)]);
    let out = Harness::new(slides.clone(), dir.path().join("r1"))
        .run(features(&folder))
        .unwrap();
    assert_eq!((out.rows_of("s1"), out.rows_of("s2")), (2, 1));
    let pattern = FeaturesParams {
        path: format!("{}/{{slide_id}}.parquet", folder.display()),
        ..Default::default()
    };
    let out = Harness::new(slides, dir.path().join("r2"))
        .run(pattern.clone())
        .unwrap();
    assert_eq!((out.rows_of("s1"), out.rows_of("s2")), (2, 1));
    // A broken per-slide file (sorting first) fails its slide only.
    std::fs::write(folder.join("s0.parquet"), "truncated").unwrap();
    let three = test_slides(&[("s0", None, None), ("s1", None, None), ("s2", None, None)]);
    let out = Harness::new(three, dir.path().join("r3"))
        .run(pattern.clone())
        .unwrap();
    assert_eq!((out.rows_of("s1"), out.rows_of("s2")), (2, 1));
    let errors = format!(
        "{:?}",
        out.report.unwrap().stage("features").unwrap().errors
    );
    assert!(errors.contains("s0.parquet"), "{errors}");
    std::fs::remove_file(folder.join("s0.parquet")).unwrap();
    // The salt changes when a slide's file changes.
    let ctx = test_build_context(dir.path());
    let ctx = tessera_pipeline::BuildContext {
        slides: Arc::from(test_slides(&[("s1", None, None)])),
        ..ctx
    };
    let before = pattern.cache_salt(&ctx).unwrap();
    write_features(&folder.join("s1.parquet"), &[("s1", 1)], 3);
    assert_ne!(before, pattern.cache_salt(&ctx).unwrap());
}

#[test]
fn features_reports_missing_columns_and_wrong_types_by_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let no_emb = dir.path().join("no_emb.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("slide_id", DataType::Utf8, false),
        Field::new("x", DataType::Int64, false),
        Field::new("y", DataType::Int64, false),
        Field::new("tile_size", DataType::Int64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec!["a"])),
        Arc::new(Int64Array::from(vec![1])),
        Arc::new(Int64Array::from(vec![1])),
        Arc::new(Int64Array::from(vec![1])),
    ];
    write_batch(&no_emb, RecordBatch::try_new(schema, cols).unwrap());
    let err = features(&no_emb)
        .output_schema(&[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no_emb.parquet") && err.contains("missing column `embedding`"),
        "{err}"
    );

    let float_x = dir.path().join("float_x.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("slide_id", DataType::Utf8, false),
        Field::new("x", DataType::Float64, false),
        Field::new("y", DataType::Int64, false),
        Field::new("tile_size", DataType::Int64, false),
        Field::new("embedding", embedding_type(2, false), false),
    ]));
    let DataType::FixedSizeList(item, _) = embedding_type(2, false) else {
        unreachable!()
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec!["a"])),
        Arc::new(Float64Array::from(vec![1.5])),
        Arc::new(Int64Array::from(vec![1])),
        Arc::new(Int64Array::from(vec![1])),
        Arc::new(
            FixedSizeListArray::try_new(
                item,
                2,
                Arc::new(Float32Array::from(vec![1.0, 2.0])),
                None,
            )
            .unwrap(),
        ),
    ];
    write_batch(&float_x, RecordBatch::try_new(schema, cols).unwrap());
    let err = features(&float_x)
        .output_schema(&[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("float_x.parquet") && err.contains("column `x` is Float64"),
        "{err}"
    );
}

#[test]
fn features_accepts_variable_lists_of_doubles_as_written_by_pandas() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pandas.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("slide_id", DataType::Utf8, true),
        Field::new("x", DataType::Int32, true),
        Field::new("y", DataType::Int32, true),
        Field::new("tile_size", DataType::Int32, true),
        Field::new(
            "embedding",
            DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            true,
        ),
    ]));
    let lists = ListArray::from_iter_primitive::<Float64Type, _, _>(vec![
        Some(vec![Some(1.0), Some(2.0), Some(3.0)]),
        Some(vec![Some(4.0), Some(5.0), Some(6.0)]),
    ]);
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec!["a", "a"])),
        Arc::new(arrow::array::Int32Array::from(vec![0, 256])),
        Arc::new(arrow::array::Int32Array::from(vec![0, 0])),
        Arc::new(arrow::array::Int32Array::from(vec![256, 256])),
        Arc::new(lists),
    ];
    write_batch(&path, RecordBatch::try_new(schema, cols).unwrap());
    let out_schema = features(&path).output_schema(&[]).unwrap();
    assert_eq!(
        out_schema.field_with_name("embedding").unwrap().data_type(),
        &embedding_type(3, false)
    );
    let out = Harness::new(test_slides(&[("a", None, None)]), dir.path().join("r"))
        .run(features(&path))
        .unwrap();
    let all: Vec<Vec<f32>> = out
        .batches
        .iter()
        .flat_map(|(_, b)| embeddings_of(b))
        .collect();
    assert_eq!(all, vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]);
}

/// Writes `rows` in row groups of `group` rows.
fn write_grouped(path: &Path, rows: &[(&str, i64)], dim: usize, group: usize) {
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("t.parquet");
    write_features(&tmp, rows, dim);
    let batch = {
        let file = std::fs::File::open(&tmp).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    };
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Slide `s{i}` has `counts[i]` rows, x = 100 * i + row.
fn cohort(counts: &[usize]) -> (Vec<String>, Vec<(String, i64)>) {
    let ids: Vec<String> = (0..counts.len()).map(|i| format!("s{i}")).collect();
    let rows = counts
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| (0..n).map(move |r| (format!("s{i}"), 100 * i as i64 + r as i64)))
        .collect();
    (ids, rows)
}

fn xs_of(out: &tessera_pipeline::testing::HarnessOutput, id: &str) -> Vec<i64> {
    out.batches
        .iter()
        .filter(|(s, _)| s == id)
        .flat_map(|(_, b)| {
            b.column_by_name("x")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect()
}

fn stream_detail(out: &tessera_pipeline::testing::HarnessOutput, key: &str) -> u64 {
    out.report
        .as_ref()
        .unwrap()
        .stage("features")
        .unwrap()
        .details["parquet_stream"][key]
        .as_u64()
        .unwrap()
}

#[test]
fn features_streams_each_row_group_once_whatever_the_slides_per_group() {
    let dir = tempfile::tempdir().unwrap();
    // 7 slides of 1..9 rows in row groups of 4: many slides per group, and slides over
    // several groups.
    let counts = [3, 9, 1, 1, 6, 2, 5];
    let (ids, rows) = cohort(&counts);
    let rows: Vec<(&str, i64)> = rows.iter().map(|(s, x)| (s.as_str(), *x)).collect();
    let file = dir.path().join("c.parquet");
    write_grouped(&file, &rows, 3, 4);
    let groups = rows.len().div_ceil(4) as u64;
    let specs: Vec<(&str, Option<&str>, Option<&str>)> =
        ids.iter().map(|s| (s.as_str(), None, None)).collect();
    let out = Harness::new(test_slides(&specs), dir.path().join("r"))
        .run(features(&file))
        .unwrap();
    for (i, &n) in counts.iter().enumerate() {
        let want: Vec<i64> = (0..n as i64).map(|r| 100 * i as i64 + r).collect();
        assert_eq!(xs_of(&out, &format!("s{i}")), want, "slide s{i}");
    }
    assert_eq!(stream_detail(&out, "streamed_row_groups"), groups);
    assert_eq!(stream_detail(&out, "reread_slides"), 0);
    // The embeddings are the file's, row for row.
    let s1: Vec<Vec<f32>> = out
        .batches
        .iter()
        .filter(|(s, _)| s == "s1")
        .flat_map(|(_, b)| embeddings_of(b))
        .collect();
    assert_eq!(s1[8], vec![108.0, 108.1, 108.2]);
}

#[test]
fn features_out_of_file_order_holds_slides_within_the_buffer_or_rereads_them() {
    let dir = tempfile::tempdir().unwrap();
    let counts = [2, 5, 3, 4];
    let (_, rows) = cohort(&counts);
    let rows: Vec<(&str, i64)> = rows.iter().map(|(s, x)| (s.as_str(), *x)).collect();
    let file = dir.path().join("c.parquet");
    write_grouped(&file, &rows, 2, 3);
    // The dataset lists the slides backwards, and one the file does not hold.
    let slides = test_slides(&[
        ("s3", None, None),
        ("s2", None, None),
        ("nope", None, None),
        ("s1", None, None),
        ("s0", None, None),
    ]);
    for (buffer_mb, rereads) in [(1024, 0), (0, 3)] {
        let params = FeaturesParams {
            buffer_mb,
            ..features(&file)
        };
        let out = Harness::new(slides.clone(), dir.path().join(format!("r{buffer_mb}")))
            .run(params)
            .unwrap();
        for (i, &n) in counts.iter().enumerate() {
            let want: Vec<i64> = (0..n as i64).map(|r| 100 * i as i64 + r).collect();
            assert_eq!(
                xs_of(&out, &format!("s{i}")),
                want,
                "buffer {buffer_mb}: s{i}"
            );
        }
        // With no buffer, every slide read before it was asked for is read again on its own.
        assert_eq!(
            stream_detail(&out, "reread_slides"),
            rereads,
            "buffer {buffer_mb}"
        );
        let errors = format!(
            "{:?}",
            out.report.unwrap().stage("features").unwrap().errors
        );
        assert!(errors.contains("no rows for slide `nope`"), "{errors}");
    }
}
