//! The classifier head shared by every model (so comparisons between poolings are fair), and
//! a PyTorch-initialised linear layer.

use candle_core::{Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

/// `nn.Linear` with PyTorch's default init: weight and bias uniform in
/// `[-1/sqrt(in), 1/sqrt(in)]` (kaiming-uniform with `a = sqrt(5)`), as in the original code.
pub fn torch_linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let bound = 1.0 / (in_dim.max(1) as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// MLP classifier: `Linear(in, hidden) -> ReLU -> Linear(hidden, classes)`, or a single
/// `Linear(in, classes)` when `hidden == 0`. SparseConvMIL's original head has one hidden layer
/// of 32 units. Optional dropout on its input in training mode.
#[derive(Debug, Clone)]
pub struct Head {
    hidden: Option<Linear>,
    out: Linear,
    dropout: f32,
}

impl Head {
    /// Parameters under `vb` (`hidden.*`, `out.*`).
    pub fn new(
        in_dim: usize,
        hidden: usize,
        classes: usize,
        dropout: f32,
        vb: VarBuilder,
    ) -> candle_core::Result<Head> {
        let (hidden_layer, out_in) = if hidden == 0 {
            (None, in_dim)
        } else {
            (
                Some(torch_linear(in_dim, hidden, true, vb.pp("hidden"))?),
                hidden,
            )
        };
        Ok(Head {
            hidden: hidden_layer,
            out: torch_linear(out_in, classes, true, vb.pp("out"))?,
            dropout,
        })
    }

    /// Scores `[.., classes]` of representations `[.., in_dim]` (any leading dimensions).
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = if train && self.dropout > 0.0 {
            candle_nn::ops::dropout(x, self.dropout)?
        } else {
            x.clone()
        };
        let x = match &self.hidden {
            Some(h) => h.forward(&x)?.relu()?,
            None => x,
        };
        self.out.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::init::seeded_var_builder;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn head_matches_hand_computed_mlp() {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, 3, &dev);
        let head = Head::new(2, 3, 2, 0.0, vb).unwrap();
        let x = Tensor::new(&[[1f32, -2.0]], &dev).unwrap();
        let y = head.forward(&x, false).unwrap().to_vec2::<f32>().unwrap();
        let get = |n: &str| vars.data().lock().unwrap()[n].as_tensor().clone();
        let w1 = get("hidden.weight").to_vec2::<f32>().unwrap();
        let b1 = get("hidden.bias").to_vec1::<f32>().unwrap();
        let w2 = get("out.weight").to_vec2::<f32>().unwrap();
        let b2 = get("out.bias").to_vec1::<f32>().unwrap();
        let h: Vec<f32> = (0..3)
            .map(|o| (w1[o][0] - 2.0 * w1[o][1] + b1[o]).max(0.0))
            .collect();
        for c in 0..2 {
            let expected = (0..3).map(|o| w2[c][o] * h[o]).sum::<f32>() + b2[c];
            assert!(
                (y[0][c] - expected).abs() < 1e-5,
                "{} vs {expected}",
                y[0][c]
            );
        }
        let bound = 1.0 / 2f32.sqrt();
        assert!(w1.iter().flatten().all(|v| v.abs() <= bound));
    }
}
