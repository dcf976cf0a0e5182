//! Embedding throughput, batch 32 at 224 px, next to PyTorch 2.x on the same 2-core CPU
//! machine (oneDNN, 2 threads, channels_last). Prints a markdown table.
//!
//! `cargo bench -p tessera-embed --bench embed` (env `EMBED_BENCH_BATCHES`, default 5;
//! each batch is timed alone and the best and median are printed; `EMBED_BENCH_BATCH` sets
//! the batch size; `EMBED_BENCH_ROUNDS`, default 3, the paired tessera/PyTorch rounds). On a
//! GPU: `TESSERA_BENCH_DEVICE=cuda cargo bench -p tessera-embed --features cuda --bench embed`
//! (the PyTorch column is then the CPU figure, for scale); `EMBED_BENCH_COMPUTE=f16` (or
//! `bf16`) computes in half precision there.
//!
//! Rows: ResNet-18/50, DINOv2 ViT-S/14, and two foundation-model presets, UNI (ViT-L/16) and
//! Virchow2 (ViT-H/14, SwiGLU, registers). With `EMBED_BENCH_TORCH=1` (CPU), PyTorch is
//! measured in the same run, right after tessera's row, on the same architecture and batch
//! (`scripts/torch-embed-bench.py --cpu`, timm for the ViTs, `TORCH_THREADS` threads, default
//! 2), the ratio printed, and both rates in GFLOP/s (PyTorch's FLOP count of the model; as a
//! share of `EMBED_BENCH_PEAK_GFLOPS` where given). `scripts/embed-bench-side-by-side.sh` runs
//! it all. The ViT-H row is slow on a small CPU: pick rows with the first argument
//! (`cargo bench -p tessera-embed --bench embed -- vit-l`).

/// The `tessera` binary's allocator (glibc's returns large freed buffers to the OS at every
/// layer, and page-faults them back in).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;
use tessera_embed::{
    candle_device, load_embedder, Architecture, ComputeDtype, EmbedderSpec, Preprocess, Preset,
    VitPooling, WeightsSource,
};

/// PyTorch's img/s (best, median) and GFLOP per image for `model` on the CPU, from the
/// reference script.
fn torch_cpu(model: &str, batch: usize, runs: usize) -> Option<(f64, f64, f64)> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/torch-embed-bench.py"
    );
    let out = std::process::Command::new("python3")
        .args([
            script,
            "--cpu",
            model,
            &batch.to_string(),
            &runs.to_string(),
        ])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last()?).ok()?;
    Some((
        v["best"].as_f64()?,
        v["median"].as_f64()?,
        v["gflop"].as_f64()?,
    ))
}
use tessera_pipeline::DeviceSpec;

/// The best of the rounds' best rates and the median of their medians.
fn best_and_median(rounds: &[(f64, f64)]) -> (f64, f64) {
    let best = rounds.iter().map(|r| r.0).fold(0.0, f64::max);
    let mut meds: Vec<f64> = rounds.iter().map(|r| r.1).collect();
    meds.sort_by(f64::total_cmp);
    (best, meds.get(meds.len() / 2).copied().unwrap_or(0.0))
}

