//! The CUDA path against the CPU path, on the same inputs and the same seeded parameters:
//! sparse convolutions (candle's gather/matmul/scatter on the GPU vs our CPU kernels), a
//! SparseConvMIL model trained for several Adam steps, every pooling baseline, Grad-CAM, the
//! ResNet embedder (candle's convolutions on the GPU vs our CPU im2col path) and ResNet
//! training-mode gradients (end-to-end fine-tuning).
//!
//! Built only with `--features cuda`, and then needs a GPU: there is no skip, a CUDA build
//! without a device fails here. Run it on a GPU machine:
//! `cargo test --release -p tessera-mil --features cuda --test cuda`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::Rng;
use tessera_embed::{
    load_embedder, Architecture, ComputeDtype, EmbedderSpec, Preprocess, ResNet, ResNetDepth,
    VitPooling, WeightsSource,
};
use tessera_mil::importance::importance;
use tessera_mil::models::init::{named_vars, seeded_var_builder};
use tessera_mil::models::{
    build_any, Bag, BagBatch, GlobalPool, MilModel, ModelConfig, Pooling, Split,
};
use tessera_mil::seeding::stream_rng;
use tessera_mil::train::epochs::loss;
use tessera_mil::train::optim::{Adam, AdamConfig};
use tessera_sparse::{RuleKey, SparseConv2d, SparseModule, SparseTensor, SubmanifoldConv2d};

fn gpu() -> Device {
    Device::new_cuda(0).expect("this test needs a CUDA device (built with --features cuda)")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("tensor values")
}

/// Largest absolute difference, relative to the largest magnitude of `want` (at least 1).
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst.is_finite() && worst <= tol * scale,
        "{what}: max |gpu - cpu| = {worst} (scale {scale}, tolerance {tol})"
    );
    eprintln!("{what}: max |gpu - cpu| = {worst:.3e} (scale {scale:.3})");
}

