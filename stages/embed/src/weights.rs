//! Where a model's parameters come from: a local `.safetensors` or PyTorch `.pth` file, a
//! model already in the local Hugging Face hub cache (`hf:ORG/NAME`, resolved offline: nothing
//! is downloaded), or seeded random values (for tests and demos only: such embeddings mean
//! nothing).

use crate::error::{EmbedError, EmbedResult};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// The source of a model's parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsSource {
    /// Values drawn from each layer's usual initialisation, seeded per parameter name so the
    /// same seed gives the same network whatever the loading order.
    Random { seed: u64 },
    /// A `.safetensors` file, or a PyTorch `.pth`/`.pt`/`.bin` checkpoint (a zip with a pickled
    /// state dict, possibly nested under `state_dict`, `model` or `teacher`).
    File(PathBuf),
    /// `hf:ORG/NAME[/FILE][@REVISION]`: a file of a Hugging Face model repository in the local
    /// hub cache (see [`resolve_hf`]).
    HfHub(String),
}

impl WeightsSource {
    /// The `weights` value as experiment files write it: `random`, `hf:ORG/NAME`, or a path.
    pub fn parse(value: &str, seed: u64, resolve: impl Fn(&str) -> PathBuf) -> WeightsSource {
        if value == "random" {
            WeightsSource::Random { seed }
        } else if let Some(repo) = value.strip_prefix(HF_SCHEME) {
            WeightsSource::HfHub(repo.to_string())
        } else {
            WeightsSource::File(resolve(value))
        }
    }

    /// The local file holding the parameters (`None` for random weights).
    pub fn file(&self) -> EmbedResult<Option<PathBuf>> {
        match self {
            WeightsSource::Random { .. } => Ok(None),
            WeightsSource::File(p) => Ok(Some(p.clone())),
            WeightsSource::HfHub(spec) => resolve_hf(spec).map(Some),
        }
    }
}

/// The prefix of `weights` values naming a Hugging Face repository.
pub const HF_SCHEME: &str = "hf:";

/// Files looked for, in order, in a repository snapshot when the spec names none.
const HF_WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// The Hugging Face hub cache folder, as `huggingface_hub` finds it: `$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = var("HF_HOME") {
        return p.join("hub");
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return p.join("huggingface").join("hub");
    }
    var("HOME")
        .unwrap_or_default()
        .join(".cache")
        .join("huggingface")
        .join("hub")
}

/// Resolves `ORG/NAME[/FILE][@REVISION]` in the local hub cache, offline:
/// `<cache>/models--ORG--NAME/snapshots/<rev>/FILE`, where `<rev>` is the commit that
/// `refs/<REVISION>` (default `main`) holds, or REVISION itself when it is a snapshot folder;
/// FILE defaults to `model.safetensors`, then `pytorch_model.bin`. The error names the path it
/// expected and how to fill the cache.
pub fn resolve_hf(spec: &str) -> EmbedResult<PathBuf> {
    resolve_hf_in(&hf_hub_cache(), spec)
}

