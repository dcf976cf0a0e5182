//! Sparse adaptive global pooling: one dense `[B, C]` embedding per map of the batch.
//!
//! A batch entry with no active site is an **error** ([`SparseError::EmptyBatchEntry`]): its
//! embedding is undefined and silently returning zeros would let an empty slide train as if it
//! were real. Filter such slides upstream.

use candle_core::Tensor;

use crate::error::SparseError;
use crate::gather::RowGather;
use crate::rulebook::NONE;
use crate::tensor::SparseTensor;

fn counts(x: &SparseTensor) -> candle_core::Result<Vec<usize>> {
    let n = x.coord_set().sites_per_batch();
    if let Some(b) = n.iter().position(|&c| c == 0) {
        return Err(SparseError::EmptyBatchEntry(b).into());
    }
    Ok(n)
}

/// `[B, width, C]`: each batch entry's sites' features, zero rows after its last site, and
/// the padding mask `[B, width, 1]` (1 where padded); width = most sites in one entry.
fn by_entry(x: &SparseTensor, n: &[usize]) -> candle_core::Result<(Tensor, Vec<f32>, usize)> {
    let (_, c) = x.features().dims2()?;
    let b = x.batch_size();
    let width = n.iter().copied().max().unwrap_or(0);
    let mut table = vec![NONE; b * width];
    let mut fill = vec![0usize; b];
    for (r, s) in x.coords().iter().enumerate() {
        let e = s[0] as usize;
        table[e * width + fill[e]] = r as u32;
        fill[e] += 1;
    }
    let padded: Vec<f32> = table
        .iter()
        .map(|&r| if r == NONE { 1.0 } else { 0.0 })
        .collect();
    let g = RowGather::new(&table, x.num_sites(), x.device())?
        .apply(x.features())?
        .reshape((b, width, c))?;
    Ok((g, padded, width))
}

/// Mean of the active sites' features per batch entry, `[B, C]`.
pub fn global_avg_pool(x: &SparseTensor) -> candle_core::Result<Tensor> {
    let n = counts(x)?;
    let (g, _, _) = by_entry(x, &n)?;
    let inv: Vec<f32> = n.iter().map(|&c| 1.0 / c as f32).collect();
    let inv = Tensor::from_vec(inv, (n.len(), 1), x.device())?.to_dtype(x.dtype())?;
    g.sum(1)?.broadcast_mul(&inv)
}

/// Channel-wise max of the active sites' features per batch entry, `[B, C]`.
pub fn global_max_pool(x: &SparseTensor) -> candle_core::Result<Tensor> {
    let n = counts(x)?;
    let (g, padded, width) = by_entry(x, &n)?;
    // -inf on padding rows, so they never win the max.
    let pad: Vec<f32> = padded
        .iter()
        .map(|&p| if p > 0.0 { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    let pad = Tensor::from_vec(pad, (n.len(), width, 1), x.device())?.to_dtype(x.dtype())?;
    g.broadcast_add(&pad)?.max(1)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::testutil::*;

    #[test]
    fn pools_per_batch_entry() {
        let dev = Device::Cpu;
        let f = Tensor::new(&[[1f32, -1.], [3., -5.], [10., 2.]], &dev).expect("f");
        let x = SparseTensor::new(vec![[1, 0, 0], [0, 5, 5], [1, 2, 3]], f, 2).expect("x");
        let avg = global_avg_pool(&x)
            .and_then(|t| t.to_vec2::<f32>())
            .expect("avg");
        assert_eq!(avg, vec![vec![3., -5.], vec![5.5, 0.5]]);
        let max = global_max_pool(&x)
            .and_then(|t| t.to_vec2::<f32>())
            .expect("max");
        assert_eq!(max, vec![vec![3., -5.], vec![10., 2.]]);
    }

    #[test]
    fn empty_batch_entry_is_an_error() {
        let f = Tensor::ones((1, 2), DType::F32, &Device::Cpu).expect("f");
        let x = SparseTensor::new(vec![[0, 0, 0]], f, 2).expect("x");
        assert!(global_avg_pool(&x).is_err());
        assert!(global_max_pool(&x).is_err());
    }

    #[test]
    fn finite_difference_gradients_f64() {
        let coords = random_coords(7, 3, 5, 5, 0.5);
        let f = Var::from_tensor(&rand_tensor(8, &[coords.len(), 2], DType::F64)).expect("f");
        let x = SparseTensor::new(coords, f.as_tensor().clone(), 3).expect("x");
        let r = rand_tensor(9, &[3, 2], DType::F64);
        let loss = || {
            let x = x.with_features(f.as_tensor().clone())?;
            let x = crate::sparse_relu(&x)?;
            (global_avg_pool(&x)? * &r)?.sum_all()?
                + (global_max_pool(&x)?.sqr()? * &r)?.sum_all()?
        };
        finite_diff_check(&[&f], &loss, 50);
    }
}
