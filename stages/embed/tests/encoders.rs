//! The ViT encoders against their references (timm, Hugging Face `transformers`), on the small
//! fixtures `scripts/timm-encoder-fixtures.py` wrote: one reduced model per family of
//! pathology foundation models, with the same structural options as the presets. Also the
//! presets' own plumbing: the Hugging Face cache, wrong files, widths.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tessera_embed::vit::resize_pos_embed;
use tessera_embed::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vit")
}

/// The inputs the fixture script feeds: `((i * 7919 + 13) mod 10007) / 10007 * 3 - 1.5`.
fn input_tensor(batch: usize, size: usize) -> Tensor {
    let n = batch * 3 * size * size;
    let v: Vec<f32> = (0..n as i64)
        .map(|i| (((i * 7919 + 13) % 10007) as f64 / 10007.0 * 3.0 - 1.5) as f32)
        .collect();
    Tensor::from_vec(v, (batch, 3, size, size), &Device::Cpu).unwrap()
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

fn config(v: &Value) -> VitConfig {
    let u = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
    VitConfig {
        patch_size: u("patch_size"),
        dim: u("dim"),
        depth: u("depth"),
        heads: u("heads"),
        mlp_hidden: u("mlp_hidden"),
        mlp: match v["mlp"].as_str().unwrap() {
            "gelu" => MlpKind::Gelu,
            "swiglu_packed" => MlpKind::SwiGluPacked,
            "swiglu" => MlpKind::SwiGlu,
            other => panic!("{other}"),
        },
        qkv_bias: v["qkv_bias"].as_bool().unwrap(),
        layer_scale: v["layer_scale"].as_bool().unwrap().then_some(1e-5),
        registers: u("registers"),
        pos_layout: match v["pos_layout"].as_str().unwrap() {
            "all_tokens" => PosLayout::AllTokens,
            "patches_only" => PosLayout::PatchesOnly,
            "class_and_patches" => PosLayout::ClassAndPatches,
            other => panic!("{other}"),
        },
        pos_interp: match v["pos_interp"].as_str().unwrap() {
            "timm" => PosInterp::TimmAntialias,
            _ => PosInterp::Bicubic {
                offset: v["offset"].as_f64().unwrap(),
            },
        },
        pos_grid: u("pos_grid"),
        norm_eps: v["norm_eps"].as_f64().unwrap(),
    }
}

fn layout(name: &str) -> WeightsLayout {
    match name {
        "timm" => WeightsLayout::Timm,
        "hf_vit" => WeightsLayout::HfVit,
        "hf_dinov2" => WeightsLayout::HfDinov2,
        other => panic!("{other}"),
    }
}

fn pooling(name: &str) -> VitPooling {
    match name {
        "cls" => VitPooling::Cls,
        "mean" => VitPooling::Mean,
        "cls_mean" => VitPooling::ClsMean,
        other => panic!("{other}"),
    }
}

fn file_vb(path: &Path) -> VarBuilder<'static> {
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu).unwrap() }
}

