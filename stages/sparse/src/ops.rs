//! Candle operations over a rulebook: the CPU custom ops (deterministic parallel kernels with
//! a backward pass) and the device-generic path, an im2col gather ([`RowGather`], whose
//! backward is a gather too) and one matmul, used on CUDA and for other dtypes.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::gather::RowGather;
use crate::kernels::{self, Float};
use crate::rulebook::{cached, NbrMap, Rulebook, NONE};

/// Which map of the rulebook drives an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Input sites -> output sites (convolution).
    Forward,
    /// Output sites -> input sites (input gradient, transposed convolution).
    Backward,
}

impl Direction {
    fn flip(self) -> Self {
        match self {
            Direction::Forward => Direction::Backward,
            Direction::Backward => Direction::Forward,
        }
    }

    fn slot(self) -> usize {
        match self {
            Direction::Forward => 0,
            Direction::Backward => 1,
        }
    }
}

fn map_of(rb: &Rulebook, dir: Direction) -> &NbrMap {
    match dir {
        Direction::Forward => rb.forward_map(),
        Direction::Backward => rb.backward_map(),
    }
}

/// Sparse convolution `y[r] = sum_k x[map[r, k]] * w[k]` of features `x: [src, C_in]` with
/// weights `w: [K, C_in, C_out]`, differentiable in both.
///
/// On CPU with f32/f64 it runs the deterministic blocked kernels of [`crate::kernels`]; on any
/// other device or dtype it gathers every output row's neighbours into `[rows, K * C_in]`
/// and multiplies once by `w` as `[K * C_in, C_out]` ([`gather_conv`]).
pub fn sparse_conv(
    x: &Tensor,
    w: &Tensor,
    rb: &Arc<Rulebook>,
    dir: Direction,
) -> candle_core::Result<Tensor> {
    let map = map_of(rb, dir);
    let (src, cin) = x.dims2()?;
    let (k, wcin, cout) = w.dims3()?;
    if src != map.src_rows || k != map.k || wcin != cin {
        candle_core::bail!(
            "sparse_conv: features {:?} and weight {:?} do not fit a rulebook of {} sites and {} offsets",
            x.shape(),
            w.shape(),
            map.src_rows,
            map.k
        );
    }
    if x.dtype() != w.dtype() {
        candle_core::bail!(
            "sparse_conv: dtype mismatch {:?} vs {:?}",
            x.dtype(),
            w.dtype()
        );
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            ConvOp {
                rb: rb.clone(),
                dir,
            },
        )
    } else {
        gather_conv(x, w, rb, dir, cout)
    }
}

/// The row gather of `dir`'s neighbour table on `x`'s device, uploaded once per rulebook.
fn neighbour_gather(
    rb: &Rulebook,
    dir: Direction,
    device: &candle_core::Device,
) -> candle_core::Result<Arc<RowGather>> {
    cached(&rb.gather_cache[dir.slot()], device, || {
        let map = map_of(rb, dir);
        Ok(Arc::new(RowGather::new(&map.idx, map.src_rows, device)?))
    })
}

/// Im2col convolution with candle ops: gather `[rows, K * C_in]` (zeros for inactive
/// neighbours), one matmul with `w` as `[K * C_in, C_out]`. Every step is parallel over all
/// elements on a GPU, and the backward pass has no scatter (see [`RowGather`]).
pub fn gather_conv(
    x: &Tensor,
    w: &Tensor,
    rb: &Rulebook,
    dir: Direction,
    cout: usize,
) -> candle_core::Result<Tensor> {
    let map = map_of(rb, dir);
    let (_, cin) = x.dims2()?;
    let cols = neighbour_gather(rb, dir, x.device())?
        .apply(x)?
        .reshape((map.rows, map.k * cin))?;
    cols.matmul(&w.contiguous()?.reshape((map.k * cin, cout))?)
}

fn contiguous_slice<'a, T>(v: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("sparse op: {what} must be contiguous"),
    }
}