/// [`resolve_hf`] in a given cache folder.
pub fn resolve_hf_in(cache: &Path, spec: &str) -> EmbedResult<PathBuf> {
    let (repo_file, revision) = match spec.rsplit_once('@') {
        Some((r, rev)) => (r, rev),
        None => (spec, "main"),
    };
    let mut parts = repo_file.splitn(3, '/');
    let (org, name, file) = (parts.next(), parts.next(), parts.next());
    let (Some(org), Some(name)) = (
        org.filter(|s| !s.is_empty()),
        name.filter(|s| !s.is_empty()),
    ) else {
        return Err(EmbedError::Weights {
            path: PathBuf::from(format!("{HF_SCHEME}{spec}")),
            message: "expected hf:ORG/NAME, hf:ORG/NAME/FILE or hf:ORG/NAME@REVISION".into(),
        });
    };
    let repo_dir = cache.join(format!("models--{org}--{name}"));
    let hint = format!(
        "not in the Hugging Face cache ({}; set HF_HOME or HF_HUB_CACHE to use another); tessera downloads nothing: fetch it once with `huggingface-cli download {org}/{name}`",
        cache.display()
    );
    let snapshots = repo_dir.join("snapshots");
    let rev = if snapshots.join(revision).is_dir() {
        revision.to_string()
    } else {
        let r = repo_dir.join("refs").join(revision);
        match std::fs::read_to_string(&r) {
            Ok(s) => s.trim().to_string(),
            Err(_) => {
                return Err(EmbedError::Weights {
                    path: r,
                    message: hint,
                })
            }
        }
    };
    let snapshot = snapshots.join(&rev);
    let candidates: Vec<PathBuf> = match file {
        Some(f) => vec![snapshot.join(f)],
        None => HF_WEIGHT_FILES.iter().map(|f| snapshot.join(f)).collect(),
    };
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    Err(EmbedError::Weights {
        path: candidates[0].clone(),
        message: if candidates.len() > 1 {
            format!("no such file, nor {}: {hint}", candidates[1].display())
        } else {
            format!("no such file: {hint}")
        },
    })
}

/// Keys under which training frameworks nest the state dict in `.pth` checkpoints.
const PTH_STATE_KEYS: [&str; 3] = ["state_dict", "model", "teacher"];

/// Opens the parameters as a `VarBuilder`, under `prefix` (e.g. `module.` for checkpoints saved
/// from `DataParallel`; empty for none).
pub fn var_builder(
    source: &WeightsSource,
    prefix: &str,
    device: &Device,
) -> EmbedResult<VarBuilder<'static>> {
    let vb = match source {
        WeightsSource::Random { seed } => VarBuilder::from_backend(
            Box::new(SeededInit { seed: *seed }),
            DType::F32,
            device.clone(),
        ),
        WeightsSource::File(path) => open_file(path, device)?,
        WeightsSource::HfHub(spec) => open_file(&resolve_hf(spec)?, device)?,
    };
    let prefix = prefix.trim_end_matches('.');
    Ok(if prefix.is_empty() { vb } else { vb.pp(prefix) })
}

fn open_file(path: &Path, device: &Device) -> EmbedResult<VarBuilder<'static>> {
    let err = |message: String| EmbedError::Weights {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(err("no such file".into()));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => {
            // SAFETY: the file is mapped read-only; like every mmap, it must not be truncated
            // while the model is built (parameters are copied out when loaded).
            unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
                .map_err(|e| err(format!("not a readable safetensors file: {e}")))
        }
        "pth" | "pt" | "bin" | "ckpt" => {
            let mut tensors = candle_core::pickle::PthTensors::new(path, None)
                .map_err(|e| err(format!("not a readable PyTorch checkpoint: {e}")))?;
            for key in PTH_STATE_KEYS {
                if !tensors.tensor_infos().is_empty() {
                    break;
                }
                if let Ok(nested) = candle_core::pickle::PthTensors::new(path, Some(key)) {
                    tensors = nested;
                }
            }
            if tensors.tensor_infos().is_empty() {
                return Err(err("holds no tensors (looked at the top level and under state_dict, model, teacher)".into()));
            }
            Ok(VarBuilder::from_backend(Box::new(tensors), DType::F32, device.clone()))
        }
        _ => Err(err(format!(
            "unknown weights format `.{ext}`: use .safetensors, or .pth/.pt/.bin for PyTorch checkpoints"
        ))),
    }
}

/// A `VarBuilder` backend that creates each requested parameter from its initialisation hint,
/// with a random stream derived from the seed and the parameter's name.
struct SeededInit {
    seed: u64,
}

impl SeededInit {
    fn rng_for(&self, name: &str) -> ChaCha8Rng {
        let mut h = blake3::Hasher::new();
        h.update(&self.seed.to_le_bytes());
        h.update(name.as_bytes());
        let mut seed = [0u8; 32];
        seed.copy_from_slice(h.finalize().as_bytes());
        ChaCha8Rng::from_seed(seed)
    }
}

