//! One training step (forward, cross-entropy, backward, gradient clipping, Adam with L2 decay)
//! of SparseConvMIL at `TrainParams::default()` (standardisation, instance encoder 512->128,
//! two 3x3 submanifold convolutions of 32 channels, global pooling, head 32->32->2) on one bag
//! of 512-d embeddings at K=100/1000 and two map densities, one row per baseline family
//! (attention, embedding-level mean, instance-level max) and TransMIL (`transmil` on the
//! authors' square, `transmil_map` on the sparse map) on the same bags, then an epoch of
//! 1,000 bags of K=100 in steps of 2 bags, and where tessera's time goes. Prints markdown.
//!
//! Every row is measured against PyTorch **in the same run**: the bench drives
//! `scripts/torch-train-bench.py` (the same models and step in PyTorch, as many threads as
//! tessera's rayon pool) as a worker process and alternates short rounds (tessera 20 steps,
//! PyTorch 20 steps, order flipped every round), so both see the same machine load; it prints
//! both medians and their ratio. Before timing, both sides train a few steps from tessera's
//! initial weights on the same inputs and the losses are compared. The timed steps flip the
//! bag's label every step and every timed epoch starts from a fresh model, so that neither side
//! fits its data to a zero loss and ends up timing subnormal floats. Without
//! `python3 -c "import torch"` the PyTorch columns are skipped (`TESSERA_BENCH_TORCH=0` skips
//! them too; `TESSERA_BENCH_PYTHON` picks the interpreter, `TESSERA_BENCH_TORCH_SCRIPT` the
//! script).
//!
//! Run: `cargo bench -p tessera-mil --bench train_step`
//! On a GPU: `TESSERA_BENCH_DEVICE=cuda cargo bench -p tessera-mil --features cuda --bench
//! train_step` (every step ends with a device synchronisation, so times are complete; PyTorch
//! then runs on the GPU too, if its build has CUDA).
//!
//! The allocator is mimalloc, as in the `tessera` binary; `TESSERA_BENCH_ALLOC=system` runs the
//! same binary on the system allocator (glibc malloc), for A/B comparisons.

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Value};
use tessera_mil::models::init::{named_vars, seeded_var_builder};
use tessera_mil::models::Standardization;
use tessera_mil::models::{
    build_any, AnyModel, Bag, BagBatch, MilModel, MilNet, ModelConfig, Pooling, Split,
};
use tessera_mil::seeding::stream_rng;
use tessera_mil::train::epochs::total_loss;
use tessera_mil::train::objective::Objective;
use tessera_mil::train::optim::Adam;
use tessera_mil::train::TrainParams;

const DIM: usize = 512;
const CLASSES: usize = 2;
/// Interleaved rounds per row, and steps per side in each round: short rounds, so that both
/// sides sample the same load on a shared machine.
const ROUNDS: usize = 10;
const STEPS: usize = 20;
const WARMUP: usize = 20;
/// Interleaved epochs per side.
const EPOCH_ROUNDS: usize = 5;
/// Training steps compared in the same-function check.
const CHECK_STEPS: usize = 3;
/// Largest relative difference of a check loss that counts as equal.
const CHECK_TOL: f64 = 1e-4;

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

/// A model at the training defaults with its optimizer: what `train` builds for `pooling`.
struct Setup {
    config: ModelConfig,
    params: TrainParams,
    vars: VarMap,
    model: MilNet,
    optimizer: Adam,
}

/// `TrainParams::default()` with `pooling`, so the bench follows the defaults; inputs
/// standardised with the statistics of `bags` (the training bags) when the defaults say so.
fn setup(pooling: Pooling, bags: &[&Bag], dev: &Device) -> Setup {
    let params = TrainParams {
        pooling,
        ..TrainParams::default()
    };
    let standardize = if params.standardizes() {
        Standardization::fit(bags.iter().copied()).map(|f| f.stats)
    } else {
        None
    };
    Setup::build(params.model_config(DIM, CLASSES, standardize), params, dev)
}

impl Setup {
    /// The model of `config` (parameters seeded as the trainer seeds them) and its Adam.
    fn build(config: ModelConfig, params: TrainParams, dev: &Device) -> Setup {
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, 0, dev);
        let model = build_any(&config, &vb).expect("model");
        let optimizer =
            Adam::new(named_vars(&vars), params.train_config(0).optimizer).expect("adam");
        Setup {
            config,
            params,
            vars,
            model,
            optimizer,
        }
    }

    /// A freshly initialised model and optimizer of the same architecture and statistics.
    fn fresh(&self, dev: &Device) -> Setup {
        Setup::build(self.config.clone(), self.params.clone(), dev)
    }
}

