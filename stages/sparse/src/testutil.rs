//! Shared helpers of the unit tests: random sparse maps, dense oracles, finite differences.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::tensor::SparseTensor;

/// Random distinct sites on `b` maps of `h x w`, with probability `density`, shuffled.
pub fn random_coords(seed: u64, b: usize, h: i32, w: i32, density: f64) -> Vec<[i32; 3]> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = Vec::new();
    for bb in 0..b as i32 {
        for i in 0..h {
            for j in 0..w {
                if rng.random::<f64>() < density {
                    v.push([bb, i, j]);
                }
            }
        }
    }
    // Fisher-Yates shuffle so that the sites do not come sorted.
    for k in (1..v.len()).rev() {
        let r = rng.random_range(0..=k);
        v.swap(k, r);
    }
    v
}

/// Uniform random tensor in `[-1, 1)`.
pub fn rand_tensor(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("random tensor")
}

/// The rows of a dense `[B, C, H, W]` map at the sites of `coords`, `[N, C]`.
pub fn dense_at(d: &Tensor, coords: &[[i32; 3]]) -> Tensor {
    let (_, c, h, w) = d.dims4().expect("dense rank 4");
    let lin: Vec<u32> = coords
        .iter()
        .map(|&[b, i, j]| ((b as usize * h + i as usize) * w + j as usize) as u32)
        .collect();
    let idx = Tensor::from_vec(lin, coords.len(), d.device()).expect("index");
    d.permute((0, 2, 3, 1))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape(((), c)))
        .and_then(|t| t.index_select(&idx, 0))
        .expect("dense gather")
}

/// A `[B, 1, H, W]` 0/1 mask of active sites.
pub fn dense_mask(x: &SparseTensor, h: usize, w: usize) -> Tensor {
    let ones = Tensor::ones((x.num_sites(), 1), x.dtype(), x.device()).expect("ones");
    x.with_features(ones)
        .and_then(|t| t.to_dense(h, w))
        .expect("mask")
}

/// Asserts that two tensors agree element-wise within `tol`.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a: Vec<f64> = a
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1())
        .expect("a");
    let b: Vec<f64> = b
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1())
        .expect("b");
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(worst <= tol, "{what}: max abs diff {worst} > {tol}");
}

/// Checks the analytic gradients of the scalar `loss()` w.r.t. `vars` against central
/// differences (f64), on at most `max_per_var` entries of each variable.
pub fn finite_diff_check(
    vars: &[&Var],
    loss: &dyn Fn() -> candle_core::Result<Tensor>,
    max_per_var: usize,
) {
    let l = loss().expect("loss");
    let grads = l.backward().expect("backward");
    let h = 1e-6;
    for (vi, var) in vars.iter().enumerate() {
        let g = grads
            .get(var.as_tensor())
            .map(|g| {
                g.flatten_all()
                    .and_then(|t| t.to_vec1::<f64>())
                    .expect("grad")
            })
            .unwrap_or_else(|| vec![0.0; var.elem_count()]);
        let base: Vec<f64> = var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("values");
        let n = base.len();
        let step = (n / max_per_var).max(1);
        for e in (0..n).step_by(step) {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[e] += delta;
                let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).expect("perturbed");
                var.set(&t).expect("set");
                loss()
                    .and_then(|l| l.to_scalar::<f64>())
                    .expect("loss value")
            };
            let num = (eval(h) - eval(-h)) / (2.0 * h);
            let t = Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).expect("restore");
            var.set(&t).expect("restore");
            let err = (num - g[e]).abs();
            assert!(
                err <= 1e-6 * (1.0 + num.abs()),
                "var {vi} entry {e}: analytic {} numeric {num}",
                g[e]
            );
        }
    }
}
