//! Forward + backward of one SubmanifoldConv2d 3x3, 32 -> 32 channels, batch 1 on a 2000 x 2000
//! grid, with 1 and 2 rayon threads, against spconv 2.3.8 (CPU) and pure PyTorch figures
//! measured on the same 2-core machine. Prints a markdown table.
//!
//! Run: `cargo bench -p tessera-sparse --bench subm_conv`
//! On a GPU: `TESSERA_BENCH_DEVICE=cuda cargo bench -p tessera-sparse --features cuda --bench
//! subm_conv` (candle's gather / matmul / scatter-add per kernel offset; rulebook on the host).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_sparse::{kernels, CoordSet, RuleKey, SparseModule, SparseTensor, SubmanifoldConv2d};

const C: usize = 32;
const GRID: i32 = 2000;

fn shuffle<T>(v: &mut [T], rng: &mut ChaCha8Rng) {
    for k in (1..v.len()).rev() {
        let r = rng.random_range(0..=k);
        v.swap(k, r);
    }
}

/// `n` distinct uniformly random sites, in random order.
fn random_sites(n: usize, seed: u64) -> Vec<[i32; 3]> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut seen = std::collections::HashSet::new();
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let s = [0, rng.random_range(0..GRID), rng.random_range(0..GRID)];
        if seen.insert(s) {
            v.push(s);
        }
    }
    v
}