/// An img/s figure with two significant decimals below 10 (ViT-L/H run at ~1 img/s here).
fn img_s(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn main() {
    let batches: usize = std::env::var("EMBED_BENCH_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let only: Option<String> = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let batch: usize = std::env::var("EMBED_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
        .max(1);
    let device_spec: DeviceSpec = std::env::var("TESSERA_BENCH_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()
        .expect("TESSERA_BENCH_DEVICE: cpu, cuda or cuda:N");
    let device = candle_device(&device_spec).expect("device");
    let sync = || device.synchronize().expect("synchronize");
    let compute: ComputeDtype = serde_json::from_value(serde_json::Value::String(
        std::env::var("EMBED_BENCH_COMPUTE").unwrap_or_else(|_| "f32".into()),
    ))
    .expect("EMBED_BENCH_COMPUTE: f32, f16 or bf16");
    let rounds: usize = std::env::var("EMBED_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    println!("Device {device_spec}, batch {batch}, 224 px, compute {compute:?}.\n");
    let px = 224;
    let tiles: Vec<Vec<u8>> = (0..batch)
        .map(|i| {
            (0..px * px * 3)
                .map(|j| ((i * 31 + j * 7) % 251) as u8)
                .collect()
        })
        .collect();
    let refs: Vec<&[u8]> = tiles.iter().map(Vec::as_slice).collect();
    let same_run_torch =
        std::env::var("EMBED_BENCH_TORCH").is_ok_and(|v| v == "1") && device.is_cpu();
    let peak: Option<f64> = std::env::var("EMBED_BENCH_PEAK_GFLOPS")
        .ok()
        .and_then(|v| v.parse().ok());
    // (row, architecture or preset, the reference script's model)
    let cases = [
        ("ResNet-18", Architecture::Resnet18, None, "resnet18"),
        ("ResNet-50", Architecture::Resnet50, None, "resnet50"),
        ("ViT-S/14", Architecture::VitS14, None, "vit_s14"),
        (
            "UNI ViT-L/16",
            Architecture::Resnet18,
            Some(Preset::Uni),
            "uni",
        ),
        (
            "Virchow2 ViT-H/14",
            Architecture::Resnet18,
            Some(Preset::Virchow2),
            "virchow2",
        ),
    ];
    println!("| model | tessera img/s, embed incl. preprocessing: best (median) | forward only: best (median) | PyTorch img/s, forward: best (median) | forward / PyTorch: median of paired rounds (range) | GFLOP/img | tessera GFLOP/s | PyTorch GFLOP/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, arch, preset, torch_model) in cases {
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
            pooling: preset.map(|p| p.info().pooling).unwrap_or(VitPooling::Cls),
            compute,
            preset,
        };
        let model = load_embedder(&spec, &device).expect("model");
        let input = model
            .preprocess()
            .to_tensor(&refs, px, &device)
            .expect("input");
        model.forward(&input).expect("warm-up");
        sync();
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
        let (full, full_med) = time_batches(&|| {
            model.embed(&refs, px).expect("embed");
            sync();
        });
        // Paired rounds: tessera's batches, then PyTorch's, `rounds` times. This machine's
        // clock drifts by tens of percent within minutes (other tenants), so a ratio is only
        // taken between the two halves of one round, and the median over rounds is printed.
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut gflop = None;
        for _ in 0..if same_run_torch { rounds } else { 1 } {
            ours.push(time_batches(&|| {
                model.forward(&input).expect("forward");
                sync();
            }));
            if same_run_torch {
                if let Some((best, med, g)) = torch_cpu(torch_model, batch, batches) {
                    theirs.push((best, med));
                    gflop = Some(g);
                }
            }
        }
        let (fwd, fwd_med) = best_and_median(&ours);
        let measured = gflop.map(|g| {
            let (best, med) = best_and_median(&theirs);
            let mut ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(o, t)| o.0 / t.0).collect();
            ratios.sort_by(f64::total_cmp);
            (best, med, g, ratios)
        });
        let rate = |img_s: f64, gflop: f64| {
            let g = img_s * gflop;
            match peak {
                Some(p) => format!("{g:.0} ({:.0}%)", 100.0 * g / p),
                None => format!("{g:.0}"),
            }
        };
        let row = match measured {
            Some((best, med, gflop, ratios)) => format!(
                "{} ({}) | {:.2}x ({:.2}-{:.2}, {} rounds) | {gflop:.2} | {} | {}",
                img_s(best),
                img_s(med),
                ratios[ratios.len() / 2],
                ratios[0],
                ratios[ratios.len() - 1],
                ratios.len(),
                rate(fwd, gflop),
                rate(best, gflop)
            ),
            None => "not measured (EMBED_BENCH_TORCH=1) | | | | ".into(),
        };
        println!(
            "| {name} | {} ({}) | {} ({}) | {row} |",
            img_s(full),
            img_s(full_med),
            img_s(fwd),
            img_s(fwd_med)
        );
    }
}