/// The CPU convolution op (see [`sparse_conv`]).
struct ConvOp {
    rb: Arc<Rulebook>,
    dir: Direction,
}

fn run_conv<T: Float>(
    map: &NbrMap,
    x: &[T],
    lx: &Layout,
    w: &[T],
    lw: &Layout,
) -> candle_core::Result<(Vec<T>, Shape)> {
    let (_, cin) = lx.shape().dims2()?;
    let (_, _, cout) = lw.shape().dims3()?;
    let x = contiguous_slice(x, lx, "features")?;
    let w = contiguous_slice(w, lw, "weight")?;
    Ok((
        kernels::gather_conv(map, x, cin, w, cout),
        Shape::from((map.rows, cout)),
    ))
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "sparse-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let map = map_of(&self.rb, self.dir);
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (v, s) = run_conv(map, x, l1, w, l2)?;
                Ok((CpuStorage::F32(v), s))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                let (v, s) = run_conv(map, x, l1, w, l2)?;
                Ok((CpuStorage::F64(v), s))
            }
            _ => candle_core::bail!("sparse-conv: only f32/f64 on cpu"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The input gradient (a whole convolution) is only computed when something upstream
        // of `x` is tracked: a first layer on constant embeddings skips it.
        let gx = if x.track_op() {
            let wt = w.transpose(1, 2)?.contiguous()?;
            Some(sparse_conv(&grad, &wt, &self.rb, self.dir.flip())?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.contiguous()?.apply_op2_no_bwd(
                &grad,
                &WeightGradOp {
                    rb: self.rb.clone(),
                    dir: self.dir,
                },
            )?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// `gw[k] = sum_r x[map[r, k]]^T g[r]`: the weight gradient of [`ConvOp`].
struct WeightGradOp {
    rb: Arc<Rulebook>,
    dir: Direction,
}

fn run_wgrad<T: Float>(
    map: &NbrMap,
    x: &[T],
    lx: &Layout,
    g: &[T],
    lg: &Layout,
) -> candle_core::Result<(Vec<T>, Shape)> {
    let (_, cin) = lx.shape().dims2()?;
    let (_, cout) = lg.shape().dims2()?;
    let x = contiguous_slice(x, lx, "features")?;
    let g = contiguous_slice(g, lg, "gradient")?;
    Ok((
        kernels::weight_grad(map, x, cin, g, cout),
        Shape::from((map.k, cin, cout)),
    ))
}

impl CustomOp2 for WeightGradOp {
    fn name(&self) -> &'static str {
        "sparse-conv-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let map = map_of(&self.rb, self.dir);
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                let (v, s) = run_wgrad(map, x, l1, g, l2)?;
                Ok((CpuStorage::F32(v), s))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                let (v, s) = run_wgrad(map, x, l1, g, l2)?;
                Ok((CpuStorage::F64(v), s))
            }
            _ => candle_core::bail!("sparse-conv-weight-grad: only f32/f64 on cpu"),
        }
    }
}

/// Gathers, for every output row, its `K` neighbours' features (`fill` where inactive):
/// `[n_out, K, C]`. Used by pooling; differentiable (a [`RowGather`]).
pub fn gather_neighbours(x: &Tensor, rb: &Rulebook, fill: f64) -> candle_core::Result<Tensor> {
    let map = rb.forward_map();
    let (n, c) = x.dims2()?;
    if n != map.src_rows {
        candle_core::bail!(
            "gather_neighbours: {n} rows for a rulebook of {} sites",
            map.src_rows
        );
    }
    let g = neighbour_gather(rb, Direction::Forward, x.device())?
        .apply(x)?
        .reshape((map.rows, map.k, c))?;
    if fill == 0.0 {
        return Ok(g);
    }
    // `fill` where the neighbour is missing (the gather left zeros there), 0 elsewhere.
    let missing: Vec<f32> = map
        .idx
        .iter()
        .map(|&s| if s == NONE { fill as f32 } else { 0.0 })
        .collect();
    let missing =
        Tensor::from_vec(missing, (map.rows, map.k, 1), x.device())?.to_dtype(x.dtype())?;
    g.broadcast_add(&missing)
}

