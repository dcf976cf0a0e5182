//! SparseConvMIL (Lerousseau et al. 2021): instance embeddings placed on a sparse map at their
//! (downsampled) tile positions, a sparse CNN of submanifold convolutions, sparse adaptive
//! global pooling to one bag embedding, then the shared classifier head. The original code
//! uses two 3x3 submanifold convolutions with bias (32 or 128 channels), ReLU, and global
//! average pooling.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use tessera_sparse::{
    global_avg_pool, global_max_pool, sparse_relu, SparseBatchNorm, SparseModule, SparseModuleT,
    SparseTensor, SubmanifoldConv2d,
};

use super::bag::BagBatch;
use super::head::Head;
use super::MilModel;

/// The global pooling that ends the sparse CNN.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum GlobalPool {
    /// Mean over active sites (the original SparseConvMIL).
    Avg,
    /// Channel-wise max over active sites.
    Max,
}

/// One block of the sparse CNN: submanifold conv (+ batch-norm) + ReLU.
#[derive(Debug, Clone)]
struct Block {
    conv: SubmanifoldConv2d,
    norm: Option<SparseBatchNorm>,
}

/// The sparse CNN and head.
#[derive(Debug, Clone)]
pub struct SparseConvMil {
    blocks: Vec<Block>,
    pool: GlobalPool,
    head: Head,
}

impl SparseConvMil {
    /// Blocks `sparse.{n}.conv` / `sparse.{n}.norm` with `channels[n]` outputs each; the head
    /// reads the last block's channels (or the embeddings when `channels` is empty).
    pub fn new(
        in_dim: usize,
        channels: &[usize],
        kernel: usize,
        batch_norm: bool,
        pool: GlobalPool,
        head: Head,
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let mut blocks = Vec::with_capacity(channels.len());
        let mut prev = in_dim;
        for (n, &c) in channels.iter().enumerate() {
            let vb = vb.pp("sparse").pp(n.to_string());
            let conv = SubmanifoldConv2d::new(prev, c, kernel, true, vb.pp("conv"))?;
            let norm = if batch_norm {
                Some(SparseBatchNorm::new(c, vb.pp("norm"))?)
            } else {
                None
            };
            blocks.push(Block { conv, norm });
            prev = c;
        }
        Ok(SparseConvMil { blocks, pool, head })
    }

    /// Channels of the bag embedding the head reads.
    pub fn embedding_channels(in_dim: usize, channels: &[usize]) -> usize {
        channels.last().copied().unwrap_or(in_dim)
    }

    /// The output of the last sparse block (conv, batch-norm, ReLU) over the bags' sites: the
    /// activations class activation mapping reads. With no blocks, the input embeddings.
    pub fn activations(&self, bags: &BagBatch, train: bool) -> candle_core::Result<SparseTensor> {
        let sites = bags.sites().ok_or_else(|| {
            candle_core::Error::Msg(
                "sparseconvmil needs sparse-map positions (`map_i`, `map_j`) for every bag: add a sparse_map stage upstream"
                    .into(),
            )
        })?;
        let mut x = SparseTensor::new(sites.to_vec(), bags.features().clone(), bags.batch_size())
            .map_err(candle_core::Error::from)?;
        for block in &self.blocks {
            x = block.conv.forward(&x)?;
            if let Some(norm) = &block.norm {
                x = norm.forward_t(&x, train)?;
            }
            x = sparse_relu(&x)?;
        }
        Ok(x)
    }

    /// Global pooling of [`SparseConvMil::activations`]: the bag embeddings `[B, C]`.
    pub fn pool(&self, x: &SparseTensor) -> candle_core::Result<Tensor> {
        match self.pool {
            GlobalPool::Avg => global_avg_pool(x),
            GlobalPool::Max => global_max_pool(x),
        }
    }

    /// Logits `[B, classes]` of given last-block activations (pooling, then the head).
    pub fn classify(&self, x: &SparseTensor, train: bool) -> candle_core::Result<Tensor> {
        self.head.forward(&self.pool(x)?, train)
    }

    /// The bag embeddings `[B, C]` (before the head).
    pub fn embed(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        self.pool(&self.activations(bags, train)?)
    }
}

impl MilModel for SparseConvMil {
    fn forward(&self, bags: &BagBatch, train: bool) -> candle_core::Result<Tensor> {
        let z = self.embed(bags, train)?;
        self.head.forward(&z, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::bag::{Bag, Split};
    use crate::models::init::seeded_var_builder;
    use candle_core::{Device, IndexOp};
    use candle_nn::VarMap;

    fn bag(emb: Vec<f32>, pos: Vec<[i64; 2]>) -> Bag {
        Bag {
            slide_id: "s".into(),
            label_index: 0,
            split: Split::Train,
            dim: 1,
            embeddings: emb.into(),
            positions: Some(pos),
            pixels: None,
        }
    }

    /// Oracle: one 3x3 submanifold conv on a 1-channel map computed by hand.
    #[test]
    fn one_block_matches_a_hand_computed_submanifold_convolution() {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, 11, &dev);
        let head = Head::new(1, 0, 1, 0.0, vb.pp("head")).unwrap();
        let model = SparseConvMil::new(1, &[1], 3, false, GlobalPool::Avg, head, &vb).unwrap();
        // Sites (5,5) (5,6) (7,7): the first two are neighbours, the third is alone.
        let b = bag(vec![1.0, 2.0, 4.0], vec![[5, 5], [5, 6], [7, 7]]);
        let batch = BagBatch::from_bags(&[&b], &dev).unwrap();
        let z = model
            .embed(&batch, false)
            .unwrap()
            .i((0, 0))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let data = vars.data().lock().unwrap();
        let w = data["sparse.0.conv.weight"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bias = data["sparse.0.conv.bias"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap()[0];
        // weight[k = di*3 + dj] multiplies the input at (i + di - 1, j + dj - 1).
        let y0 = w[4] * 1.0 + w[5] * 2.0 + bias; // (5,5) sees itself and (5,6) at dj = +1
        let y1 = w[4] * 2.0 + w[3] * 1.0 + bias; // (5,6) sees (5,5) at dj = -1
        let y2 = w[4] * 4.0 + bias;
        let expected = (y0.max(0.0) + y1.max(0.0) + y2.max(0.0)) / 3.0;
        assert!((z - expected).abs() < 1e-5, "{z} vs {expected}");
    }

    #[test]
    fn result_depends_on_arrangement_but_not_on_translation() {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, 1, &dev);
        let head = Head::new(8, 4, 2, 0.0, vb.pp("head")).unwrap();
        let model = SparseConvMil::new(1, &[8, 8], 3, false, GlobalPool::Avg, head, &vb).unwrap();
        let emb = vec![1.0, 1.0, 1.0];
        let run = |pos: Vec<[i64; 2]>| {
            let b = bag(emb.clone(), pos);
            let batch = BagBatch::from_bags(&[&b], &dev).unwrap();
            model
                .forward(&batch, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let clustered = run(vec![[0, 0], [0, 1], [1, 0]]);
        let shifted = run(vec![[10, 20], [10, 21], [11, 20]]);
        let scattered = run(vec![[0, 0], [0, 4], [4, 0]]);
        for (a, b) in clustered.iter().zip(&shifted) {
            assert!((a - b).abs() < 1e-5);
        }
        assert!(clustered
            .iter()
            .zip(&scattered)
            .any(|(a, b)| (a - b).abs() > 1e-4));
    }
}
