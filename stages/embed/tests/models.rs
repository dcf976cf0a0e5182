//! The models against independent implementations and their own invariants.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{tiles, write_resnet};
use tessera_embed::*;

fn file_vb(path: &std::path::Path) -> VarBuilder<'static> {
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu).unwrap() }
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-6);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn spec(arch: Architecture, weights: WeightsSource, input_size: usize) -> EmbedderSpec {
    EmbedderSpec {
        arch,
        weights,
        weights_prefix: String::new(),
        preprocess: Preprocess {
            input_size,
            ..Default::default()
        },
        pooling: VitPooling::Cls,
        compute: ComputeDtype::F32,
        preset: None,
    }
}

#[test]
fn resnet18_matches_candle_transformers_and_folding_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_resnet(dir.path(), ResNetDepth::R18, 1);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let oracle = candle_transformers::models::resnet::resnet18_no_final_layer(file_vb(&path))
        .unwrap()
        .forward(&x)
        .unwrap();
    let ours = ResNet::new(ResNetDepth::R18, file_vb(&path)).unwrap();
    let plain = ours.features_t(&x, false).unwrap();
    let folded = ours.fold_batch_norm().unwrap().forward(&x).unwrap();
    assert_eq!(plain.dims(), &[2, 512]);
    assert!(
        max_rel_diff(&plain, &oracle) < 1e-5,
        "{}",
        max_rel_diff(&plain, &oracle)
    );
    assert!(
        max_rel_diff(&folded, &oracle) < 1e-4,
        "{}",
        max_rel_diff(&folded, &oracle)
    );
}

#[test]
fn resnet50_matches_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_resnet(dir.path(), ResNetDepth::R50, 2);
    let x = Tensor::randn(0f32, 1.0, (1, 3, 64, 64), &Device::Cpu).unwrap();
    let oracle = candle_transformers::models::resnet::resnet50_no_final_layer(file_vb(&path))
        .unwrap()
        .forward(&x)
        .unwrap();
    let ours = ResNet::new(ResNetDepth::R50, file_vb(&path))
        .unwrap()
        .fold_batch_norm()
        .unwrap()
        .forward(&x)
        .unwrap();
    assert_eq!(ours.dims(), &[1, 2048]);
    assert!(
        max_rel_diff(&ours, &oracle) < 1e-4,
        "{}",
        max_rel_diff(&ours, &oracle)
    );
}

#[test]
fn embedder_is_deterministic_and_sees_the_normalisation() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_resnet(dir.path(), ResNetDepth::R18, 3);
    let ts = tiles(2, 64);
    let refs: Vec<&[u8]> = ts.iter().map(Vec::as_slice).collect();
    let s = spec(
        Architecture::Resnet18,
        WeightsSource::File(path.clone()),
        64,
    );
    let a = load_embedder(&s, &Device::Cpu)
        .unwrap()
        .embed(&refs, 64)
        .unwrap();
    let b = load_embedder(&s, &Device::Cpu)
        .unwrap()
        .embed(&refs, 64)
        .unwrap();
    assert_eq!(a.dims(), &[2, 512]);
    assert_eq!(max_rel_diff(&a, &b), 0.0);
    // The embedder applies exactly the configured normalisation before the network.
    let model = ResNet::new(ResNetDepth::R18, file_vb(&path)).unwrap();
    let mean = Tensor::new(&[0.485f32, 0.456, 0.406], &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 1, 1))
        .unwrap();
    let std = Tensor::new(&[0.229f32, 0.224, 0.225], &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 1, 1))
        .unwrap();
    let raw: Vec<f32> = ts
        .iter()
        .flat_map(|t| (0..3).flat_map(move |c| t.chunks_exact(3).map(move |p| p[c] as f32 / 255.0)))
        .collect();
    let x = Tensor::from_vec(raw, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let x = x.broadcast_sub(&mean).unwrap().broadcast_div(&std).unwrap();
    let direct = model.forward(&x).unwrap();
    assert!(
        max_rel_diff(&a, &direct) < 1e-4,
        "{}",
        max_rel_diff(&a, &direct)
    );
    // Another normalisation gives other embeddings.
    let mut other = s.clone();
    other.preprocess.mean = [0.5; 3];
    let c = load_embedder(&other, &Device::Cpu)
        .unwrap()
        .embed(&refs, 64)
        .unwrap();
    assert!(max_rel_diff(&a, &c) > 1e-3);
}