/// Time spent in each phase of a step.
#[derive(Default, Clone, Copy)]
struct Phases {
    batch: Duration,
    forward: Duration,
    backward: Duration,
    optimizer: Duration,
}

/// One step as `Trainer::step` (stages/mil/src/train/loop.rs) takes it, timed by phase:
/// batch, forward, loss (read back, as the trainer checks it is finite), backward, global
/// gradient norm and clipping scale, Adam. Returns the loss.
fn step(s: &mut Setup, bags: &[&Bag], phases: &mut Phases, dev: &Device) -> f32 {
    let t = Instant::now();
    let input = BagBatch::from_bags(bags, dev).expect("batch");
    let t1 = Instant::now();
    let labels: Vec<usize> = bags.iter().map(|b| b.label_index).collect();
    let output = s
        .model
        .forward_train(&input, Some(&labels))
        .expect("forward");
    let l = total_loss(&Objective::Classification, &output, bags, None, dev).expect("loss");
    let value = black_box(l.to_scalar::<f32>().expect("scalar"));
    let t2 = Instant::now();
    let grads = l.backward().expect("backward");
    let t3 = Instant::now();
    let clip = s.params.grad_clip;
    let scale = if clip > 0.0 {
        let norm = s.optimizer.grad_norm(&grads).expect("gradient norm");
        (clip / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    s.optimizer.step_scaled(&grads, scale).expect("adam");
    dev.synchronize().expect("synchronize");
    let t4 = Instant::now();
    phases.batch += t1 - t;
    phases.forward += t2 - t1;
    phases.backward += t3 - t2;
    phases.optimizer += t4 - t3;
    value
}

/// Matmul FLOPs of one step, estimated simply: 3 x the forward's (backward ~ 2 x forward),
/// counting the sparse convolutions over active (site, neighbour) pairs only, as a rulebook
/// computes them. Element-wise work is left out. The same count divides both sides' times.
fn step_flops(config: &ModelConfig, bags: &[&Bag]) -> f64 {
    let n: usize = bags.iter().map(|b| b.len()).sum();
    let (n, b) = (n as f64, bags.len() as f64);
    let mut flops = 0.0;
    let mut width = config.input_dim;
    for &w in &config.instance_encoder {
        flops += 2.0 * n * (width * w) as f64;
        width = w;
    }
    let head = |rows: f64, cin: usize| {
        let h = config.head_hidden;
        if h == 0 {
            2.0 * rows * (cin * config.n_classes) as f64
        } else {
            2.0 * rows * (cin * h + h * config.n_classes) as f64
        }
    };
    flops += match config.pooling {
        Pooling::Sparseconvmil => {
            let pairs = active_pairs(bags, config.sparse_kernel) as f64;
            let mut f = 0.0;
            for &c in &config.sparse_channels {
                f += 2.0 * pairs * (width * c) as f64;
                width = c;
            }
            f + head(b, width)
        }
        Pooling::Attention | Pooling::GatedAttention => {
            let gates = if config.pooling == Pooling::GatedAttention {
                2.0
            } else {
                1.0
            };
            let a = config.attention_hidden as f64;
            gates * 2.0 * n * width as f64 * a
                + 2.0 * n * a
                + 2.0 * n * width as f64
                + head(b, width)
        }
        Pooling::InstanceMax | Pooling::InstanceMean | Pooling::InstanceLse => head(n, width),
        Pooling::Max | Pooling::Mean | Pooling::Lse => head(b, width),
        Pooling::Abmil | Pooling::ClamSb | Pooling::ClamMb => {
            // Gated attention with one branch (or one per class), attention-weighted sums; the
            // instance classifiers of the clustering see 2k instances only.
            let a = config.clam_dsmil.abmil_hidden as f64;
            let branches = if config.pooling == Pooling::ClamMb {
                config.n_classes as f64
            } else {
                1.0
            };
            2.0 * 2.0 * n * width as f64 * a
                + 2.0 * n * a * branches
                + 2.0 * n * width as f64 * branches
                + head(b * branches, width)
        }
        Pooling::Dsmil => {
            // Instance classifier, two query layers, attention logits and sums per class.
            let (c, q) = (
                config.n_classes as f64,
                config.clam_dsmil.dsmil_query as f64,
            );
            2.0 * n * width as f64 * c
                + 2.0 * n * (width as f64 * q + q * q)
                + 2.0 * n * q * c
                + 2.0 * n * width as f64 * c
                + head(b, width * config.n_classes)
        }
        Pooling::Transmil | Pooling::TransmilMap => {
            let square = config.pooling == Pooling::Transmil;
            bags.iter()
                .map(|bag| transmil_flops(bag.len(), width, square))
                .sum::<f64>()
                + head(b, width)
        }
    };
    3.0 * flops
}

/// Forward FLOPs of TransMIL's two Nystrom layers and PPEG for one bag of `n` instances of
/// width `d` (multiply-adds x 2; softmaxes, norms and the pseudo-inverse's additions left out).
fn transmil_flops(n: usize, d: usize, square: bool) -> f64 {
    let tokens = if square {
        let side = tessera_mil::models::transmil::ceil_sqrt(n);
        side * side
    } else {
        n
    };
    let a = tessera_mil::models::nystrom::NystromConfig::transmil(d);
    let (m, inner, h) = (a.landmarks, a.heads * a.dim_head, a.heads);
    let seq = tokens + 1;
    let np = seq.div_ceil(m) * m;
    let (np, m, d, inner, h) = (np as f64, m as f64, d as f64, inner as f64, h as f64);
    let layer = 2.0 * np * d * 3.0 * inner // to_qkv
        + 2.0 * 2.0 * np * m * inner // sim1, sim3
        + 2.0 * m * m * inner // sim2
        + a.pinv_iterations as f64 * 3.0 * 2.0 * h * m * m * m + 2.0 * h * m * m * m // pinv
        + 2.0 * m * np * inner // attn3 @ v
        + 2.0 * h * np * m * m // attn1 @ pinv
        + 2.0 * np * m * inner // (..) @ (attn3 v)
        + 2.0 * a.residual_kernel as f64 * np * inner // value convolution
        + 2.0 * np * inner * d; // to_out
    2.0 * layer + 2.0 * 49.0 * tokens as f64 * d
}

/// (site, active neighbour) pairs of a `kernel` x `kernel` submanifold convolution, the site
/// itself included: about `K * (1 + 8 x density)` for 3 x 3.
fn active_pairs(bags: &[&Bag], kernel: usize) -> usize {
    let r = (kernel / 2) as i64;
    bags.iter()
        .map(|b| {
            let pos = b.positions.as_deref().unwrap_or(&[]);
            let cells: HashSet<[i64; 2]> = pos.iter().copied().collect();
            pos.iter()
                .map(|p| {
                    (-r..=r)
                        .flat_map(|di| (-r..=r).map(move |dj| [p[0] + di, p[1] + dj]))
                        .filter(|c| cells.contains(c))
                        .count()
                })
                .sum::<usize>()
        })
        .sum()
}

/// The PyTorch worker (`scripts/torch-train-bench.py --serve`): one JSON request per line on
/// its stdin, one JSON reply per line on its stdout. It waits on stdin while tessera runs, and
/// tessera waits on its reply while it runs, so the two never compete for the cores.
struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    version: String,
    /// Whether the worker can import `nystrom_attention` (for the TransMIL rows).
    nystrom: bool,
}

impl Torch {
    /// The worker, or why the PyTorch columns are skipped.
    fn start(dev: &Device) -> Result<Torch, String> {
        const HOW: &str = "install PyTorch for this interpreter (CPU build: `pip install torch \
             --index-url https://download.pytorch.org/whl/cpu`) or point TESSERA_BENCH_PYTHON \
             at one that has it";
        if std::env::var_os("TESSERA_BENCH_TORCH").is_some_and(|v| v == "0") {
            return Err("TESSERA_BENCH_TORCH=0".into());
        }
        let python = std::env::var("TESSERA_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
        let has_torch = Command::new(&python)
            .args(["-c", "import torch"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_torch {
            return Err(format!("`{python} -c \"import torch\"` failed: {HOW}"));
        }
        let script = torch_script().ok_or_else(|| {
            "scripts/torch-train-bench.py not found (set TESSERA_BENCH_TORCH_SCRIPT)".to_string()
        })?;
        // As many threads as tessera's rayon pool (2 on the project's machine).
        let mut child = Command::new(&python)
            .arg(&script)
            .args(["--serve", "--threads"])
            .arg(rayon::current_num_threads().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", script.display()))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut torch = Torch {
            child,
            stdin,
            stdout,
            version: String::new(),
            nystrom: false,
        };
        let hello = torch.read()?;
        torch.nystrom = hello["nystrom_attention"] == Value::Bool(true);
        if !dev.is_cpu() && hello["cuda"] != Value::Bool(true) {
            return Err("this PyTorch has no CUDA device; the comparison needs one".into());
        }
        torch.version = format!(
            "torch {}, {} threads",
            hello["torch"].as_str().unwrap_or("?"),
            hello["threads"]
        );
        Ok(torch)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| format!("reading the PyTorch worker: {e}"))?;
        if line.is_empty() {
            return Err("the PyTorch worker exited (its error is above)".into());
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
        match v.get("error") {
            Some(e) => Err(format!("PyTorch worker: {e}")),
            None => Ok(v),
        }
    }

    /// Sends `msg` and waits for the reply (bench code: a failed worker stops the bench).
    fn call(&mut self, msg: Value) -> Value {
        writeln!(self.stdin, "{msg}")
            .and_then(|()| self.stdin.flush())
            .expect("writing to the PyTorch worker");
        self.read().expect("PyTorch worker")
    }

    /// A model of `s`'s architecture and optimizer on bags of the given (k, density, seed).
    fn setup(
        &mut self,
        id: &str,
        s: &Setup,
        bags: &[(usize, f64, u64)],
        batch: usize,
        alternate_labels: bool,
        dev: &Device,
    ) {
        self.call(json!({
            "cmd": "setup", "id": id, "model": arch_json(&s.config),
            "standardize": s.config.standardize.is_some(),
            "optimizer": s.params.train_config(0).optimizer,
            "grad_clip": s.params.grad_clip, "bags": bags, "batch": batch,
            "device": if dev.is_cpu() { "cpu" } else { "cuda" },
            "alternate_labels": alternate_labels,
        }));
    }

    /// Seconds of one pass over the bags of `id`, from a freshly initialised model.
    fn epoch(&mut self, id: &str) -> f64 {
        self.call(json!({"cmd": "epoch", "id": id}))["s"]
            .as_f64()
            .expect("seconds")
    }

    /// Per-step milliseconds of `n` steps.
    fn steps(&mut self, id: &str, n: usize) -> Vec<f64> {
        let r = self.call(json!({"cmd": "steps", "id": id, "n": n}));
        r["ms"]
            .as_array()
            .expect("ms")
            .iter()
            .map(|v| v.as_f64().expect("ms"))
            .collect()
    }
}

impl Drop for Torch {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// `TESSERA_BENCH_TORCH_SCRIPT`, else the script beside this crate, else `scripts/` of the
/// working directory (a packed bench binary run from the repository root).
fn torch_script() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TESSERA_BENCH_TORCH_SCRIPT") {
        return Some(p.into());
    }
    [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/torch-train-bench.py"),
        PathBuf::from("scripts/torch-train-bench.py"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The architecture for the worker: the model config without the statistics (the worker fits
/// its own on its bags, or reads tessera's in the check).
fn arch_json(config: &ModelConfig) -> Value {
    serde_json::to_value(ModelConfig {
        standardize: None,
        ..config.clone()
    })
    .expect("model config")
}

/// Writes `s`'s current parameters (tessera's names), the bags' embeddings, positions, bag of
/// each instance, labels, and the standardisation statistics as safetensors.
fn export(s: &Setup, bags: &[&Bag], path: &std::path::Path) {
    let cpu = Device::Cpu;
    let mut t: HashMap<String, Tensor> = named_vars(&s.vars)
        .into_iter()
        .map(|(name, v)| (name, v.as_tensor().to_device(&cpu).expect("weights")))
        .collect();
    let n: usize = bags.iter().map(|b| b.len()).sum();
    let x: Vec<f32> = bags
        .iter()
        .flat_map(|b| b.embeddings.iter().copied())
        .collect();
    let pos: Vec<i64> = bags
        .iter()
        .flat_map(|b| b.positions.clone().unwrap_or_default())
        .flatten()
        .collect();
    let of: Vec<i64> = bags
        .iter()
        .enumerate()
        .flat_map(|(i, b)| std::iter::repeat_n(i as i64, b.len()))
        .collect();
    let labels: Vec<i64> = bags.iter().map(|b| b.label_index as i64).collect();
    let mut put = |name: &str, v: Tensor| t.insert(name.into(), v);
    put("x", Tensor::from_vec(x, (n, DIM), &cpu).expect("x"));
    put(
        "coords",
        Tensor::from_vec(pos, (n, 2), &cpu).expect("coords"),
    );
    put("bag", Tensor::from_vec(of, n, &cpu).expect("bag"));
    put("labels", Tensor::new(labels, &cpu).expect("labels"));
    if let Some(st) = &s.config.standardize {
        put(
            "standardize.mean",
            Tensor::new(st.mean.as_slice(), &cpu).expect("mean"),
        );
        put(
            "standardize.std",
            Tensor::new(st.std.as_slice(), &cpu).expect("std"),
        );
    }
    candle_core::safetensors::save(&t, path).expect("writing the check file");
}

/// Trains a fresh tessera model `CHECK_STEPS` steps and has PyTorch train the same weights on
/// the same inputs; returns both sides' losses.
fn check(
    torch: &mut Torch,
    pooling: Pooling,
    bags: &[&Bag],
    dir: &std::path::Path,
) -> (Vec<f32>, Vec<f64>) {
    let cpu = Device::Cpu;
    let mut s = setup(pooling, bags, &cpu);
    // TransMIL's attention dropout (0.1) would make the two sides' steps differ by chance.
    if let AnyModel::TransMil(m) = &mut s.model.pooling {
        m.set_attention_dropout(0.0);
    }
    let path = dir.join(format!(
        "{}-{}x{}.safetensors",
        pooling.name(),
        bags.len(),
        bags[0].len()
    ));
    export(&s, bags, &path);
    let mut phases = Phases::default();
    let ours: Vec<f32> = (0..CHECK_STEPS)
        .map(|_| step(&mut s, bags, &mut phases, &cpu))
        .collect();
    let r = torch.call(json!({
        "cmd": "check", "path": path, "model": arch_json(&s.config), "attention_dropout": 0.0,
        "optimizer": s.params.train_config(0).optimizer, "grad_clip": s.params.grad_clip,
        "steps": CHECK_STEPS,
    }));
    let theirs = r["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|v| v.as_f64().expect("loss"))
        .collect();
    (ours, theirs)
}

fn median(v: Vec<f64>) -> f64 {
    quantile(v, 0.5)
}

/// The `q` quantile (nearest rank) of `v`: the 10th percentile is the fast steps, which load
/// from other processes disturbs least.
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One row of the step table: a model on one bag, both sides' step times.
struct Row {
    pooling: Pooling,
    k: usize,
    density: f64,
    /// One bag with label 0 and with label 1: steps alternate between them, so that the loss
    /// stays near ln 2. Trained on one bag with a fixed label, either side fits it to a zero
    /// loss within ~30 steps and then times subnormal-float arithmetic (tessera without
    /// standardisation: 2.9 -> 55 ms per step at K=100), not training.
    bags: [Bag; 2],
    /// Steps taken.
    n: usize,
    setup: Setup,
    phases: Phases,
    ours: Vec<f64>,
    theirs: Vec<f64>,
    /// PyTorch / tessera median of each round.
    round_ratios: Vec<f64>,
}

impl Row {
    fn id(&self) -> String {
        format!("{}-{}-{}", self.pooling.name(), self.k, self.density)
    }

    /// `n` tessera steps; per-step milliseconds.
    fn run(&mut self, n: usize, dev: &Device) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let bags = [&self.bags[self.n % 2]];
                self.n += 1;
                let t = Instant::now();
                step(&mut self.setup, &bags, &mut self.phases, dev);
                ms(t.elapsed())
            })
            .collect()
    }
}

/// The machine's load average (1, 5, 15 min), where Linux gives it.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Torch {
    /// Whether the worker runs `pooling` (TransMIL needs lucidrains' `nystrom-attention`).
    fn serves(&self, pooling: Pooling) -> bool {
        self.nystrom || !matches!(pooling, Pooling::Transmil | Pooling::TransmilMap)
    }
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
    let mut torch = match Torch::start(&dev) {
        Ok(t) => Some(t),
        Err(why) => {
            println!("**PyTorch columns skipped**: {why}.\n");
            None
        }
    };
    let reference = torch
        .as_ref()
        .map_or("skipped".into(), |t| t.version.clone());
    println!(
        "### Training step, tessera vs PyTorch ({where_}; tessera: {threads} rayon threads, {allocator}; PyTorch: {reference})\n"
    );
    println!("{}; load average at start {}.\n", now_utc(), load());
    let defaults = TrainParams::default();
    println!(
        "Models at `TrainParams::default()`: standardised inputs, instance encoder {:?} (Linear + ReLU), then sparseconvmil = SubmanifoldConv {k}x{k} {:?} (bias, ReLU) + global {} pool, or attention (Ilse: hidden {}) / mean / instance_max, or transmil / transmil_map (TransMIL at width 128: 8 heads of 16, 64 landmarks, 6 pinv iterations, attention dropout 0.1 in the timed steps, 0 in the check; one bag at a time); head Linear(C, {h}) + ReLU + Linear({h}, {CLASSES}); cross-entropy; gradient clipping at norm {}; Adam lr {}, L2 weight decay {}. One bag of {DIM}-d f32 embeddings, its label flipped every step (a fixed label is fitted to a zero loss within ~30 steps, after which both sides time subnormal floats); density = occupied fraction of the bag's bounding square (3x3 neighbours per site ~ 1 + 8 x density). {ROUNDS} interleaved rounds of {STEPS} steps per side (order flipped every round) after {WARMUP} warm-up steps; medians (and 10th percentiles) over all {} steps of each side; per-round ratios: of the two medians in each round. GFLOP/s: 3 x the forward's matmul FLOPs (convolutions over active neighbour pairs only) per step time.\n",
        defaults.instance_encoder,
        defaults.sparse_channels,
        format!("{:?}", defaults.sparse_pool).to_lowercase(),
        defaults.attention_hidden,
        defaults.grad_clip,
        defaults.lr,
        defaults.weight_decay,
        ROUNDS * STEPS,
        k = defaults.sparse_kernel,
        h = defaults.head_hidden,
    );

    println!(
        "abmil, clam_sb, clam_mb, dsmil: tessera at its defaults for them (CLAM's gated attention of {} units with dropout {}, k = {}, bag weight {}; DSMIL's {}-unit queries) against a published implementation behind the same standardisation and encoder: torchmil's ABMIL, CLAM_SB (its default smooth top-1 SVM instance loss) and DSMIL (binary, BCE on one logit), and CLAM-MB written in the script after the authors' model_clam.py (torchmil has none). Their parameters differ from tessera's, so the same-weights check below covers tessera's own formulations only.\n",
        defaults.abmil_hidden,
        defaults.abmil_dropout,
        defaults.clam_k,
        defaults.clam_bag_weight,
        defaults.dsmil_query,
    );

    // Same function: both sides train the same weights on the same inputs.
    if let Some(t) = torch.as_mut() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let b100 = bag(100, 0.5, 1);
        let b1000 = bag(1000, 0.1, 1);
        let pair = [bag(100, 0.5, 2), bag(100, 0.5, 3)];
        let cases: Vec<(Pooling, Vec<&Bag>)> = vec![
            (Pooling::Sparseconvmil, vec![&b100]),
            (Pooling::Sparseconvmil, vec![&b1000]),
            (Pooling::Sparseconvmil, pair.iter().collect()),
            (Pooling::Attention, vec![&b100]),
            (Pooling::Mean, vec![&b100]),
            (Pooling::InstanceMax, vec![&b100]),
            (Pooling::Transmil, vec![&b100]),
            (Pooling::Transmil, pair.iter().collect()),
            (Pooling::TransmilMap, vec![&b100]),
        ];
        println!("Same weights, same inputs (tessera's initial weights and bags exported as safetensors, loaded by the script), loss of the first {CHECK_STEPS} training steps:\n");
        println!("| model | bags x K | tessera | PyTorch | largest relative difference |");
        println!("|---|---|---|---|---|");
        for (pooling, bags) in &cases {
            if !t.serves(*pooling) {
                println!(
                    "| {} | {} x {} | - | - | skipped: `pip install nystrom-attention` for the worker |",
                    pooling.name(),
                    bags.len(),
                    bags[0].len()
                );
                continue;
            }
            let (ours, theirs) = check(t, *pooling, bags, dir.path());
            let worst = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (f64::from(*a) - b).abs() / b.abs().max(f64::MIN_POSITIVE))
                .fold(0.0, f64::max);
            let fmt = |v: Vec<String>| v.join(", ");
            println!(
                "| {} | {} x {} | {} | {} | {worst:.1e}{} |",
                pooling.name(),
                bags.len(),
                bags[0].len(),
                fmt(ours.iter().map(|v| format!("{v:.6}")).collect()),
                fmt(theirs.iter().map(|v| format!("{v:.6}")).collect()),
                if worst <= CHECK_TOL {
                    ""
                } else {
                    " **DIFFERS**"
                }
            );
        }
        println!();
    }

    let mut rows: Vec<Row> = Vec::new();
    for (pooling, k, density) in [
        (Pooling::Sparseconvmil, 100usize, 0.5),
        (Pooling::Sparseconvmil, 100, 0.1),
        (Pooling::Sparseconvmil, 1000, 0.5),
        (Pooling::Sparseconvmil, 1000, 0.1),
        (Pooling::Attention, 100, 0.5),
        (Pooling::Attention, 1000, 0.5),
        (Pooling::Mean, 100, 0.5),
        (Pooling::Mean, 1000, 0.5),
        (Pooling::InstanceMax, 100, 0.5),
        (Pooling::InstanceMax, 1000, 0.5),
        (Pooling::Abmil, 100, 0.5),
        (Pooling::Abmil, 1000, 0.5),
        (Pooling::ClamSb, 100, 0.5),
        (Pooling::ClamSb, 1000, 0.5),
        (Pooling::ClamMb, 100, 0.5),
        (Pooling::ClamMb, 1000, 0.5),
        (Pooling::Dsmil, 100, 0.5),
        (Pooling::Dsmil, 1000, 0.5),
        (Pooling::Transmil, 100, 0.5),
        (Pooling::Transmil, 1000, 0.5),
        (Pooling::TransmilMap, 1000, 0.5),
    ] {
        let b = bag(k, density, 1);
        let s = setup(pooling, &[&b], &dev);
        let flipped = Bag {
            label_index: 1 - b.label_index,
            ..b.clone()
        };
        let mut row = Row {
            pooling,
            k,
            density,
            bags: [b, flipped],
            n: 0,
            setup: s,
            phases: Phases::default(),
            ours: Vec::new(),
            theirs: Vec::new(),
            round_ratios: Vec::new(),
        };
        if let Some(t) = torch.as_mut().filter(|t| t.serves(pooling)) {
            t.setup(&row.id(), &row.setup, &[(k, density, 1)], 1, true, &dev);
            t.steps(&row.id(), WARMUP);
        }
        row.run(WARMUP, &dev);
        row.phases = Phases::default();
        rows.push(row);
    }
    for round in 0..ROUNDS {
        for row in &mut rows {
            let id = row.id();
            let (ours, theirs) = match torch.as_mut().filter(|t| t.serves(row.pooling)) {
                None => (row.run(STEPS, &dev), Vec::new()),
                Some(t) if round % 2 == 0 => {
                    let ours = row.run(STEPS, &dev);
                    (ours, t.steps(&id, STEPS))
                }
                Some(t) => {
                    let theirs = t.steps(&id, STEPS);
                    (row.run(STEPS, &dev), theirs)
                }
            };
            if !theirs.is_empty() {
                row.round_ratios
                    .push(median(theirs.clone()) / median(ours.clone()));
            }
            row.ours.extend(ours);
            row.theirs.extend(theirs);
        }
    }
    println!("| model | K (tiles) | map density | tessera median (p10) | PyTorch median (p10) | PyTorch / tessera, medians (p10s) | per-round ratios | GFLOP/s tessera / PyTorch |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut breakdown = Vec::new();
    for row in rows {
        let flops = step_flops(&row.setup.config, &[&row.bags[0]]);
        let (ours, ours_p10) = (median(row.ours.clone()), quantile(row.ours, 0.1));
        let gflops = |ms: f64| flops / (ms * 1e-3) / 1e9;
        let (theirs, ratio, rounds, their_gflops) = if row.theirs.is_empty() {
            ("-".into(), "-".into(), "-".into(), "-".into())
        } else {
            let (theirs, p10) = (median(row.theirs.clone()), quantile(row.theirs, 0.1));
            let lo = row
                .round_ratios
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min);
            let hi = row.round_ratios.iter().copied().fold(0.0, f64::max);
            (
                format!("{theirs:.2} ms ({p10:.2})"),
                format!("**{:.2}x** ({:.2}x)", theirs / ours, p10 / ours_p10),
                format!("{lo:.2}-{hi:.2}x"),
                format!("{:.1}", gflops(theirs)),
            )
        };
        let density = if row.pooling.is_spatial() {
            row.density.to_string()
        } else {
            "(same bag)".into()
        };
        println!(
            "| {} | {} | {density} | {ours:.2} ms ({ours_p10:.2}) | {theirs} | {ratio} | {rounds} | {:.1} / {their_gflops} |",
            row.pooling.name(),
            row.k,
            gflops(ours),
        );
        let name = if row.pooling.is_spatial() {
            format!(
                "{}, K={}, density {}",
                row.pooling.name(),
                row.k,
                row.density
            )
        } else {
            format!("{}, K={}", row.pooling.name(), row.k)
        };
        breakdown.push((name, row.phases, ROUNDS * STEPS));
    }

    // A full epoch: 1,000 bags of K=100, 2 bags per step (the original batch size); epochs
    // alternate between the two sides.
    let batch = TrainParams::default().batch_size;
    let specs: Vec<(usize, f64, u64)> = (0..1000).map(|i| (100, 0.5, i)).collect();
    let bags: Vec<Bag> = specs.iter().map(|&(k, d, i)| bag(k, d, i)).collect();
    let refs: Vec<&Bag> = bags.iter().collect();
    let first = setup(Pooling::Sparseconvmil, &refs, &dev);
    let flops: f64 = refs
        .chunks(batch)
        .map(|c| step_flops(&first.config, c))
        .sum();
    if let Some(t) = torch.as_mut() {
        t.setup("epoch", &first, &specs, batch, false, &dev);
    }
    let mut phases = Phases::default();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());

    for round in 0..EPOCH_ROUNDS {
        if let (Some(t), 1) = (torch.as_mut(), round % 2) {
            theirs.push(t.epoch("epoch"));
        }
        // Every epoch from a fresh model, as the first epoch of a run: later epochs over the
        // same random bags would fit them (loss -> 0) and slow down on subnormal floats.
        let mut s = first.fresh(&dev);
        let t0 = Instant::now();
        for chunk in refs.chunks(batch) {
            step(&mut s, chunk, &mut phases, &dev);
        }
        ours.push(t0.elapsed().as_secs_f64());
        if let (Some(t), 0) = (torch.as_mut(), round % 2) {
            theirs.push(t.epoch("epoch"));
        }
    }
    let steps = refs.len().div_ceil(batch);
    println!(
        "\n### One epoch: 1,000 bags of K=100 (density 0.5), batches of {batch} bags ({steps} steps), sparseconvmil; {EPOCH_ROUNDS} interleaved epochs per side, each from a fresh model\n"
    );
    println!("| | tessera | PyTorch | PyTorch / tessera |");
    println!("|---|---|---|---|");
    let secs = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ours_med = median(ours.clone());
    let (theirs_cell, ratio, their_gflops) = if theirs.is_empty() {
        ("-".into(), "-".into(), "-".into())
    } else {
        let m = median(theirs.clone());
        (
            format!("**{m:.2} s** ({} s)", secs(&theirs)),
            format!("**{:.2}x**", m / ours_med),
            format!("{:.1}", flops / m / 1e9),
        )
    };
    println!(
        "| epoch, median (each) | **{ours_med:.2} s** ({} s) | {theirs_cell} | {ratio} |",
        secs(&ours)
    );
    println!(
        "| per step | {:.2} ms | {} | |",
        ours_med * 1e3 / steps as f64,
        if theirs.is_empty() {
            "-".into()
        } else {
            format!("{:.2} ms", median(theirs.clone()) * 1e3 / steps as f64)
        }
    );
    println!(
        "| GFLOP/s | {:.1} | {their_gflops} | |",
        flops / ours_med / 1e9
    );
    breakdown.push((
        format!("epoch ({steps} steps of {batch} bags)"),
        phases,
        steps * EPOCH_ROUNDS,
    ));
    println!("\nLoad average at the end {}.\n", load());

    println!("### Where tessera's time goes (per step)\n");
    println!("| run | build batch | forward + loss | backward | clip + Adam |");
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