/// `n` distinct sites on a square of about `n / density` cells, in `batch` items.
fn sites(n: usize, density: f64, batch: i32, seed: u64) -> Vec<[i32; 3]> {
    let mut rng = stream_rng(seed, "cuda-test-sites", None, "");
    let side = ((n as f64 / density).sqrt().ceil() as i32).max(1);
    let mut out = Vec::with_capacity(n);
    for b in 0..batch {
        let mut cells: Vec<[i32; 3]> = (0..side * side).map(|c| [b, c / side, c % side]).collect();
        cells.shuffle(&mut rng);
        cells.truncate(n / batch as usize);
        out.extend(cells);
    }
    out
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = stream_rng(seed, "cuda-test-values", None, "");
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A convolution applied to a sparse tensor.
type Layer = Box<dyn Fn(&SparseTensor) -> SparseTensor>;
/// Builds a [`Layer`] from parameters.
type MakeLayer = Box<dyn Fn(VarBuilder) -> Layer>;

/// Forward output and the gradients of (input features, weight, bias) of one convolution
/// built by `make` on `dev`, for the loss `sum(y * r)` with a fixed random `r`.
fn conv_run(
    dev: &Device,
    coords: &[[i32; 3]],
    feats: &[f32],
    cin: usize,
    make: &dyn Fn(VarBuilder) -> Layer,
) -> Vec<Vec<f32>> {
    let vars = VarMap::new();
    let conv = make(seeded_var_builder(&vars, 11, dev));
    let x =
        Var::from_tensor(&Tensor::from_slice(feats, (coords.len(), cin), dev).expect("features"))
            .expect("var");
    let input = SparseTensor::new(coords.to_vec(), x.as_tensor().clone(), 2).expect("sparse");
    let y = conv(&input);
    let r = Tensor::from_vec(
        random(y.features().elem_count(), 5),
        y.features().shape(),
        dev,
    )
    .expect("r");
    let grads = (y.features() * &r)
        .and_then(|t| t.sum_all())
        .and_then(|l| l.backward())
        .expect("backward");
    let named = named_vars(&vars);
    let mut out = vec![values(y.features()), values(grads.get(&x).expect("dx"))];
    for (_, v) in named {
        out.push(values(grads.get(&v).expect("parameter gradient")));
    }
    out
}

#[test]
fn sparse_convolutions_match_the_cpu_kernels_forward_and_backward() {
    let gpu = gpu();
    let cin = 16;
    for (density, n) in [(0.5, 3000), (0.1, 2000)] {
        let coords = sites(n, density, 2, n as u64);
        let feats = random(coords.len() * cin, 1);
        let cases: Vec<(&str, MakeLayer)> = vec![
            (
                "submanifold 3x3",
                Box::new(move |vb| {
                    let c = SubmanifoldConv2d::new(cin, 8, 3, true, vb).expect("conv");
                    Box::new(move |x| c.forward(x).expect("forward"))
                }),
            ),
            (
                "strided 2x2/2",
                Box::new(move |vb| {
                    let c = SparseConv2d::new(cin, 8, 2, 2, true, vb).expect("conv");
                    Box::new(move |x| c.forward(x).expect("forward"))
                }),
            ),
        ];
        for (name, make) in &cases {
            let cpu = conv_run(&Device::Cpu, &coords, &feats, cin, make.as_ref());
            let cuda = conv_run(&gpu, &coords, &feats, cin, make.as_ref());
            let parts = ["output", "input grad", "bias grad", "weight grad"];
            for (i, (g, c)) in cuda.iter().zip(&cpu).enumerate() {
                let part = parts.get(i).copied().unwrap_or("parameter grad");
                assert_close(&format!("{name}, density {density}: {part}"), g, c, 1e-4);
            }
        }
    }
    // The rulebook is built on the host either way: the same coordinates give the same pairs.
    let coords = sites(500, 0.5, 2, 9);
    let x = SparseTensor::new(
        coords.clone(),
        Tensor::zeros((coords.len(), 1), DType::F32, &gpu).expect("zeros"),
        2,
    )
    .expect("sparse");
    let y = SparseTensor::new(
        coords.clone(),
        Tensor::zeros((coords.len(), 1), DType::F32, &Device::Cpu).expect("zeros"),
        2,
    )
    .expect("sparse");
    let key = RuleKey::submanifold(3);
    assert_eq!(
        x.rulebook(key).expect("rb").num_pairs(),
        y.rulebook(key).expect("rb").num_pairs()
    );
}

fn bag(k: usize, dim: usize, seed: u64) -> Bag {
    let mut rng = stream_rng(seed, "cuda-test-bag", None, "");
    let side = ((k as f64 / 0.5).sqrt().ceil() as i64).max(1);
    let mut cells: Vec<[i64; 2]> = (0..side * side).map(|c| [c / side, c % side]).collect();
    cells.shuffle(&mut rng);
    cells.truncate(k);
    Bag {
        slide_id: format!("bag{seed}"),
        label_index: (seed % 2) as usize,
        split: Split::Train,
        dim,
        embeddings: (0..k * dim)
            .map(|_| rng.random_range(0.0f32..1.0))
            .collect(),
        positions: Some(cells),
        pixels: None,
    }
}

fn config(pooling: Pooling, dim: usize) -> ModelConfig {
    ModelConfig {
        pooling,
        input_dim: dim,
        n_classes: 2,
        head_hidden: 32,
        dropout: 0.0,
        sparse_channels: vec![32, 32],
        sparse_kernel: 3,
        sparse_batch_norm: false,
        sparse_pool: GlobalPool::Max,
        attention_hidden: 16,
        lse_r: 1.0,
        instance_encoder: Vec::new(),
        encoder_dropout: 0.0,
        standardize: None,
        clam_dsmil: Default::default(),
    }
}

/// What `steps` Adam steps over `bags` (two bags per step) give: the losses, the first step's
/// gradients and the final parameters, each parameter in name order.
struct Trained {
    losses: Vec<f32>,
    first_grads: Vec<Vec<f32>>,
    params: Vec<Vec<f32>>,
}

fn train(c: &ModelConfig, bags: &[Bag], steps: usize, dev: &Device) -> Trained {
    let vars = VarMap::new();
    let mut model = build_any(c, &seeded_var_builder(&vars, 3, dev)).expect("model");
    // TransMIL's attention dropout draws different masks on the two devices.
    if let tessera_mil::models::AnyModel::TransMil(m) = &mut model.pooling {
        m.set_attention_dropout(0.0);
    }
    let named = named_vars(&vars);
    let mut adam = Adam::new(named.clone(), AdamConfig::default()).expect("adam");
    let mut losses = Vec::new();
    let mut first_grads = Vec::new();
    for s in 0..steps {
        let batch: Vec<&Bag> = bags.iter().cycle().skip(2 * s).take(2).collect();
        let input = BagBatch::from_bags(&batch, dev).expect("batch");
        let logits = model.forward(&input, true).expect("forward");
        let l = loss(&logits, &batch, None, dev).expect("loss");
        losses.push(l.to_scalar::<f32>().expect("scalar"));
        let grads = l.backward().expect("backward");
        if s == 0 {
            first_grads = named
                .iter()
                .filter_map(|(_, v)| grads.get(v.as_tensor()).map(values))
                .collect();
        }
        adam.step(&grads).expect("adam");
    }
    let params = named.iter().map(|(_, v)| values(v.as_tensor())).collect();
    Trained {
        losses,
        first_grads,
        params,
    }
}

#[test]
fn every_pooling_model_trains_the_same_on_gpu_and_cpu() {
    let gpu = gpu();
    let dim = 64;
    let bags: Vec<Bag> = (0..6).map(|i| bag(60 + 10 * i as usize, dim, i)).collect();
    for pooling in Pooling::ALL {
        let c = config(pooling, dim);
        let cpu = train(&c, &bags, 8, &Device::Cpu);
        let cuda = train(&c, &bags, 8, &gpu);
        assert_close(
            &format!("{pooling:?}: losses"),
            &cuda.losses,
            &cpu.losses,
            1e-3,
        );
        assert_eq!(cuda.params.len(), cpu.params.len());
        for (i, (g, p)) in cuda.params.iter().zip(&cpu.params).enumerate() {
            assert_close(
                &format!("{pooling:?}: parameter {i} after 8 steps"),
                g,
                p,
                1e-3,
            );
        }
    }
    // With batch-norm the bias of the convolution before it has no effect, so its gradient is
    // rounding noise that Adam's normalisation turns into full-size random steps: compare the
    // losses over the steps and the first step's gradients instead of the parameters.
    let c = ModelConfig {
        sparse_batch_norm: true,
        ..config(Pooling::Sparseconvmil, dim)
    };
    let cpu = train(&c, &bags, 8, &Device::Cpu);
    let cuda = train(&c, &bags, 8, &gpu);
    assert_close("batch-norm: losses", &cuda.losses, &cpu.losses, 1e-3);
    assert_eq!(cuda.first_grads.len(), cpu.first_grads.len());
    for (i, (g, p)) in cuda.first_grads.iter().zip(&cpu.first_grads).enumerate() {
        assert_close(&format!("batch-norm: gradient {i}, first step"), g, p, 1e-3);
    }
}

#[test]
fn grad_cam_on_gpu_matches_cpu() {
    let gpu = gpu();
    let dim = 32;
    let b = Bag {
        split: Split::Test,
        ..bag(80, dim, 4)
    };
    for pooling in [
        Pooling::Sparseconvmil,
        Pooling::Attention,
        Pooling::InstanceMax,
    ] {
        let c = config(pooling, dim);
        let cpu_vars = VarMap::new();
        let cpu_model = build_any(&c, &seeded_var_builder(&cpu_vars, 8, &Device::Cpu)).expect("m");
        let gpu_vars = VarMap::new();
        let gpu_model = build_any(&c, &seeded_var_builder(&gpu_vars, 8, &gpu)).expect("m");
        let want = importance(&cpu_model, &b, &Device::Cpu).expect("cpu importance");
        let got = importance(&gpu_model, &b, &gpu).expect("gpu importance");
        assert_eq!(got.method, want.method);
        assert_close(
            &format!("{pooling:?}: scores"),
            &got.scores,
            &want.scores,
            1e-3,
        );
        assert_close(
            &format!("{pooling:?}: probs"),
            &got.probs,
            &want.probs,
            1e-4,
        );
    }
}

fn tiles(n: usize, px: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            (0..px * px * 3)
                .map(|j| ((i * 31 + j * 7 + (j / (px * 3)) * 13) % 251) as u8)
                .collect()
        })
        .collect()
}