fn normal(rng: &mut ChaCha8Rng, mean: f64, std: f64) -> f32 {
    // Box-Muller: two uniforms to one standard normal.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let mut rng = self.rng_for(name);
        let values: Vec<f32> = match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Randn { mean, stdev } => (0..n).map(|_| normal(&mut rng, mean, stdev)).collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = match fan {
                    FanInOut::FanIn => FanInOut::FanIn.for_shape(&shape),
                    FanInOut::FanOut => FanInOut::FanOut.for_shape(&shape),
                };
                let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => (0..n).map(|_| normal(&mut rng, 0.0, std)).collect(),
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n)
                            .map(|_| rng.random_range(-bound..bound) as f32)
                            .collect()
                    }
                }
            }
        };
        Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights cannot provide `{name}` without its shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_depend_on_seed_and_name_only() {
        let dev = Device::Cpu;
        let a = var_builder(&WeightsSource::Random { seed: 1 }, "", &dev).unwrap();
        let b = var_builder(&WeightsSource::Random { seed: 1 }, "", &dev).unwrap();
        let c = var_builder(&WeightsSource::Random { seed: 2 }, "", &dev).unwrap();
        let hint = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let get = |vb: &VarBuilder, name: &str| {
            vb.get_with_hints((8, 4), name, hint)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let _ = get(&b, "other"); // requesting another tensor first changes nothing
        assert_eq!(get(&a, "w"), get(&b, "w"));
        assert_ne!(get(&a, "w"), get(&c, "w"));
        assert_ne!(get(&a, "w"), get(&a, "v"));
        let ones = a
            .get_with_hints(3, "bn", Init::Const(1.0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ones, vec![1.0; 3]);
    }

    #[test]
    fn kaiming_normal_has_the_expected_spread() {
        let vb = var_builder(&WeightsSource::Random { seed: 7 }, "", &Device::Cpu).unwrap();
        let w = vb
            .get_with_hints((64, 32, 3, 3), "w", candle_nn::init::DEFAULT_KAIMING_NORMAL)
            .unwrap();
        let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        let expected = 2.0 / (32.0 * 9.0);
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var / expected - 1.0).abs() < 0.1, "{var} vs {expected}");
    }

    #[test]
    fn hf_weights_resolve_offline_in_a_hub_cache() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--Org--Model");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        // Not there yet: the error names the ref it looked for.
        let err = resolve_hf_in(cache.path(), "Org/Model")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refs/main") && err.contains("huggingface-cli download Org/Model"),
            "{err}"
        );
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        let err = resolve_hf_in(cache.path(), "Org/Model")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("abc123/model.safetensors") && err.contains("pytorch_model.bin"),
            "{err}"
        );
        std::fs::write(snap.join("pytorch_model.bin"), b"x").unwrap();
        assert_eq!(
            resolve_hf_in(cache.path(), "Org/Model").unwrap(),
            snap.join("pytorch_model.bin")
        );
        std::fs::write(snap.join("model.safetensors"), b"x").unwrap();
        assert_eq!(
            resolve_hf_in(cache.path(), "Org/Model").unwrap(),
            snap.join("model.safetensors")
        );
        std::fs::write(snap.join("uni.bin"), b"x").unwrap();
        assert_eq!(
            resolve_hf_in(cache.path(), "Org/Model/uni.bin@abc123").unwrap(),
            snap.join("uni.bin")
        );
        assert!(resolve_hf_in(cache.path(), "Org").is_err());
    }

    #[test]
    fn missing_and_unknown_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.safetensors");
        let err = var_builder(&WeightsSource::File(missing.clone()), "", &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("nope.safetensors"), "{err}");
        let odd = dir.path().join("w.onnx");
        std::fs::write(&odd, b"x").unwrap();
        let err = var_builder(&WeightsSource::File(odd), "", &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains(".onnx"), "{err}");
    }
}
