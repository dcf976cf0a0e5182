//! One SparseConvMIL training step (forward, backward, Adam) on one bag of 512-d embeddings,
//! two 3x3 submanifold convolutions of 32 channels, global max pooling and a 2-class head,
//! next to the PyTorch figures measured on the same 2-core CPU; then a full epoch over 1,000
//! bags of K=100 and where its time goes. Prints markdown tables.
//! Run: `cargo bench -p tessera-mil --bench train_step`
//! On a GPU: `TESSERA_BENCH_DEVICE=cuda cargo bench -p tessera-mil --features cuda --bench
//! train_step` (every step ends with a device synchronisation, so times are complete).
//!
//! The allocator is mimalloc, as in the `tessera` binary; `TESSERA_BENCH_ALLOC=system` runs the
//! same binary on the system allocator (glibc malloc), for A/B comparisons.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::Device;
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::Rng;
use tessera_mil::models::init::{named_vars, seeded_var_builder};
use tessera_mil::models::{
    build_model, Bag, BagBatch, GlobalPool, MilModel, ModelConfig, Pooling, Split,
};
use tessera_mil::seeding::stream_rng;
use tessera_mil::train::epochs::loss;
use tessera_mil::train::optim::{Adam, AdamConfig};

const DIM: usize = 512;

/// The device named by `TESSERA_BENCH_DEVICE` (`cpu`, default, or `cuda` / `cuda:N`).
fn bench_device() -> Device {
    let spec: tessera_pipeline::DeviceSpec = std::env::var("TESSERA_BENCH_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()
        .expect("TESSERA_BENCH_DEVICE: cpu, cuda or cuda:N");
    tessera_embed::candle_device(&spec).expect("device")
}

/// mimalloc (the binary's allocator) or, with `TESSERA_BENCH_ALLOC=system`, the system one.
struct BenchAllocator;

/// 0: not decided yet, 1: mimalloc, 2: system.
static CHOICE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

impl BenchAllocator {
    fn system() -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        match CHOICE.load(Relaxed) {
            0 => {
                // `var_os` allocates: decide on the system allocator first, then record.
                CHOICE.store(2, Relaxed);
                let system = std::env::var_os("TESSERA_BENCH_ALLOC").is_some_and(|v| v == "system");
                CHOICE.store(if system { 2 } else { 1 }, Relaxed);
                system
            }
            c => c == 2,
        }
    }
}

// SAFETY: every call is forwarded to one allocator, chosen once before any allocation the
// other could see: the first call decides (any allocation made while deciding goes to the
// system allocator, and the environment lookup frees what it allocates before returning).
unsafe impl std::alloc::GlobalAlloc for BenchAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::system() {
            std::alloc::System.alloc(layout)
        } else {
            mimalloc::MiMalloc.alloc(layout)
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if Self::system() {
            std::alloc::System.dealloc(ptr, layout)
        } else {
            mimalloc::MiMalloc.dealloc(ptr, layout)
        }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::system() {
            std::alloc::System.alloc_zeroed(layout)
        } else {
            mimalloc::MiMalloc.alloc_zeroed(layout)
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if Self::system() {
            std::alloc::System.realloc(ptr, layout, new_size)
        } else {
            mimalloc::MiMalloc.realloc(ptr, layout, new_size)
        }
    }
}

#[global_allocator]
static ALLOCATOR: BenchAllocator = BenchAllocator;

/// A bag of `k` instances on distinct random cells of a square grid of about `k / density`
/// cells (density = fraction of occupied cells, which sets the neighbours per site).
fn bag(k: usize, density: f64, seed: u64) -> Bag {
    let mut rng = stream_rng(seed, "bench-bag", None, "");
    let side = ((k as f64 / density).sqrt().ceil() as i64).max(1);
    let mut cells: Vec<[i64; 2]> = (0..side * side).map(|c| [c / side, c % side]).collect();
    cells.shuffle(&mut rng);
    cells.truncate(k);
    Bag {
        slide_id: format!("bag{seed}"),
        label_index: (seed % 2) as usize,
        split: Split::Train,
        dim: DIM,
        embeddings: (0..k * DIM)
            .map(|_| rng.random_range(0.0f32..1.0))
            .collect(),
        positions: Some(cells),
        pixels: None,
    }
}

struct Setup {
    model: Box<dyn MilModel>,
    optimizer: Adam,
}