#[test]
fn embedders_on_gpu_match_the_cpu_path() {
    let gpu = gpu();
    let px = 224;
    let pixels = tiles(4, px);
    let refs: Vec<&[u8]> = pixels.iter().map(Vec::as_slice).collect();
    for arch in [
        Architecture::Resnet18,
        Architecture::Resnet50,
        Architecture::VitS14,
    ] {
        let spec = EmbedderSpec {
            arch,
            weights: WeightsSource::Random { seed: 0 },
            weights_prefix: String::new(),
            preprocess: Preprocess::default(),
            pooling: VitPooling::Cls,
            compute: ComputeDtype::F32,
            preset: None,
        };
        let cpu = load_embedder(&spec, &Device::Cpu).expect("cpu model");
        let want = values(&cpu.embed(&refs, px).expect("cpu embed"));
        let cuda = load_embedder(&spec, &gpu).expect("gpu model");
        let got = values(&cuda.embed(&refs, px).expect("gpu embed"));
        assert_close(&format!("{arch:?} embeddings"), &got, &want, 1e-3);
        // Half precision: about three significant digits per value, through the whole network.
        for compute in [ComputeDtype::F16, ComputeDtype::Bf16] {
            let half = load_embedder(
                &EmbedderSpec {
                    compute,
                    ..spec.clone()
                },
                &gpu,
            )
            .expect("gpu half model");
            let got = values(&half.embed(&refs, px).expect("gpu half embed"));
            let tol = if compute == ComputeDtype::F16 {
                2e-2
            } else {
                6e-2
            };
            assert_close(
                &format!("{arch:?} embeddings, {compute:?}"),
                &got,
                &want,
                tol,
            );
        }
    }
}

