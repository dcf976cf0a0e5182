//! Convolution layers: submanifold, strided, transposed.
//!
//! Weights are `[K, C_in, C_out]` with `K = kernel * kernel` and offset `k = di * kernel + dj`,
//! the layout of PyTorch sparseconvnet (`weight[k, in, out]`), so SparseConvMIL checkpoints
//! map one-to-one. `weight[di * kernel + dj, ci, co]` equals `dense.weight[co, ci, di, dj]` of
//! the equivalent `torch.nn.Conv2d` (see [`dense_weight`]). Default init is PyTorch's
//! `Conv2d` init (Kaiming-uniform with `a = sqrt(5)`): weights and bias uniform in
//! `[-1/sqrt(fan_in), 1/sqrt(fan_in)]`, `fan_in = C_in * kernel^2`.

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::error::SparseError;
use crate::module::SparseModule;
use crate::ops::{sparse_conv, Direction};
use crate::rulebook::RuleKey;
use crate::tensor::SparseTensor;

/// Weights and optional bias shared by the three convolution kinds.
#[derive(Clone, Debug)]
struct ConvParams {
    weight: Tensor,
    bias: Option<Tensor>,
    in_c: usize,
    out_c: usize,
}

impl ConvParams {
    fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        bias: bool,
        fan_in: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if in_c == 0 || out_c == 0 {
            return Err(SparseError::InvalidConfig("channels must be positive".into()).into());
        }
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((kernel * kernel, in_c, out_c), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_c, "bias", init)?)
        } else {
            None
        };
        Ok(ConvParams {
            weight,
            bias,
            in_c,
            out_c,
        })
    }

    fn check_input(&self, x: &SparseTensor, what: &str) -> candle_core::Result<()> {
        let c = x.channels()?;
        if c != self.in_c {
            return Err(SparseError::ShapeMismatch(format!(
                "{what}: expected {} input channels, got {c}",
                self.in_c
            ))
            .into());
        }
        Ok(())
    }

    fn add_bias(&self, y: Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Submanifold sparse convolution (Graham & van der Maaten 2017): outputs exactly at the
/// input's active sites, reading only active neighbours, so sparsity does not dilate layer
/// after layer.
#[derive(Clone, Debug)]
pub struct SubmanifoldConv2d {
    p: ConvParams,
    kernel: usize,
}

impl SubmanifoldConv2d {
    /// `kernel` must be odd (3 is the usual choice); weights `weight [k*k, in_c, out_c]` and
    /// `bias [out_c]` are taken from `vb`.
    pub fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if kernel.is_multiple_of(2) {
            return Err(SparseError::InvalidConfig(format!(
                "submanifold kernel {kernel} must be odd"
            ))
            .into());
        }
        Ok(SubmanifoldConv2d {
            p: ConvParams::new(in_c, out_c, kernel, bias, in_c * kernel * kernel, vb)?,
            kernel,
        })
    }

    /// Weight `[k*k, in_c, out_c]`.
    pub fn weight(&self) -> &Tensor {
        &self.p.weight
    }

    /// Bias `[out_c]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.p.bias.as_ref()
    }

    /// Kernel side.
    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.p.out_c
    }
}

impl SparseModule for SubmanifoldConv2d {
    fn forward(&self, x: &SparseTensor) -> candle_core::Result<SparseTensor> {
        self.p.check_input(x, "SubmanifoldConv2d")?;
        let rb = x.rulebook(RuleKey::submanifold(self.kernel))?;
        let y = sparse_conv(x.features(), &self.p.weight, &rb, Direction::Forward)?;
        x.with_features(self.p.add_bias(y)?)
    }
}

/// Strided sparse convolution: output site `o` is active when its window
/// `[o*stride, o*stride + kernel)` (per axis, no padding) holds an active input, i.e. the
/// downsampled active sites; equal to a dense `conv2d(stride, padding 0)` on the zero-filled
/// grid, restricted to those sites.
#[derive(Clone, Debug)]
pub struct SparseConv2d {
    p: ConvParams,
    kernel: usize,
    stride: usize,
}

