//! Sparse max and average pooling with kernel and stride (output sites as for a strided
//! convolution with the same geometry, whose rulebook and output sites they share).

use candle_core::Tensor;

use crate::conv::strided_out;
use crate::error::SparseError;
use crate::module::SparseModule;
use crate::ops::{active_counts, gather_neighbours};
use crate::rulebook::RuleKey;
use crate::tensor::SparseTensor;

fn check(kernel: usize, stride: usize) -> candle_core::Result<()> {
    if kernel == 0 || stride == 0 {
        return Err(
            SparseError::InvalidConfig("pool kernel and stride must be positive".into()).into(),
        );
    }
    Ok(())
}

/// Max over the **active** sites of each window (inactive sites are absent, not zeros), as in
/// sparseconvnet's `MaxPooling`; equals a dense `max_pool2d` on the grid filled with `-inf`.
#[derive(Clone, Copy, Debug)]
pub struct SparseMaxPool2d {
    kernel: usize,
    stride: usize,
}

impl SparseMaxPool2d {
    /// Pooling over `kernel x kernel` windows every `stride` sites.
    pub fn new(kernel: usize, stride: usize) -> candle_core::Result<Self> {
        check(kernel, stride)?;
        Ok(SparseMaxPool2d { kernel, stride })
    }
}

impl SparseModule for SparseMaxPool2d {
    fn forward(&self, x: &SparseTensor) -> candle_core::Result<SparseTensor> {
        let rb = x.rulebook(RuleKey::strided(self.kernel, self.stride))?;
        let out = strided_out(&rb)?;
        let g = gather_neighbours(x.features(), &rb, f64::NEG_INFINITY)?;
        Ok(SparseTensor::from_coord_set(out, g.max(1)?)?)
    }
}

/// What an average divides by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AvgDivisor {
    /// The window area `kernel^2` (inactive sites count as zeros): sparseconvnet's
    /// `AveragePooling`, equal to a dense `avg_pool2d` on the zero-filled grid.
    #[default]
    KernelArea,
    /// The number of active sites in the window (a mean over present tiles only).
    ActiveSites,
}

/// Average pooling over windows of active sites.
#[derive(Clone, Copy, Debug)]
pub struct SparseAvgPool2d {
    kernel: usize,
    stride: usize,
    divisor: AvgDivisor,
}

impl SparseAvgPool2d {
    /// Pooling dividing by the window area (see [`AvgDivisor::KernelArea`]).
    pub fn new(kernel: usize, stride: usize) -> candle_core::Result<Self> {
        Self::with_divisor(kernel, stride, AvgDivisor::KernelArea)
    }

    /// Pooling with an explicit divisor.
    pub fn with_divisor(
        kernel: usize,
        stride: usize,
        divisor: AvgDivisor,
    ) -> candle_core::Result<Self> {
        check(kernel, stride)?;
        Ok(SparseAvgPool2d {
            kernel,
            stride,
            divisor,
        })
    }
}