fn setup(dev: &Device) -> Setup {
    let config = ModelConfig {
        pooling: Pooling::Sparseconvmil,
        input_dim: DIM,
        n_classes: 2,
        head_hidden: 32,
        dropout: 0.0,
        sparse_channels: vec![32, 32],
        sparse_kernel: 3,
        sparse_batch_norm: false,
        sparse_pool: GlobalPool::Max,
        attention_hidden: 128,
        lse_r: 1.0,
        instance_encoder: Vec::new(),
        encoder_dropout: 0.0,
        standardize: None,
    };
    let vars = VarMap::new();
    let vb = seeded_var_builder(&vars, 0, dev);
    let model = build_model(&config, &vb).expect("model");
    let named = named_vars(&vars);
    let optimizer = Adam::new(named, AdamConfig::default()).expect("adam");
    Setup { model, optimizer }
}

/// Time spent in each phase of a step.
#[derive(Default, Clone, Copy)]
struct Phases {
    batch: Duration,
    forward: Duration,
    backward: Duration,
    optimizer: Duration,
}

fn step(s: &mut Setup, bags: &[&Bag], phases: &mut Phases, dev: &Device) {
    let t = Instant::now();
    let input = BagBatch::from_bags(bags, dev).expect("batch");
    let t1 = Instant::now();
    let logits = s.model.forward(&input, true).expect("forward");
    let l = loss(&logits, bags, None, dev).expect("loss");
    black_box(l.to_scalar::<f32>().expect("scalar"));
    let t2 = Instant::now();
    let grads = l.backward().expect("backward");
    let t3 = Instant::now();
    s.optimizer.step(&grads).expect("adam");
    dev.synchronize().expect("synchronize");
    let t4 = Instant::now();
    phases.batch += t1 - t;
    phases.forward += t2 - t1;
    phases.backward += t3 - t2;
    phases.optimizer += t4 - t3;
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let dev = bench_device();
    let where_ = if dev.is_cpu() { "CPU" } else { "GPU" };
    let threads = rayon::current_num_threads();
    let allocator = if BenchAllocator::system() {
        "system allocator"
    } else {
        "mimalloc"
    };
    println!(
        "### SparseConvMIL training step (`tessera-mil`, {where_}, {threads} rayon threads, {allocator})\n"
    );
    println!("One bag, 512-d f32 embeddings on a sparse map of the given density (occupied fraction of the bounding square; 3x3 neighbours per site ~ 1 + 8 x density), SubmanifoldConv 3x3 512->32 and 32->32 (bias, ReLU), global max pool, head 32->32->2, cross-entropy, Adam (L2). Median of 200 steps after 20 warm-up steps.\n");
    println!("| K (tiles) | map density | tessera (median) | tessera (mean) | PyTorch (same CPU, density not recorded) | ratio PyTorch / tessera |");
    println!("|---|---|---|---|---|---|");
    let mut breakdown = Vec::new();
    for (k, density, torch_ms) in [
        (100usize, 0.5, 2.45f64),
        (100, 0.1, 2.45),
        (1000, 0.5, 5.88),
        (1000, 0.1, 5.88),
    ] {
        let b = bag(k, density, 1);
        let mut s = setup(&dev);
        let mut phases = Phases::default();
        for _ in 0..20 {
            step(&mut s, &[&b], &mut phases, &dev);
        }
        let mut phases = Phases::default();
        let mut times = Vec::with_capacity(200);
        for _ in 0..200 {
            let t = Instant::now();
            step(&mut s, &[&b], &mut phases, &dev);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let med = median(times);
        println!(
            "| {k} | {density} | {med:.2} ms | {mean:.2} ms | {torch_ms:.2} ms | {:.2}x |",
            torch_ms / med
        );
        breakdown.push((
            format!("one step, K={k}, density {density}"),
            phases,
            200usize,
        ));
    }

    // A full epoch: 1,000 bags of K=100, 2 bags per step (the original batch size).
    let bags: Vec<Bag> = (0..1000).map(|i| bag(100, 0.5, i)).collect();
    let mut s = setup(&dev);
    let mut phases = Phases::default();
    let t = Instant::now();
    let refs: Vec<&Bag> = bags.iter().collect();
    for chunk in refs.chunks(2) {
        step(&mut s, chunk, &mut phases, &dev);
    }
    let epoch = t.elapsed();
    println!("\n### One epoch: 1,000 bags of K=100 (density 0.5), batches of 2 bags (500 steps)\n");
    println!(
        "Total: **{:.2} s** ({:.2} ms per step).\n",
        epoch.as_secs_f64(),
        ms(epoch) / 500.0
    );
    breakdown.push(("epoch (500 steps of 2 bags)".into(), phases, 500));

    println!("### Where the time goes (per step)\n");
    println!("| run | build batch | forward + loss | backward | Adam |");
    println!("|---|---|---|---|---|");
    for (name, p, n) in breakdown {
        let n = n as f64;
        println!(
            "| {name} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms |",
            ms(p.batch) / n,
            ms(p.forward) / n,
            ms(p.backward) / n,
            ms(p.optimizer) / n
        );
    }
}