impl SparseConv2d {
    /// `weight [k*k, in_c, out_c]`, `bias [out_c]` from `vb`.
    pub fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if kernel == 0 || stride == 0 {
            return Err(
                SparseError::InvalidConfig("kernel and stride must be positive".into()).into(),
            );
        }
        Ok(SparseConv2d {
            p: ConvParams::new(in_c, out_c, kernel, bias, in_c * kernel * kernel, vb)?,
            kernel,
            stride,
        })
    }

    /// Weight `[k*k, in_c, out_c]`.
    pub fn weight(&self) -> &Tensor {
        &self.p.weight
    }

    /// Bias `[out_c]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.p.bias.as_ref()
    }
}

impl SparseModule for SparseConv2d {
    fn forward(&self, x: &SparseTensor) -> candle_core::Result<SparseTensor> {
        self.p.check_input(x, "SparseConv2d")?;
        let rb = x.rulebook(RuleKey::strided(self.kernel, self.stride))?;
        let out = strided_out(&rb)?;
        let y = sparse_conv(x.features(), &self.p.weight, &rb, Direction::Forward)?;
        Ok(SparseTensor::from_coord_set(out, self.p.add_bias(y)?)?)
    }
}

pub(crate) fn strided_out(
    rb: &crate::rulebook::Rulebook,
) -> candle_core::Result<Arc<crate::coords::CoordSet>> {
    match rb.out_coords() {
        Some(o) => Ok(o.clone()),
        None => candle_core::bail!("strided rulebook without output sites"),
    }
}

/// Transposed strided convolution (sparseconvnet's `Deconvolution`): maps a coarse tensor back
/// onto the fine sites it was downsampled from, using the very same rulebook with the roles
/// of input and output swapped (so it costs nothing to build). Fine site `p` receives
/// `sum_k x[o] * w[k]` over the coarse sites `o` whose window holds `p` at offset `k`.
#[derive(Clone, Debug)]
pub struct SparseConvTranspose2d {
    p: ConvParams,
    kernel: usize,
    stride: usize,
}

impl SparseConvTranspose2d {
    /// `weight [k*k, in_c, out_c]`, `bias [out_c]` from `vb`; fan-in for init is
    /// `in_c * kernel^2` like a strided conv's.
    pub fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if kernel == 0 || stride == 0 {
            return Err(
                SparseError::InvalidConfig("kernel and stride must be positive".into()).into(),
            );
        }
        Ok(SparseConvTranspose2d {
            p: ConvParams::new(in_c, out_c, kernel, bias, in_c * kernel * kernel, vb)?,
            kernel,
            stride,
        })
    }

    /// Weight `[k*k, in_c, out_c]`.
    pub fn weight(&self) -> &Tensor {
        &self.p.weight
    }

    /// Upsamples `x` onto `target`'s sites; `x` must carry the sites a `(kernel, stride)`
    /// strided layer produces from `target` (checked by pointer, then by value).
    pub fn forward_to(
        &self,
        x: &SparseTensor,
        target: &SparseTensor,
    ) -> candle_core::Result<SparseTensor> {
        self.p.check_input(x, "SparseConvTranspose2d")?;
        let rb = target.rulebook(RuleKey::strided(self.kernel, self.stride))?;
        let coarse = strided_out(&rb)?;
        if !Arc::ptr_eq(&coarse, x.coord_set()) && coarse.coords() != x.coords() {
            return Err(SparseError::CoordinateMismatch(
                "SparseConvTranspose2d: input sites are not the downsampled target sites".into(),
            )
            .into());
        }
        let y = sparse_conv(x.features(), &self.p.weight, &rb, Direction::Backward)?;
        target.with_features(self.p.add_bias(y)?)
    }
}

