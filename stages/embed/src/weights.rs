//! Where a model's parameters come from: a local `.safetensors` or PyTorch `.pth` file, or
//! seeded random values (for tests and demos only: such embeddings mean nothing).

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