/// Features and every parameter gradient of a ResNet-18 in training mode for the loss
/// `sum(features * r)`, computed in `dtype` on `dev` from the same seeded f32 parameters.
fn resnet_run(dev: &Device, dtype: DType, input: &[f32], px: usize) -> Vec<(String, Vec<f32>)> {
    let init = VarMap::new();
    ResNet::new(ResNetDepth::R18, seeded_var_builder(&init, 2, &Device::Cpu)).expect("init");
    let vars = VarMap::new();
    for (name, v) in init.data().lock().expect("vars").iter() {
        let t = v
            .as_tensor()
            .to_dtype(dtype)
            .and_then(|t| t.to_device(dev))
            .expect("copy");
        vars.data()
            .lock()
            .expect("vars")
            .insert(name.clone(), Var::from_tensor(&t).expect("var"));
    }
    let net =
        ResNet::new(ResNetDepth::R18, VarBuilder::from_varmap(&vars, dtype, dev)).expect("net");
    let n = input.len() / (px * px * 3);
    let x = Tensor::from_slice(input, (n, px, px, 3), dev)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.permute((0, 3, 1, 2)))
        .and_then(|t| t.contiguous())
        .expect("x");
    let f = net.features_t(&x, true).expect("features");
    let r = Tensor::from_vec(random(f.elem_count(), 7), f.shape(), dev)
        .and_then(|t| t.to_dtype(dtype))
        .expect("r");
    let grads = (&f * &r)
        .and_then(|t| t.sum_all())
        .and_then(|l| l.backward())
        .expect("backward");
    let named = named_vars(&vars);
    let mut out = vec![("features".to_string(), values(&f))];
    out.extend(
        named
            .into_iter()
            .filter_map(|(k, v)| grads.get(v.as_tensor()).map(|g| (k, values(g)))),
    );
    out
}

/// `(|a - b|², |b|²)` summed over elements, in f64.
fn sq_err(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(e, n), (&x, &y)| {
        let (x, y) = (x as f64, y as f64);
        (e + (x - y) * (x - y), n + y * y)
    })
}

/// Training-mode batch-norm and ReLU make the gradients of a deep network sensitive to
/// rounding: an activation that rounds to the other side of zero switches a unit's gradient
/// on or off, so f32 on any device is a percent or so off the exact gradient in the worst
/// element. The oracle is an f64 run on the CPU; the GPU (f32) must be about as close to it as
/// the CPU in f32 over all gradients together, and within 10% on every tensor (a wrong
/// kernel is 100% off).
#[test]
fn resnet_training_gradients_match_cpu() {
    let gpu = gpu();
    let px = 96;
    let input: Vec<f32> = tiles(4, px)
        .iter()
        .flat_map(|t| {
            t.iter()
                .map(|&v| v as f32 / 255.0 - 0.5)
                .collect::<Vec<_>>()
        })
        .collect();
    let exact = resnet_run(&Device::Cpu, DType::F64, &input, px);
    let cpu = resnet_run(&Device::Cpu, DType::F32, &input, px);
    let cuda = resnet_run(&gpu, DType::F32, &input, px);
    assert_eq!(exact.len(), cuda.len());
    assert!(exact.len() > 40, "{} gradients", exact.len());
    let (mut cpu_total, mut gpu_total, mut norm_total) = (0.0, 0.0, 0.0);
    for (((name, e), (_, c)), (_, g)) in exact.iter().zip(&cpu).zip(&cuda) {
        let ((cpu_err, norm), (gpu_err, _)) = (sq_err(c, e), sq_err(g, e));
        let (cpu_rel, gpu_rel) = ((cpu_err / norm).sqrt(), (gpu_err / norm).sqrt());
        eprintln!("ResNet-18 {name}: relative error cpu32 {cpu_rel:.2e}, gpu {gpu_rel:.2e}");
        assert!(
            gpu_rel.is_finite() && gpu_rel < 0.1,
            "ResNet-18 {name}: the GPU gradient is {gpu_rel} off the f64 one (the CPU's {cpu_rel})"
        );
        cpu_total += cpu_err;
        gpu_total += gpu_err;
        norm_total += norm;
    }
    let (cpu_rel, gpu_rel) = (
        (cpu_total / norm_total).sqrt(),
        (gpu_total / norm_total).sqrt(),
    );
    eprintln!("ResNet-18, all gradients: relative error cpu32 {cpu_rel:.2e}, gpu {gpu_rel:.2e}");
    assert!(
        gpu_rel <= 3.0 * cpu_rel + 1e-5,
        "ResNet-18: the GPU gradients are {gpu_rel} off the f64 ones, the CPU's in f32 {cpu_rel}"
    );
}
