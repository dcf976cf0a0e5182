//! A row gather whose backward pass is a gather too.
//!
//! candle differentiates `index_select` with `index_add`, whose CUDA kernel runs one thread per
//! column and loops over every index: on a sparse map of 100k sites and 32 channels that is 32
//! threads doing all the work, which made a GPU convolution slower than the CPU. The sparse
//! maps here know each source row's uses in advance (a site is some output's neighbour at most
//! once per kernel offset), so the backward pass can be written as a gather of the output
//! gradient through the inverse table, then a sum over the (few) uses: parallel over every
//! element, deterministic, and the same on every device.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};

use crate::rulebook::NONE;

/// `x[idx]` over rows, with [`NONE`] giving a zero row, differentiable in `x`.
#[derive(Debug, Clone)]
pub struct RowGather {
    /// `[n]` source row of every output row (`NONE`: zero row).
    index: Tensor,
    /// `[src_rows * uses]`: the output rows that read each source row, `NONE`-padded.
    inverse: Tensor,
    src_rows: usize,
    /// The most output rows that read one source row.
    uses: usize,
}

impl RowGather {
    /// A gather of `index.len()` rows out of `src_rows`, its tables uploaded to `device`.
    pub fn new(index: &[u32], src_rows: usize, device: &Device) -> candle_core::Result<Self> {
        let mut count = vec![0usize; src_rows];
        for &s in index {
            if s != NONE {
                let s = s as usize;
                if s >= src_rows {
                    candle_core::bail!("row gather: index {s} out of {src_rows} rows");
                }
                count[s] += 1;
            }
        }
        let uses = count.iter().copied().max().unwrap_or(0).max(1);
        let mut inverse = vec![NONE; src_rows * uses];
        let mut fill = vec![0usize; src_rows];
        for (r, &s) in index.iter().enumerate() {
            if s != NONE {
                let s = s as usize;
                inverse[s * uses + fill[s]] = r as u32;
                fill[s] += 1;
            }
        }
        Ok(RowGather {
            index: Tensor::from_slice(index, index.len(), device)?,
            inverse: Tensor::from_vec(inverse, src_rows * uses, device)?,
            src_rows,
            uses,
        })
    }

    /// Rows gathered, `[n, C]` from `x: [src_rows, C]`.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, _) = x.dims2()?;
        if rows != self.src_rows {
            candle_core::bail!("row gather: {rows} rows in, a table for {}", self.src_rows);
        }
        x.contiguous()?.apply_op2(&self.index, self.clone())
    }

    /// The most output rows that read one source row (the backward pass's sum length).
    pub fn uses(&self) -> usize {
        self.uses
    }
}

fn select<B: BackendStorage>(
    x: &B,
    lx: &Layout,
    ids: &B,
    lids: &Layout,
) -> candle_core::Result<(B, Shape)> {
    let (_, c) = lx.shape().dims2()?;
    let n = lids.shape().elem_count();
    Ok((x.index_select(ids, lx, lids, 0)?, Shape::from((n, c))))
}

impl CustomOp2 for RowGather {
    fn name(&self) -> &'static str {
        "row-gather"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        ids: &CpuStorage,
        lids: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        select(x, lx, ids, lids)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        ids: &candle_core::CudaStorage,
        lids: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        select(x, lx, ids, lids)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _index: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, c) = x.dims2()?;
        let g = grad
            .contiguous()?
            .index_select(&self.inverse, 0)?
            .reshape((self.src_rows, self.uses, c))?
            .sum(1)?;
        Ok((Some(g), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    #[test]
    fn gather_and_its_gradient_match_index_select() {
        let dev = Device::Cpu;
        let index = [3u32, NONE, 0, 3, 1, NONE, 3];
        let g = RowGather::new(&index, 5, &dev).expect("gather");
        assert_eq!(
            (g.index.dtype(), g.inverse.dtype()),
            (DType::U32, DType::U32)
        );
        assert_eq!(g.uses(), 3);
        let x = Var::from_tensor(
            &Tensor::arange(0f64, 15., &dev)
                .and_then(|t| t.reshape((5, 3)))
                .expect("x"),
        )
        .expect("var");
        let y = g.apply(x.as_tensor()).expect("apply");
        let rows = y.to_vec2::<f64>().expect("rows");
        for (r, &s) in index.iter().enumerate() {
            let want: Vec<f64> = if s == NONE {
                vec![0.; 3]
            } else {
                (0..3).map(|c| (s as usize * 3 + c) as f64).collect()
            };
            assert_eq!(rows[r], want, "row {r}");
        }
        // d/dx of sum(y * w): each source row collects the weights of the rows that read it.
        let w = Tensor::arange(1f64, 22., &dev)
            .and_then(|t| t.reshape((7, 3)))
            .expect("w");
        let grads = (y * &w)
            .and_then(|t| t.sum_all())
            .and_then(|l| l.backward())
            .expect("backward");
        let got = grads.get(&x).expect("grad").to_vec2::<f64>().expect("v");
        let wv = w.to_vec2::<f64>().expect("w");
        for (s, row) in got.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                let want: f64 = index
                    .iter()
                    .enumerate()
                    .filter(|(_, &i)| i as usize == s)
                    .map(|(r, _)| wv[r][c])
                    .sum();
                assert_eq!(*v, want, "source {s} channel {c}");
            }
        }
    }

    #[test]
    fn out_of_range_index_is_an_error() {
        assert!(RowGather::new(&[0, 5], 5, &Device::Cpu).is_err());
    }
}