#[test]
fn every_family_equals_its_reference() {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap();
    let mut report = Vec::new();
    for fam in manifest["families"].as_array().unwrap() {
        let name = fam["name"].as_str().unwrap();
        let path = fixtures().join(fam["file"].as_str().unwrap());
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let batch = fam["batch"].as_u64().unwrap() as usize;
        for size in fam["sizes"].as_array().unwrap() {
            let size = size.as_u64().unwrap() as usize;
            let vb = layout(fam["layout"].as_str().unwrap()).wrap(file_vb(&path));
            let vit = Vit::new(
                config(&fam["vit"]),
                size,
                pooling(fam["pooling"].as_str().unwrap()),
                vb,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let ours = vit.features(&input_tensor(batch, size)).unwrap();
            let want = &tensors[&format!("oracle.out_{size}")];
            assert_eq!(ours.dims(), want.dims(), "{name} at {size}");
            let err = max_rel_diff(&ours, want);
            report.push(format!("{name}@{size}: {err:.2e}"));
            assert!(err <= 1e-5, "{name} at {size} px: relative error {err}");
            // The AVX-512 block stack the embedder uses on CPUs that have it.
            if let Some(cpu) = tessera_embed::vit_cpu::CpuVit::new(&vit).unwrap() {
                let fast = cpu.forward(&vit, &input_tensor(batch, size)).unwrap();
                let err = max_rel_diff(&fast, want);
                report.push(format!("{name}@{size} (CPU path): {err:.2e}"));
                assert!(
                    err <= 1e-5,
                    "{name} at {size} px, CPU path: relative error {err}"
                );
            }
        }
    }
    println!("max relative error per family: {}", report.join(", "));
}

#[test]
fn position_resampling_equals_pytorch() {
    let t =
        candle_core::safetensors::load(fixtures().join("pos_resample.safetensors"), &Device::Cpu)
            .unwrap();
    // [16, 5] grid behind one class position.
    let cls = Tensor::zeros((1, 5), DType::F32, &Device::Cpu).unwrap();
    let pos = Tensor::cat(&[&cls, &t["pos.grid"]], 0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    for to in [7usize, 2] {
        for (key, interp) in [
            ("timm", PosInterp::TimmAntialias),
            ("hf", PosInterp::Bicubic { offset: 0.0 }),
            ("dinov2", PosInterp::Bicubic { offset: 0.1 }),
        ] {
            let ours = resize_pos_embed(&pos, 1, 4, to, interp)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .narrow(0, 1, to * to)
                .unwrap();
            let err = max_rel_diff(&ours, &t[&format!("pos.{key}_{to}")]);
            assert!(err <= 1e-6, "{key} 4 -> {to}: {err}");
        }
    }
}

/// A fixture's weights under the preset whose architecture they do not have: the error names
/// the preset and the first parameter that does not fit.
#[test]
fn a_file_that_does_not_fit_the_preset_is_named() {
    let spec = |preset, path: &Path| EmbedderSpec {
        arch: Architecture::Resnet18,
        weights: WeightsSource::File(path.to_path_buf()),
        weights_prefix: String::new(),
        preprocess: Preprocess::default(),
        pooling: VitPooling::Cls,
        compute: ComputeDtype::F32,
        preset: Some(preset),
    };
    let err = load_embedder(
        &spec(Preset::Uni, &fixtures().join("uni.safetensors")),
        &Device::Cpu,
    )
    .err()
    .expect("a reduced model is not UNI")
    .to_string();
    assert!(
        err.contains("uni.safetensors")
            && err.contains("preset `uni`")
            && err.contains("shape mismatch for patch_embed.proj.weight"),
        "{err}"
    );
    let err = load_embedder(
        &spec(Preset::Phikon, &fixtures().join("uni.safetensors")),
        &Device::Cpu,
    )
    .err()
    .expect("timm names are not transformers names")
    .to_string();
    assert!(
        err.contains("preset `phikon`")
            && err.contains("embeddings.patch_embeddings.projection.weight"),
        "{err}"
    );
}

/// `preset: NAME` alone: weights from a (fake) Hugging Face cache, the card's preprocessing.
#[test]
fn a_preset_reads_its_weights_from_the_hugging_face_cache() {
    let p = EmbedParams::with_preset(Preset::HOptimus0);
    assert_eq!(p.weights, "hf:bioptimus/H-optimus-0");
    assert_eq!(p.mean, [0.707223, 0.578729, 0.703617]);
    assert_eq!(p.dim(), 1536);
    let p: EmbedParams = serde_json::from_value(serde_json::json!({
        "preset": "virchow2", "weights": "hf:Org/Tiny", "pooling": "cls", "input_size": 448
    }))
    .unwrap();
    assert_eq!(
        (p.dim(), p.input_size, p.pooling),
        (1280, 448, Pooling::Cls)
    );
    assert!(serde_json::from_value::<EmbedParams>(
        serde_json::json!({"preset": "uni", "arch": "vit_l16"})
    )
    .unwrap_err()
    .to_string()
    .contains("not both"));

    // A fake cache holding the uni fixture as a repository's model.safetensors.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--Org--Tiny");
    std::fs::create_dir_all(repo.join("snapshots/0123abcd")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let file = repo.join("snapshots/0123abcd/model.safetensors");
    std::fs::copy(fixtures().join("uni.safetensors"), &file).unwrap();
    let source = WeightsSource::HfHub("Org/Tiny".into());
    assert_eq!(
        weights::resolve_hf_in(cache.path(), "Org/Tiny").unwrap(),
        file
    );
    // Through the environment, as a run finds it (HF_HUB_CACHE, then HF_HOME/hub).
    std::env::set_var("HF_HUB_CACHE", cache.path());
    assert_eq!(source.file().unwrap(), Some(file.clone()));
    let vb = weights::var_builder(&source, "", &Device::Cpu).unwrap();
    assert!(vb.contains_tensor("blocks.1.mlp.fc2.weight"));
    let missing = WeightsSource::HfHub("Org/Absent".into())
        .file()
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("models--Org--Absent/refs/main"),
        "{missing}"
    );
    std::env::remove_var("HF_HUB_CACHE");
}

#[test]
fn presets_with_random_weights_have_the_cards_widths() {
    // The smallest presets only (random giant models take long on 2 cores).
    let ts = common::tiles(1, 224);
    let refs: Vec<&[u8]> = ts.iter().map(Vec::as_slice).collect();
    for preset in [Preset::H0Mini, Preset::Phikon, Preset::HibouB] {
        let p = EmbedParams::with_preset(preset);
        let spec = EmbedderSpec {
            arch: p.arch,
            weights: WeightsSource::Random { seed: 1 },
            weights_prefix: String::new(),
            preprocess: Preprocess {
                input_size: p.input_size,
                mean: p.mean,
                std: p.std,
            },
            pooling: p.pooling.into(),
            compute: ComputeDtype::F32,
            preset: p.preset,
        };
        let e = load_embedder(&spec, &Device::Cpu).unwrap();
        assert_eq!(e.dim(), preset.info().dim());
        let out = e.embed(&refs, 224).unwrap();
        assert_eq!(out.dims(), &[1, preset.info().dim()]);
        let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{preset:?}");
    }
}