#[test]
fn weights_that_do_not_fit_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_resnet(dir.path(), ResNetDepth::R18, 4);
    let err = load_embedder(
        &spec(Architecture::Resnet50, WeightsSource::File(path), 64),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("resnet-4.safetensors") && err.contains("does not fit"),
        "{err}"
    );
}

#[test]
fn prefixed_checkpoints_load_with_weights_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_resnet(dir.path(), ResNetDepth::R18, 5);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let prefixed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (format!("module.{k}"), v))
        .collect();
    let p2 = dir.path().join("prefixed.safetensors");
    candle_core::safetensors::save(&prefixed, &p2).unwrap();
    let ts = tiles(1, 32);
    let refs: Vec<&[u8]> = ts.iter().map(Vec::as_slice).collect();
    let a = load_embedder(
        &spec(Architecture::Resnet18, WeightsSource::File(path), 32),
        &Device::Cpu,
    )
    .unwrap()
    .embed(&refs, 32)
    .unwrap();
    let mut s = spec(Architecture::Resnet18, WeightsSource::File(p2), 32);
    s.weights_prefix = "module.".into();
    let b = load_embedder(&s, &Device::Cpu)
        .unwrap()
        .embed(&refs, 32)
        .unwrap();
    assert_eq!(max_rel_diff(&a, &b), 0.0);
}

#[test]
fn pth_checkpoints_load_like_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_resnet(dir.path(), ResNetDepth::R18, 6);
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let flat = dir.path().join("flat.pth");
    common::pth::write_pth(&flat, &tensors, None);
    let nested = dir.path().join("nested.pth");
    common::pth::write_pth(&nested, &tensors, Some("state_dict"));

    let ts = tiles(2, 32);
    let refs: Vec<&[u8]> = ts.iter().map(Vec::as_slice).collect();
    let embed = |p: &std::path::Path| {
        load_embedder(
            &spec(
                Architecture::Resnet18,
                WeightsSource::File(p.to_path_buf()),
                32,
            ),
            &Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .embed(&refs, 32)
        .unwrap()
    };
    let reference = embed(&path);
    assert_eq!(max_rel_diff(&embed(&flat), &reference), 0.0);
    assert_eq!(max_rel_diff(&embed(&nested), &reference), 0.0);

    // A .pth missing a tensor is refused with the file's name, not silently filled in.
    let partial = dir.path().join("partial.pth");
    common::pth::write_pth(&partial, &tensors[1..], None);
    let err = load_embedder(
        &spec(Architecture::Resnet18, WeightsSource::File(partial), 32),
        &Device::Cpu,
    )
    .err()
    .expect("a checkpoint missing a tensor must be refused")
    .to_string();
    assert!(err.contains("partial.pth"), "{err}");
}

#[test]
fn resnet_trains_through_a_varmap() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = ResNet::new(ResNetDepth::R18, vb).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let loss = model
        .features_t(&x, true)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let conv1 = data.get("conv1.weight").unwrap();
    let g = grads.get(conv1.as_tensor()).expect("conv1 gets a gradient");
    assert!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn random_weights_are_reproducible_from_the_seed() {
    let ts = tiles(1, 32);
    let refs: Vec<&[u8]> = ts.iter().map(Vec::as_slice).collect();
    let run = |seed| {
        load_embedder(
            &spec(Architecture::Resnet18, WeightsSource::Random { seed }, 32),
            &Device::Cpu,
        )
        .unwrap()
        .embed(&refs, 32)
        .unwrap()
    };
    assert_eq!(max_rel_diff(&run(1), &run(1)), 0.0);
    assert!(max_rel_diff(&run(1), &run(2)) > 1e-3);
}

