//! Timings of the MIL data path per bag (sampling, sparse map, augmentation) and of the
//! dataset-wide steps (splits, metrics), printed as a markdown table.
//! Run: `cargo bench -p tessera-mil --bench data_stages`

use arrow::array::{Int64Array, RecordBatch, StringArray, UInt32Array};
use arrow::compute::take_record_batch;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;
use tessera_mil::columns::embeddings_array;
use tessera_mil::metrics::ClassificationMetrics;
use tessera_mil::sample::draw_rows;
use tessera_mil::seeding::stream_rng;
use tessera_mil::sparse_map::{merge_bag, CollisionPolicy};
use tessera_mil::{splits, AugmentParams, SparseMapParams, SplitParams};
use tessera_pipeline::schema::embeddings_schema;
use tessera_pipeline::Slide;

const DIM: usize = 512;

/// A slide of `side x side` tiles on a 384 px grid with `DIM`-wide embeddings.
fn slide_tiles(side: i64) -> RecordBatch {
    let n = (side * side) as usize;
    let schema = embeddings_schema(DIM, false);
    let values: Vec<f32> = (0..n * DIM).map(|v| (v % 97) as f32 * 0.01).collect();
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["slide"; n])),
            Arc::new(Int64Array::from_iter_values(
                (0..n as i64).map(|k| (k % side) * 384),
            )),
            Arc::new(Int64Array::from_iter_values(
                (0..n as i64).map(|k| (k / side) * 384),
            )),
            Arc::new(Int64Array::from(vec![512; n])),
            embeddings_array(&values, schema.field(4).data_type()).expect("embeddings"),
        ],
    )
    .expect("batch")
}

/// Median seconds per call over `reps` calls.
fn time<T>(reps: usize, mut f: impl FnMut(usize) -> T) -> f64 {
    let mut samples: Vec<f64> = (0..reps)
        .map(|r| {
            let t = Instant::now();
            black_box(f(r));
            t.elapsed().as_secs_f64()
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn row(what: &str, size: &str, seconds: f64) {
    let (value, unit) = if seconds < 1e-3 {
        (seconds * 1e6, "µs")
    } else {
        (seconds * 1e3, "ms")
    };
    println!("| {what} | {size} | {value:.1} {unit} |");
}

fn main() {
    let slide = slide_tiles(100); // 10,000 tiles
    let k100 = {
        let rows = draw_rows(slide.num_rows(), 100, &mut stream_rng(0, "b", None, ""));
        take_record_batch(&slide, &UInt32Array::from(rows)).expect("take")
    };
    let map = SparseMapParams {
        downsample: Some(1.0),
        ..Default::default()
    };
    let mapped = |bag: &RecordBatch| {
        let (cells, _) = map.place_bag(bag).expect("place");
        merge_bag(bag, &cells, &vec![1; bag.num_rows()], CollisionPolicy::Mean)
            .expect("merge")
            .0
    };
    let map100 = mapped(&k100);
    let map_all = mapped(&slide);
    let augment = AugmentParams::default();

    println!("| step | size | median time |");
    println!("|---|---|---|");
    row(
        "sample: draw K tiles",
        "K=100 of 10,000 tiles, D=512",
        time(200, |r| {
            let rows = draw_rows(
                slide.num_rows(),
                100,
                &mut stream_rng(1, "b", Some(r as u64), "s"),
            );
            take_record_batch(&slide, &UInt32Array::from(rows)).expect("take")
        }),
    );
    row(
        "sparse_map (d=1, mean)",
        "100 tiles, D=512",
        time(200, |_| mapped(&k100)),
    );
    let coarse = SparseMapParams {
        downsample: Some(10.0),
        ..Default::default()
    };
    row(
        "sparse_map (d=10, mean, 100 cells)",
        "10,000 tiles, D=512",
        time(20, |_| {
            let (cells, _) = coarse.place_bag(&slide).expect("place");
            merge_bag(
                &slide,
                &cells,
                &vec![1; slide.num_rows()],
                CollisionPolicy::Mean,
            )
            .expect("merge")
        }),
    );
    row(
        "sparse_map (d=1, mean)",
        "10,000 tiles, D=512",
        time(20, |_| mapped(&slide)),
    );
    row(
        "augment (defaults)",
        "100 cells, D=512",
        time(200, |r| {
            augment
                .augment_bag(
                    &map100,
                    CollisionPolicy::Mean,
                    &mut stream_rng(2, "a", Some(r as u64), "s"),
                )
                .expect("augment")
        }),
    );
    row(
        "augment (defaults)",
        "10,000 cells, D=512",
        time(20, |r| {
            augment
                .augment_bag(
                    &map_all,
                    CollisionPolicy::Mean,
                    &mut stream_rng(2, "a", Some(r as u64), "s"),
                )
                .expect("augment")
        }),
    );

    let slides: Vec<_> = (0..10_000)
        .map(|i| {
            Arc::new(Slide {
                index: i,
                id: format!("s{i}"),
                path: None,
                label: Some(format!("class{}", i % 32)),
                split: None,
                case_id: Some(format!("p{}", i / 2)),
                mpp: None,
                extra: Default::default(),
            })
        })
        .collect();
    row(
        "splits::assign (stratified, by patient)",
        "10,000 slides, 32 classes",
        time(10, |r| {
            splits::assign(&slides, r as u64, &SplitParams::default()).expect("splits")
        }),
    );
    let n = 10_000;
    let c = 32;
    let labels: Vec<usize> = (0..n).map(|i| i % c).collect();
    let predicted: Vec<usize> = (0..n).map(|i| (i * 7) % c).collect();
    let probs: Vec<f32> = (0..n * c)
        .map(|v| ((v * 31) % 101) as f32 / 101.0 / c as f32)
        .collect();
    row(
        "metrics (all, incl. 32 one-vs-rest AUCs)",
        "10,000 slides, 32 classes",
        time(10, |_| {
            ClassificationMetrics::compute(&labels, &predicted, &probs, c).expect("metrics")
        }),
    );
}
