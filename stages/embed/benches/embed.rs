//! Embedding throughput on CPU, batch 32 at 224 px, next to PyTorch 2.x on the same 2-core
//! machine (oneDNN, 2 threads, channels_last). Prints a markdown table.
//!
//! `cargo bench -p tessera-embed --bench embed` (env `EMBED_BENCH_BATCHES`, default 5;
//! each batch is timed alone and the best and median are printed).

/// The `tessera` binary's allocator (glibc's returns large freed buffers to the OS at every
/// layer, and page-faults them back in).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::Device;
use std::time::Instant;
use tessera_embed::{
    load_embedder, Architecture, EmbedderSpec, Preprocess, VitPooling, WeightsSource,
};

fn main() {
    let batches: usize = std::env::var("EMBED_BENCH_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let only: Option<String> = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let batch = 32;
    let px = 224;
    let tiles: Vec<Vec<u8>> = (0..batch)
        .map(|i| {
            (0..px * px * 3)
                .map(|j| ((i * 31 + j * 7) % 251) as u8)
                .collect()
        })
        .collect();
    let refs: Vec<&[u8]> = tiles.iter().map(Vec::as_slice).collect();
    let cases = [
        ("ResNet-18", Architecture::Resnet18, Some(47.0)),
        ("ResNet-50", Architecture::Resnet50, Some(15.7)),
        ("ViT-S/14", Architecture::VitS14, None),
    ];
    println!("| model | tessera img/s, embed incl. preprocessing: best (median) | forward only: best (median) | PyTorch img/s |");
    println!("|---|---|---|---|");
    for (name, arch, torch) in cases {
        if only
            .as_deref()
            .is_some_and(|o| !name.to_lowercase().contains(&o.to_lowercase()))
        {
            continue;
        }
        let spec = EmbedderSpec {
            arch,
            weights: WeightsSource::Random { seed: 0 },
            weights_prefix: String::new(),
            preprocess: Preprocess::default(),
            pooling: VitPooling::Cls,
        };
        let model = load_embedder(&spec, &Device::Cpu).expect("model");
        let input = model
            .preprocess()
            .to_tensor(&refs, px, &Device::Cpu)
            .expect("input");
        model.forward(&input).expect("warm-up");
        // Best and median of single-batch timings: on a shared machine the best batch is the
        // closest to an idle-machine figure, the median shows the spread.
        let time_batches = |f: &dyn Fn()| {
            let mut secs: Vec<f64> = (0..batches)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            secs.sort_by(f64::total_cmp);
            (batch as f64 / secs[0], batch as f64 / secs[secs.len() / 2])
        };
        let (fwd, fwd_med) = time_batches(&|| {
            model.forward(&input).expect("forward");
        });
        let (full, full_med) = time_batches(&|| {
            model.embed(&refs, px).expect("embed");
        });
        let torch = torch
            .map(|v: f64| format!("{v:.1}"))
            .unwrap_or_else(|| "not measured".into());
        println!("| {name} | {full:.1} ({full_med:.1}) | {fwd:.1} ({fwd_med:.1}) | {torch} |");
    }
}