/// Number of active inputs of every output row, `[n_out, 1]` in `dtype`.
pub fn active_counts(
    rb: &Rulebook,
    dtype: DType,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let t = cached(&rb.count_cache, device, || {
        let map = rb.forward_map();
        let v: Vec<f32> = map
            .idx
            .chunks(map.k.max(1))
            .map(|r| r.iter().filter(|&&s| s != crate::rulebook::NONE).count() as f32)
            .collect();
        Tensor::from_vec(v, (map.rows, 1), device)
    })?;
    t.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Var};

    use super::*;
    use crate::coords::CoordSet;
    use crate::rulebook::RuleKey;
    use crate::testutil::*;

    /// The device-generic path (what CUDA runs) equals the CPU kernels, values and gradients.
    #[test]
    fn generic_path_matches_cpu_kernels() {
        let cs = CoordSet::new(random_coords(3, 2, 12, 12, 0.3), 2).expect("coords");
        for key in [RuleKey::submanifold(3), RuleKey::strided(3, 2)] {
            let rb = cs.rulebook(key).expect("rb");
            for dir in [Direction::Forward, Direction::Backward] {
                let src = match dir {
                    Direction::Forward => rb.n_in(),
                    Direction::Backward => rb.n_out(),
                };
                let x = Var::from_tensor(&rand_tensor(1, &[src, 3], DType::F64)).expect("x");
                let w = Var::from_tensor(&rand_tensor(2, &[9, 3, 2], DType::F64)).expect("w");
                let a = sparse_conv(x.as_tensor(), w.as_tensor(), &rb, dir).expect("cpu");
                let b = gather_conv(x.as_tensor(), w.as_tensor(), &rb, dir, 2).expect("gather");
                assert_close(&a, &b, 1e-12, "forward");
                let r = rand_tensor(3, a.dims(), DType::F64);
                let ga = (&a * &r)
                    .and_then(|t| t.sum_all())
                    .and_then(|l| l.backward())
                    .expect("ga");
                let gb = (&b * &r)
                    .and_then(|t| t.sum_all())
                    .and_then(|l| l.backward())
                    .expect("gb");
                for t in [x.as_tensor(), w.as_tensor()] {
                    assert_close(ga.get(t).expect("a"), gb.get(t).expect("b"), 1e-12, "grad");
                }
            }
        }
    }

    /// An untracked input (e.g. constant embeddings) gets no gradient, and the weight
    /// gradient is the same as when the input is tracked.
    #[test]
    fn untracked_input_skips_input_gradient() {
        let cs = CoordSet::new(random_coords(5, 1, 16, 16, 0.4), 1).expect("coords");
        let rb = cs.rulebook(RuleKey::submanifold(3)).expect("rb");
        let xt = rand_tensor(1, &[rb.n_in(), 4], DType::F64);
        let w = Var::from_tensor(&rand_tensor(2, &[9, 4, 3], DType::F64)).expect("w");
        let r = rand_tensor(3, &[rb.n_out(), 3], DType::F64);
        let loss = |x: &Tensor| {
            let y = sparse_conv(x, w.as_tensor(), &rb, Direction::Forward).expect("conv");
            (&y * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("backward")
        };
        let g_const = loss(&xt);
        assert!(g_const.get(&xt).is_none());
        let xv = Var::from_tensor(&xt).expect("x");
        let g_var = loss(xv.as_tensor());
        assert!(g_var.get(xv.as_tensor()).is_some());
        assert_close(
            g_const.get(w.as_tensor()).expect("gw"),
            g_var.get(w.as_tensor()).expect("gw"),
            0.0,
            "weight grad",
        );
    }
}