#[test]
fn vit_widths_registers_and_pooling() {
    let ts = tiles(2, 28);
    let refs: Vec<&[u8]> = ts.iter().map(Vec::as_slice).collect();
    let mut s = spec(Architecture::VitS14, WeightsSource::Random { seed: 0 }, 28);
    let cls = load_embedder(&s, &Device::Cpu)
        .unwrap()
        .embed(&refs, 28)
        .unwrap();
    assert_eq!(cls.dims(), &[2, 384]);
    s.pooling = VitPooling::ClsMean;
    let both = load_embedder(&s, &Device::Cpu)
        .unwrap()
        .embed(&refs, 28)
        .unwrap();
    assert_eq!(both.dims(), &[2, 768]);
    // The first half of cls_mean is the class token.
    assert_eq!(max_rel_diff(&both.narrow(1, 0, 384).unwrap(), &cls), 0.0);
    // A file with register tokens, no LayerScale and a 2x2 position grid: the historical archs
    // read all three from the weights.
    let cfg = VitConfig {
        depth: 1,
        heads: 2,
        pos_grid: 2,
        registers: 4,
        layer_scale: None,
        ..VitConfig::dinov2(14, 64, 1)
    };
    let varmap = VarMap::new();
    Vit::new(
        cfg,
        28,
        VitPooling::Cls,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vit.safetensors");
    varmap.save(&path).unwrap();
    let mut loaded_cfg = VitConfig {
        heads: 2,
        ..VitConfig::dinov2(14, 64, 1)
    };
    loaded_cfg.detect_from(&file_vb(&path));
    let vit = Vit::new(loaded_cfg, 28, VitPooling::Cls, file_vb(&path)).unwrap();
    assert_eq!(vit.config().registers, 4);
    assert_eq!(vit.config().pos_grid, 2);
    assert_eq!(vit.config().layer_scale, None);
    let x = Tensor::randn(0f32, 1.0, (1, 3, 28, 28), &Device::Cpu).unwrap();
    assert_eq!(vit.forward(&x).unwrap().dims(), &[1, 64]);
}

#[test]
fn cpu_fast_path_matches_candle_transformers_on_odd_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for (depth, seed) in [(ResNetDepth::R18, 21), (ResNetDepth::R50, 22)] {
        let path = write_resnet(dir.path(), depth, seed);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 45, 37), &Device::Cpu).unwrap();
        let oracle = match depth {
            ResNetDepth::R18 => {
                candle_transformers::models::resnet::resnet18_no_final_layer(file_vb(&path))
            }
            _ => candle_transformers::models::resnet::resnet50_no_final_layer(file_vb(&path)),
        }
        .unwrap()
        .forward(&x)
        .unwrap();
        let folded = ResNet::new(depth, file_vb(&path))
            .unwrap()
            .fold_batch_norm()
            .unwrap();
        let fast = tessera_embed::resnet_cpu::CpuResNet::new(&folded)
            .unwrap()
            .forward(&x)
            .unwrap();
        assert_eq!(fast.dims(), oracle.dims());
        assert!(
            max_rel_diff(&fast, &oracle) < 1e-4,
            "{depth:?}: {}",
            max_rel_diff(&fast, &oracle)
        );
    }
}

/// f16 is GPU only; bf16 runs on CPUs with AVX512-BF16 and is refused, naming the
/// instructions, elsewhere.
#[test]
fn half_precision_is_refused_on_cpu_with_a_clear_error() {
    let with = |compute| EmbedderSpec {
        compute,
        ..spec(
            Architecture::Resnet18,
            WeightsSource::Random { seed: 0 },
            64,
        )
    };
    let err = load_embedder(&with(ComputeDtype::F16), &Device::Cpu)
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("runs on a GPU only"), "{msg}");
    match load_embedder(&with(ComputeDtype::Bf16), &Device::Cpu) {
        Ok(_) => eprintln!("note: this CPU has AVX512-BF16: bf16 runs here"),
        Err(e) => assert!(e.to_string().contains("AVX512-BF16"), "{e}"),
    }
}
