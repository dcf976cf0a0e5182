//! A task that depends on spatial arrangement only: three sites in a horizontal line vs three
//! in a vertical line, every feature identical. Global pooling alone sees the same bag in both
//! classes; two submanifold convolutions before it learn the task to 100%.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{linear, AdamW, Linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_sparse::{
    global_avg_pool, global_max_pool, sparse_relu, SparseModule, SparseTensor, SubmanifoldConv2d,
};

const GRID: i32 = 12;

/// A batch of lines at random places: label 0 horizontal, 1 vertical.
fn batch(rng: &mut ChaCha8Rng, n: usize) -> Result<(SparseTensor, Tensor)> {
    let mut coords = Vec::new();
    let mut labels = Vec::new();
    for b in 0..n as i32 {
        let label = (b % 2) as u32;
        let (i, j) = (rng.random_range(0..GRID - 2), rng.random_range(0..GRID - 2));
        for t in 0..3 {
            coords.push(if label == 0 {
                [b, i, j + t]
            } else {
                [b, i + t, j]
            });
        }
        labels.push(label);
    }
    let feats = Tensor::ones((coords.len(), 1), DType::F32, &Device::Cpu)?;
    Ok((
        SparseTensor::new(coords, feats, n)?,
        Tensor::new(labels, &Device::Cpu)?,
    ))
}

struct Net {
    c1: SubmanifoldConv2d,
    c2: SubmanifoldConv2d,
    head: Linear,
}

impl Net {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Net {
            c1: SubmanifoldConv2d::new(1, 8, 3, true, vb.pp("c1"))?,
            c2: SubmanifoldConv2d::new(8, 8, 3, true, vb.pp("c2"))?,
            head: linear(8, 2, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &SparseTensor) -> Result<Tensor> {
        let h = sparse_relu(&self.c1.forward(x)?)?;
        let h = sparse_relu(&self.c2.forward(&h)?)?;
        self.head.forward(&global_max_pool(&h)?)
    }
}

fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f32> {
    let pred = logits.argmax(D::Minus1)?;
    pred.eq(labels)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar()
}

#[test]
fn global_pooling_alone_cannot_separate_the_classes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (x, _) = batch(&mut rng, 8)?;
    for pooled in [global_avg_pool(&x)?, global_max_pool(&x)?] {
        let rows = pooled.to_vec2::<f32>()?;
        // Every bag, horizontal or vertical, pools to the same embedding: no classifier on it
        // can beat chance.
        assert!(rows.iter().all(|r| r == &rows[0]));
    }
    Ok(())
}

#[test]
fn two_layer_sparse_cnn_learns_line_orientation() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let vm = VarMap::new();
    let net = Net::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 0.03,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let (test_x, test_y) = batch(&mut rng, 64)?;
    let mut acc = 0.0;
    for step in 0..400 {
        let (x, y) = batch(&mut rng, 16)?;
        let loss = candle_nn::loss::cross_entropy(&net.forward(&x)?, &y)?;
        opt.backward_step(&loss)?;
        acc = accuracy(&net.forward(&test_x)?, &test_y)?;
        if acc == 1.0 && loss.to_scalar::<f32>()? < 0.05 {
            eprintln!("converged after {} steps", step + 1);
            break;
        }
    }
    assert_eq!(acc, 1.0, "test accuracy {acc}");
    Ok(())
}