impl SparseModule for SparseAvgPool2d {
    fn forward(&self, x: &SparseTensor) -> candle_core::Result<SparseTensor> {
        let rb = x.rulebook(RuleKey::strided(self.kernel, self.stride))?;
        let out = strided_out(&rb)?;
        let sum = gather_neighbours(x.features(), &rb, 0.0)?.sum(1)?;
        let y: Tensor = match self.divisor {
            AvgDivisor::KernelArea => (sum / (self.kernel * self.kernel) as f64)?,
            AvgDivisor::ActiveSites => {
                sum.broadcast_div(&active_counts(&rb, x.dtype(), x.device())?)?
            }
        };
        Ok(SparseTensor::from_coord_set(out, y)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor, Var};

    use super::*;
    use crate::testutil::*;

    fn input(seed: u64, dtype: DType) -> (Var, SparseTensor) {
        let coords = random_coords(seed, 2, 11, 10, 0.35);
        let f = Var::from_tensor(&rand_tensor(seed + 1, &[coords.len(), 3], dtype)).expect("var");
        let x = SparseTensor::new(coords, f.as_tensor().clone(), 2).expect("sparse");
        (f, x)
    }

    /// Grid that every window of `(kernel, stride)` tiles exactly.
    fn grid(kernel: usize, stride: usize) -> usize {
        let side = (10 / stride * stride + kernel).max(11);
        side + (stride - (side - kernel) % stride) % stride
    }

    #[test]
    fn max_pool_equals_dense_on_minus_inf_grid() {
        for (kernel, stride) in [(2, 2), (3, 2), (3, 3)] {
            let (f, x) = input(3 + kernel as u64, DType::F32);
            let y = SparseMaxPool2d::new(kernel, stride)
                .and_then(|p| p.forward(&x))
                .expect("pool");
            let g = grid(kernel, stride);
            let mask = dense_mask(&x, g, g).ne(0f32).expect("mask");
            let dense = x.to_dense(g, g).expect("dense");
            let neg = Tensor::full(f32::NEG_INFINITY, dense.shape(), dense.device()).expect("neg");
            let mask = mask.broadcast_as(dense.shape()).expect("b");
            let filled = mask.where_cond(&dense, &neg).expect("where");
            let yd = filled
                .max_pool2d_with_stride(kernel, stride)
                .expect("max_pool2d");
            let yd = dense_at(&yd, y.coords());
            assert_close(y.features(), &yd, 1e-6, "max pool forward");
            if kernel != stride {
                // candle's dense pooling backward only supports kernel == stride; the
                // overlapping case is covered by the finite-difference test.
                continue;
            }
            let r = rand_tensor(8, &[y.num_sites(), 3], DType::F32);
            let gs = (y.features() * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("gs");
            let gd = (&yd * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("gd");
            // candle 0.11.1's max_pool2d backward scales a unique maximum's gradient by
            // 1 / kernel^2 (it multiplies by the window's mean of the arg-max mask instead of
            // dividing by its count); undo that to use it as the oracle.
            let gd = (gd.get(f.as_tensor()).expect("b") * (kernel * kernel) as f64).expect("scale");
            assert_close(
                gs.get(f.as_tensor()).expect("a"),
                &gd,
                1e-5,
                "max pool grad",
            );
        }
    }

    #[test]
    fn avg_pool_equals_dense_on_zero_grid() {
        for (kernel, stride) in [(2, 2), (3, 2)] {
            let (f, x) = input(13 + kernel as u64, DType::F32);
            let y = SparseAvgPool2d::new(kernel, stride)
                .and_then(|p| p.forward(&x))
                .expect("pool");
            let g = grid(kernel, stride);
            let yd = x
                .to_dense(g, g)
                .and_then(|d| d.avg_pool2d_with_stride(kernel, stride))
                .expect("avg_pool2d");
            let yd = dense_at(&yd, y.coords());
            assert_close(y.features(), &yd, 1e-6, "avg pool forward");
            if kernel != stride {
                // candle's dense pooling backward only supports kernel == stride; the
                // overlapping case is covered by the finite-difference test.
                continue;
            }
            let r = rand_tensor(8, &[y.num_sites(), 3], DType::F32);
            let gs = (y.features() * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("gs");
            let gd = (&yd * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("gd");
            assert_close(
                gs.get(f.as_tensor()).expect("a"),
                gd.get(f.as_tensor()).expect("b"),
                1e-6,
                "avg pool grad",
            );
        }
    }

    #[test]
    fn avg_pool_active_divisor_is_mean_of_present_sites() {
        let dev = candle_core::Device::Cpu;
        let f = Tensor::new(&[[2f32], [4.], [9.]], &dev).expect("f");
        let x = SparseTensor::new(vec![[0, 0, 0], [0, 1, 1], [0, 2, 2]], f, 1).expect("x");
        let y = SparseAvgPool2d::with_divisor(2, 2, AvgDivisor::ActiveSites)
            .and_then(|p| p.forward(&x))
            .expect("pool");
        assert_eq!(y.coords(), &[[0, 0, 0], [0, 1, 1]]);
        assert_eq!(
            y.features()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("v"),
            vec![3.0, 9.0]
        );
    }

    #[test]
    fn finite_difference_gradients_f64() {
        let (f, x) = input(23, DType::F64);
        let maxp = SparseMaxPool2d::new(3, 2).expect("max");
        let avgp = SparseAvgPool2d::with_divisor(2, 2, AvgDivisor::ActiveSites).expect("avg");
        let loss = || {
            let x = x.with_features(f.as_tensor().clone())?;
            let a = maxp.forward(&x)?;
            let b = avgp.forward(&x)?;
            let ra = rand_tensor(1, &[a.num_sites(), 3], DType::F64);
            let rb = rand_tensor(2, &[b.num_sites(), 3], DType::F64);
            (a.features() * &ra)?.sum_all()? + (b.features() * &rb)?.sum_all()?
        };
        finite_diff_check(&[&f], &loss, 40);
    }

    #[test]
    fn pool_and_conv_of_same_geometry_share_sites() {
        let (_f, x) = input(33, DType::F32);
        let a = SparseMaxPool2d::new(2, 2)
            .and_then(|p| p.forward(&x))
            .expect("a");
        let b = SparseAvgPool2d::new(2, 2)
            .and_then(|p| p.forward(&x))
            .expect("b");
        assert!(a.same_sites(&b));
    }
}