/// The dense `conv2d` weight `[C_out, C_in, k, k]` equivalent to a sparse weight
/// `[k*k, C_in, C_out]` (for export and for oracle tests).
pub fn dense_weight(w: &Tensor) -> candle_core::Result<Tensor> {
    let (kk, cin, cout) = w.dims3()?;
    let k = (kk as f64).sqrt().round() as usize;
    if k * k != kk {
        candle_core::bail!("dense_weight: {kk} offsets is not a square kernel");
    }
    w.reshape((k, k, cin, cout))?
        .permute((3, 2, 0, 1))?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::testutil::*;

    fn sparse_input(
        seed: u64,
        dtype: DType,
        cin: usize,
        h: i32,
        density: f64,
    ) -> (Var, SparseTensor) {
        let coords = random_coords(seed, 2, h, h + 1, density);
        let f = Var::from_tensor(&rand_tensor(seed + 1, &[coords.len(), cin], dtype)).expect("var");
        let x = SparseTensor::new(coords, f.as_tensor().clone(), 2).expect("sparse");
        (f, x)
    }

    fn vb(dtype: DType) -> (VarMap, VarBuilder<'static>) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
        (vm, vb)
    }

    #[test]
    fn submanifold_equals_masked_dense_conv() {
        for (kernel, dtype, tol) in [
            (3, DType::F32, 1e-5),
            (5, DType::F32, 1e-5),
            (3, DType::F64, 1e-12),
        ] {
            let (cin, cout, h) = (4, 3, 9);
            let (f, x) = sparse_input(11 + kernel as u64, dtype, cin, h, 0.4);
            let (_vm, vb) = vb(dtype);
            let conv = SubmanifoldConv2d::new(cin, cout, kernel, true, vb).expect("conv");
            let y = conv.forward(&x).expect("forward");
            assert!(y.same_sites(&x));
            let r = rand_tensor(5, &[x.num_sites(), cout], dtype);

            let dense = x.to_dense(h as usize, h as usize + 1).expect("dense");
            let dw = dense_weight(conv.weight()).expect("dense weight");
            let yd = dense.conv2d(&dw, kernel / 2, 1, 1, 1).expect("conv2d");
            let yd = dense_at(&yd, x.coords())
                .broadcast_add(conv.bias().expect("bias"))
                .expect("bias");
            assert_close(y.features(), &yd, tol, "forward");

            let gs = (y.features() * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("bwd");
            let gd = (&yd * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("bwd");
            for (t, what) in [(f.as_tensor(), "d features"), (conv.weight(), "d weight")] {
                let a = gs.get(t).expect("sparse grad");
                let b = gd.get(t).expect("dense grad");
                assert_close(a, b, tol * 10.0, what);
            }
        }
    }

    /// Dense grid side that holds every site and every output window of `(kernel, stride)`.
    fn grid_for(coords: &[[i32; 3]], kernel: usize, stride: usize) -> (usize, usize) {
        let side = |ax: usize| {
            let m = coords.iter().map(|c| c[ax] as usize).max().unwrap_or(0);
            let side = (m / stride * stride + kernel).max(m + 1);
            // candle's conv2d backward needs windows that tile the grid exactly.
            side + (stride - (side - kernel) % stride) % stride
        };
        (side(1), side(2))
    }

    #[test]
    fn strided_equals_dense_conv_at_output_sites() {
        for (kernel, stride) in [(2, 2), (3, 2), (3, 1), (1, 2)] {
            let (cin, cout) = (3, 4);
            let (f, x) = sparse_input(
                21 + kernel as u64 * 7 + stride as u64,
                DType::F32,
                cin,
                10,
                0.3,
            );
            let (_vm, vb) = vb(DType::F32);
            let conv = SparseConv2d::new(cin, cout, kernel, stride, true, vb).expect("conv");
            let y = conv.forward(&x).expect("forward");
            let (h, w) = grid_for(x.coords(), kernel, stride);
            let dense = x.to_dense(h, w).expect("dense");
            let yd = dense
                .conv2d(&dense_weight(conv.weight()).expect("dw"), 0, stride, 1, 1)
                .expect("conv2d");
            let yd = dense_at(&yd, y.coords())
                .broadcast_add(conv.bias().expect("b"))
                .expect("b");
            assert_close(y.features(), &yd, 1e-5, "strided forward");
            let r = rand_tensor(3, &[y.num_sites(), cout], DType::F32);
            let gs = (y.features() * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("bwd");
            let gd = (&yd * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("bwd");
            for (t, what) in [(f.as_tensor(), "d features"), (conv.weight(), "d weight")] {
                assert_close(gs.get(t).expect("gs"), gd.get(t).expect("gd"), 1e-4, what);
            }
        }
    }

    #[test]
    fn transposed_equals_dense_conv_transpose() {
        let (kernel, stride, cin, cout) = (3, 2, 3, 2);
        let (_f, fine) = sparse_input(31, DType::F32, 1, 9, 0.4);
        let (_vm, vb) = vb(DType::F32);
        let down = SparseConv2d::new(1, cin, kernel, stride, false, vb.pp("down")).expect("down");
        let coarse = down.forward(&fine).expect("coarse");
        let up =
            SparseConvTranspose2d::new(cin, cout, kernel, stride, false, vb.pp("up")).expect("up");
        let y = up.forward_to(&coarse, &fine).expect("up");
        assert!(y.same_sites(&fine));
        let (h, w) = grid_for(fine.coords(), kernel, stride);
        let (hc, wc) = ((h - kernel) / stride + 1, (w - kernel) / stride + 1);
        let dc = coarse.to_dense(hc, wc).expect("dense coarse");
        let wt = up
            .weight()
            .reshape((kernel, kernel, cin, cout))
            .and_then(|t| t.permute((2, 3, 0, 1)))
            .and_then(|t| t.contiguous())
            .expect("wt");
        let yd = dc
            .conv_transpose2d(&wt, 0, 0, stride, 1)
            .expect("conv_transpose2d");
        assert_close(
            y.features(),
            &dense_at(&yd, fine.coords()),
            1e-5,
            "transposed forward",
        );
        // Wrong coarse sites are rejected.
        assert!(up
            .forward_to(
                &fine
                    .with_features(
                        Tensor::zeros((fine.num_sites(), cin), DType::F32, &Device::Cpu)
                            .expect("z")
                    )
                    .expect("x"),
                &fine
            )
            .is_err());
    }

    #[test]
    fn finite_difference_gradients_f64() {
        let (f, x) = sparse_input(41, DType::F64, 2, 6, 0.5);
        let (vm, vb) = vb(DType::F64);
        let subm = SubmanifoldConv2d::new(2, 3, 3, true, vb.pp("s")).expect("s");
        let strided = SparseConv2d::new(3, 2, 3, 2, true, vb.pp("d")).expect("d");
        let up = SparseConvTranspose2d::new(2, 2, 3, 2, true, vb.pp("u")).expect("u");
        let loss = || {
            let x = x.with_features(f.as_tensor().clone())?;
            let a = subm.forward(&x)?;
            let b = strided.forward(&a)?;
            let c = up.forward_to(&b, &a)?;
            let r = rand_tensor(9, &[c.num_sites(), 2], DType::F64);
            let s = rand_tensor(10, &[b.num_sites(), 2], DType::F64);
            (c.features() * &r)?.sum_all()? + (b.features().sqr()? * &s)?.sum_all()?
        };
        let vars = vm.all_vars();
        let mut all: Vec<&Var> = vars.iter().collect();
        all.push(&f);
        finite_diff_check(&all, &loss, 12);
    }

    #[test]
    fn layer_results_identical_with_1_and_2_threads() {
        let (f, x) = sparse_input(51, DType::F32, 16, 60, 0.5);
        let (_vm, vb) = vb(DType::F32);
        let conv = SubmanifoldConv2d::new(16, 16, 3, true, vb.pp("a")).expect("conv");
        let down = SparseConv2d::new(16, 8, 3, 2, false, vb.pp("b")).expect("down");
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                let y = down.forward(&conv.forward(&x).expect("c")).expect("d");
                let g = y
                    .features()
                    .sqr()
                    .and_then(|t| t.sum_all())
                    .and_then(|l| l.backward())
                    .expect("b");
                let v = |t: &Tensor| -> Vec<f32> {
                    t.flatten_all().and_then(|t| t.to_vec1()).expect("v")
                };
                (
                    v(y.features()),
                    v(g.get(f.as_tensor()).expect("gf")),
                    v(g.get(conv.weight()).expect("gw")),
                    v(g.get(down.weight()).expect("gw2")),
                )
            })
        };
        assert!(run(1) == run(2), "results differ between 1 and 2 threads");
    }

    #[test]
    fn rejects_bad_configs_and_channels() {
        let (_vm, vb) = vb(DType::F32);
        assert!(SubmanifoldConv2d::new(2, 2, 2, false, vb.pp("a")).is_err());
        assert!(SparseConv2d::new(2, 2, 2, 0, false, vb.pp("b")).is_err());
        let conv = SubmanifoldConv2d::new(2, 2, 3, false, vb.pp("c")).expect("c");
        let (_f, x) = sparse_input(1, DType::F32, 3, 4, 0.5);
        assert!(conv.forward(&x).is_err());
    }
}
