//! Seeded parameter initialisation. Candle's CPU generator cannot be seeded, so a model built
//! from a plain `VarMap` differs on every run; this backend draws each parameter from a
//! ChaCha stream keyed by (experiment seed, parameter name), which makes a run reproducible
//! and independent of the order in which layers are created.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A `VarMap` whose missing variables are created from seeded random streams.
struct SeededVars {
    vars: VarMap,
    seed: u64,
}

/// A `VarBuilder` that creates trainable variables in `vars`, initialised reproducibly from
/// `seed`. Variables already in `vars` (e.g. loaded from a checkpoint) are reused.
pub fn seeded_var_builder(vars: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVars {
            vars: vars.clone(),
            seed,
        }),
        DType::F32,
        device.clone(),
    )
}

/// The variables of `vars` in name order: the optimizer and the tests walk them in an order
/// that does not depend on the hash map's.
pub fn named_vars(vars: &VarMap) -> Vec<(String, Var)> {
    let mut named: Vec<(String, Var)> = vars
        .data()
        .lock()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// The stream of one parameter: (experiment seed, "init", parameter name).
fn stream_seed(seed: u64, name: &str) -> u64 {
    crate::seeding::stream_seed(seed, "init", None, name)
}

/// Draws `n` values following `init` for a parameter of `shape`.
pub fn sample_init(init: Init, shape: &Shape, seed: u64) -> Vec<f32> {
    let n = shape.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..=up) as f32).collect()
    };
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box-Muller; 1 - u keeps the logarithm finite.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                (mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn => FanInOut::FanIn.for_shape(shape),
                FanInOut::FanOut => FanInOut::FanOut.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(&mut rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for SeededVars {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .vars
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter store lock poisoned".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "parameter `{name}` has shape {:?}, the model expects {s:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let values = sample_init(h, &s, stream_seed(self.seed, name));
        let tensor = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let data = self
            .vars
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter store lock poisoned".into()))?;
        match data.get(name) {
            Some(v) => v.as_tensor().to_device(dev)?.to_dtype(dtype),
            None => candle_core::bail!("parameter `{name}` does not exist"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_parameters_and_distribution_matches_init() {
        let dev = Device::Cpu;
        let make = |seed| {
            let vars = VarMap::new();
            let vb = seeded_var_builder(&vars, seed, &dev);
            let w = vb
                .get_with_hints(
                    (64, 100),
                    "layer.weight",
                    Init::Uniform { lo: -0.1, up: 0.1 },
                )
                .unwrap();
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b, c) = (make(1), make(1), make(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| (-0.1..=0.1).contains(v)));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.01, "uniform mean {mean}");

        let n = sample_init(
            Init::Randn {
                mean: 1.0,
                stdev: 2.0,
            },
            &Shape::from(20_000),
            7,
        );
        let m = n.iter().sum::<f32>() / n.len() as f32;
        let var = n.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / n.len() as f32;
        assert!(
            (m - 1.0).abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05,
            "mean {m} std {}",
            var.sqrt()
        );
    }

    #[test]
    fn existing_variables_are_reused_and_tracked() {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, 0, &dev);
        let a = vb.get_with_hints(3, "b", Init::Const(0.5)).unwrap();
        let again = vb.get_with_hints(3, "b", Init::Const(9.0)).unwrap();
        assert_eq!(again.to_vec1::<f32>().unwrap(), vec![0.5; 3]);
        assert_eq!(vars.all_vars().len(), 1);
        assert!(vb.get_with_hints(4, "b", Init::Const(0.0)).is_err());
        drop(a);
    }
}