/// A filled square of about `n` sites (8 neighbours each inside), in random order.
fn clustered_sites(n: usize, seed: u64) -> Vec<[i32; 3]> {
    let side = (n as f64).sqrt().round() as i32;
    let off = (GRID - side) / 2;
    let mut v: Vec<[i32; 3]> = (0..side)
        .flat_map(|i| (0..side).map(move |j| [0, off + i, off + j]))
        .collect();
    shuffle(&mut v, &mut ChaCha8Rng::seed_from_u64(seed));
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

struct Row {
    rulebook_ms: f64,
    fwd_bwd_ms: f64,
    total_ms: f64,
    gemm_gflops: f64,
}

/// The device named by `TESSERA_BENCH_DEVICE` (`cpu`, default, or `cuda` / `cuda:N`).
fn bench_device() -> Device {
    match std::env::var("TESSERA_BENCH_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0).expect("cuda:0"),
        Ok(other) => {
            let n = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .expect("TESSERA_BENCH_DEVICE: cpu, cuda or cuda:N");
            Device::new_cuda(n).expect("cuda device")
        }
    }
}

fn measure(coords: &[[i32; 3]], runs: usize, dev: &Device) -> Row {
    let dev = dev.clone();
    let sync = || dev.synchronize().expect("synchronize");
    let n = coords.len();
    let rulebook_ms = time_ms(runs, || {
        let cs = CoordSet::new(coords.to_vec(), 1).expect("coords");
        cs.rulebook(RuleKey::submanifold(3)).expect("rulebook");
    });
    let vm = VarMap::new();
    let conv = SubmanifoldConv2d::new(
        C,
        C,
        3,
        false,
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )
    .expect("conv");
    let feats =
        Var::from_tensor(&Tensor::randn(0f32, 1., (n, C), &dev).expect("randn")).expect("var");
    let x = SparseTensor::new(coords.to_vec(), feats.as_tensor().clone(), 1).expect("sparse");
    let fwd_bwd = || {
        let y = conv.forward(&x).expect("forward");
        let g = y.features().backward().expect("backward");
        assert!(g.get(conv.weight()).is_some());
        sync();
    };
    let fwd_bwd_ms = time_ms(runs, fwd_bwd);
    // End to end: fresh coordinate set (so the rulebook is rebuilt), forward, backward.
    let total_ms = time_ms(runs, || {
        let x = SparseTensor::new(coords.to_vec(), feats.as_tensor().clone(), 1).expect("sparse");
        let y = conv.forward(&x).expect("forward");
        y.features().backward().expect("backward");
        sync();
    });
    if !dev.is_cpu() {
        // The CPU kernels below do not run on a GPU.
        return Row {
            rulebook_ms,
            fwd_bwd_ms,
            total_ms,
            gemm_gflops: f64::NAN,
        };
    }
    // The three gather-GEMM kernels alone (forward, input grad, weight grad).
    let rb = x.rulebook(RuleKey::submanifold(3)).expect("rb");
    let xv: Vec<f32> = feats
        .as_tensor()
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("x");
    let wv: Vec<f32> = conv
        .weight()
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("w");
    let gemm_ms = time_ms(runs, || {
        let y = kernels::gather_conv(rb.forward_map(), &xv, C, &wv, C);
        let gx = kernels::gather_conv(rb.backward_map(), &y, C, &wv, C);
        let gw = kernels::weight_grad(rb.forward_map(), &xv, C, &y, C);
        assert_eq!(gx.len() + gw.len(), n * C + 9 * C * C);
    });
    let flops = 3.0 * 2.0 * (rb.num_pairs() * C * C) as f64;
    Row {
        rulebook_ms,
        fwd_bwd_ms,
        total_ms,
        gemm_gflops: flops / (gemm_ms * 1e-3) / 1e9,
    }
}

/// Machine FLOP rate: a 2048^3 f32 GEMM with the same micro-kernels.
fn peak_gflops(threads: usize) -> f64 {
    let m = 2048;
    let a = vec![1f32; m * m];
    let b = vec![1f32; m * m];
    let mut c = vec![0f32; m * m];
    let par = if threads == 1 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    };
    let ms = time_ms(5, || unsafe {
        // SAFETY: three m x m row-major buffers.
        gemm::gemm(
            m,
            m,
            m,
            c.as_mut_ptr(),
            1,
            m as isize,
            false,
            a.as_ptr(),
            1,
            m as isize,
            b.as_ptr(),
            1,
            m as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    });
    2.0 * (m * m * m) as f64 / (ms * 1e-3) / 1e9
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cases: Vec<(&str, Vec<[i32; 3]>, f64, f64)> = vec![
        ("random 10k", random_sites(10_000, 1), 3.79, 7.19),
        ("random 100k", random_sites(100_000, 2), 41.8, 56.9),
        ("clustered 10k", clustered_sites(10_000, 3), 12.3, 14.7),
        ("clustered 100k", clustered_sites(100_000, 4), 162.0, 145.0),
    ];
    let dev = bench_device();
    if !dev.is_cpu() {
        println!("| sites | device | rulebook ms (host) | fwd+bwd ms (cached rulebook) | total ms (rulebook + fwd + bwd) | spconv 2.3.8, 1 CPU thr | PyTorch, 2 CPU thr |");
        println!("|---|---|---|---|---|---|---|");
        for (name, coords, spconv, torch) in &cases {
            let r = measure(coords, if quick { 3 } else { 41 }, &dev);
            println!(
                "| {name} | GPU | {:.2} | {:.2} | {:.2} | {spconv} ms | {torch} ms |",
                r.rulebook_ms, r.fwd_bwd_ms, r.total_ms
            );
        }
        return;
    }
    let mut peaks = Vec::new();
    println!("| sites | threads | rulebook ms | fwd+bwd ms (cached rulebook) | total ms (rulebook + fwd + bwd) | GEMM-part GFLOP/s | spconv 2.3.8, 1 thr | PyTorch, 2 thr |");
    println!("|---|---|---|---|---|---|---|---|");
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            peaks.push((threads, peak_gflops(threads)));
            for (name, coords, spconv, torch) in &cases {
                let runs = match (quick, coords.len() > 50_000) {
                    (true, _) => 3,
                    (false, true) => 15,
                    (false, false) => 41,
                };
                let r = measure(coords, runs, &dev);
                println!(
                    "| {name} | {threads} | {:.2} | {:.2} | {:.2} | {:.1} | {spconv} ms | {torch} ms |",
                    r.rulebook_ms, r.fwd_bwd_ms, r.total_ms, r.gemm_gflops
                );
            }
        });
    }
    println!();
    for (t, p) in peaks {
        println!("Machine f32 GEMM rate (2048^3, gemm crate), {t} thread(s): {p:.1} GFLOP/s");
    }
}
