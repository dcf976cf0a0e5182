//! [`SparseTensor`]: active sites plus a feature matrix.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::coords::CoordSet;
use crate::error::{Result, SparseError};
use crate::rulebook::{RuleKey, Rulebook};

/// A batch of sparse 2D maps: `N` active sites `(batch, i, j)` and their features `[N, C]`.
///
/// Cloning is cheap (an `Arc` and a candle `Tensor`, itself reference-counted). Tensors derived
/// at the same resolution share one [`CoordSet`], hence one rulebook cache.
#[derive(Clone, Debug)]
pub struct SparseTensor {
    coords: Arc<CoordSet>,
    features: Tensor,
}

impl SparseTensor {
    /// Builds a sparse tensor from sites (`[batch, i, j]`, one per feature row) and features
    /// `[N, C]`, for `batch_size` maps.
    ///
    /// Errors on duplicate sites, out-of-range coordinates (see [`CoordSet::new`]) and when
    /// `features` is not `[coords.len(), C]`.
    pub fn new(coords: Vec<[i32; 3]>, features: Tensor, batch_size: usize) -> Result<Self> {
        check_rows(&features, coords.len())?;
        Ok(SparseTensor {
            coords: CoordSet::new(coords, batch_size)?,
            features,
        })
    }

    /// Attaches features to an existing coordinate set (reusing its rulebooks).
    pub fn from_coord_set(coords: Arc<CoordSet>, features: Tensor) -> Result<Self> {
        check_rows(&features, coords.len())?;
        Ok(SparseTensor { coords, features })
    }

    /// The sites, `[batch, i, j]` per feature row.
    pub fn coords(&self) -> &[[i32; 3]] {
        self.coords.coords()
    }

    /// The shared coordinate set (for rulebook access and identity checks).
    pub fn coord_set(&self) -> &Arc<CoordSet> {
        &self.coords
    }

    /// Features `[N, C]`, row `r` belonging to site `coords()[r]`.
    pub fn features(&self) -> &Tensor {
        &self.features
    }

    /// Number of maps in the batch.
    pub fn batch_size(&self) -> usize {
        self.coords.batch_size()
    }

    /// Number of active sites `N`.
    pub fn num_sites(&self) -> usize {
        self.coords.len()
    }

    /// Number of feature channels `C`.
    pub fn channels(&self) -> candle_core::Result<usize> {
        self.features.dim(1)
    }

    /// Device of the features.
    pub fn device(&self) -> &Device {
        self.features.device()
    }

    /// Dtype of the features.
    pub fn dtype(&self) -> DType {
        self.features.dtype()
    }

    /// Same sites, new features (activations, normalisation, dropout). Errors unless the new
    /// features have one row per site.
    pub fn with_features(&self, features: Tensor) -> candle_core::Result<SparseTensor> {
        check_rows(&features, self.coords.len())?;
        Ok(SparseTensor {
            coords: self.coords.clone(),
            features,
        })
    }

    /// Applies `f` to the features, keeping the sites (e.g. `|t| t.relu()`).
    pub fn map_features(
        &self,
        f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<SparseTensor> {
        self.with_features(f(&self.features)?)
    }

    /// The cached rulebook of `key` over these sites.
    pub fn rulebook(&self, key: RuleKey) -> candle_core::Result<Arc<Rulebook>> {
        Ok(self.coords.rulebook(key)?)
    }

    /// Whether `other` has the very same coordinate set (pointer equality, O(1)).
    pub fn same_sites(&self, other: &SparseTensor) -> bool {
        Arc::ptr_eq(&self.coords, &other.coords)
    }

    /// The zero-filled dense map `[B, C, height, width]` (differentiable). Meant for tests,
    /// debugging and small maps: it allocates the whole grid. Errors if a site falls outside.
    pub fn to_dense(&self, height: usize, width: usize) -> candle_core::Result<Tensor> {
        let (n, c) = self.features.dims2()?;
        let b = self.batch_size();
        let mut lin = Vec::with_capacity(n);
        for &[cb, i, j] in self.coords() {
            let (i, j) = (i as usize, j as usize);
            if i >= height || j >= width {
                candle_core::bail!("to_dense: site ({cb}, {i}, {j}) outside {height}x{width}");
            }
            lin.push(((cb as usize * height + i) * width + j) as u32);
        }
        let idx = Tensor::from_vec(lin, n, self.device())?;
        let zeros = Tensor::zeros((b * height * width, c), self.dtype(), self.device())?;
        zeros
            .index_add(&idx, &self.features, 0)?
            .reshape((b, height, width, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

fn check_rows(features: &Tensor, n: usize) -> Result<()> {
    match features.dims() {
        [rows, _] if *rows == n => Ok(()),
        d => Err(SparseError::ShapeMismatch(format!(
            "features must be [{n}, C] (one row per site), got {d:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_checks_shapes() {
        let dev = Device::Cpu;
        let f = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        assert!(SparseTensor::new(vec![[0, 0, 0], [0, 0, 1]], f.clone(), 1).is_ok());
        assert!(matches!(
            SparseTensor::new(vec![[0, 0, 0]], f.clone(), 1),
            Err(SparseError::ShapeMismatch(_))
        ));
        assert!(SparseTensor::new(vec![[0, 0, 0], [0, 0, 0]], f.clone(), 1).is_err());
        let t = SparseTensor::new(vec![[0, 0, 0], [0, 0, 1]], f.clone(), 1).unwrap();
        assert!(t.with_features(f.narrow(0, 0, 1).unwrap()).is_err());
        let u = t.with_features(f.ones_like().unwrap()).unwrap();
        assert!(u.same_sites(&t));
    }

    #[test]
    fn to_dense_places_rows() {
        let dev = Device::Cpu;
        let f = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let t = SparseTensor::new(vec![[1, 0, 1], [0, 1, 0]], f, 2).unwrap();
        let d = t.to_dense(2, 2).unwrap();
        assert_eq!(d.dims(), &[2, 2, 2, 2]);
        let flat: Vec<f32> = d.flatten_all().unwrap().to_vec1().unwrap();
        // batch 0, channel 0: [[0,0],[3,0]]; channel 1: [[0,0],[4,0]]
        assert_eq!(&flat[0..8], &[0., 0., 3., 0., 0., 0., 4., 0.]);
        // batch 1, channel 0: [[0,1],[0,0]]
        assert_eq!(&flat[8..12], &[0., 1., 0., 0.]);
        assert!(t.to_dense(1, 1).is_err());
    }
}
