//! ResNet-18/34/50 with torchvision's layout and parameter names (`conv1`, `bn1`,
//! `layer{1..4}.{i}.conv{1,2,3}`, `...downsample.{0,1}`), so torchvision and most pathology
//! checkpoints load unchanged. The embedding is the globally averaged feature before `fc`.
//!
//! Built from a `VarBuilder`, so it trains through a `VarMap` (batch-norm uses batch statistics
//! with `train = true`). For inference, [`ResNet::fold_batch_norm`] folds every batch-norm into
//! the preceding convolution's weights and bias, which removes a full pass over each
//! activation map.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{batch_norm, BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, VarBuilder};

/// Which torchvision ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResNetDepth {
    R18,
    R34,
    R50,
}

impl ResNetDepth {
    /// Blocks per stage (`layer1..layer4`).
    fn blocks(self) -> [usize; 4] {
        match self {
            ResNetDepth::R18 => [2, 2, 2, 2],
            ResNetDepth::R34 | ResNetDepth::R50 => [3, 4, 6, 3],
        }
    }

    fn bottleneck(self) -> bool {
        self == ResNetDepth::R50
    }

    /// Width of the pooled feature (the embedding).
    pub fn dim(self) -> usize {
        if self.bottleneck() {
            2048
        } else {
            512
        }
    }
}

/// A convolution followed by batch-norm, or the two folded into one biased convolution.
#[derive(Debug, Clone)]
pub(crate) enum ConvBn {
    Train(Conv2d, BatchNorm),
    Folded(Conv2d),
}

impl ConvBn {
    /// `(conv, bn)` are the two layers' names under `vb`.
    fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: &VarBuilder,
        (conv, bn): (&str, &str),
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride,
            padding,
            ..Default::default()
        };
        let conv = candle_nn::conv2d_no_bias(c_in, c_out, k, cfg, vb.pp(conv))?;
        let bn = batch_norm(
            c_out,
            BatchNormConfig {
                eps: 1e-5,
                ..Default::default()
            },
            vb.pp(bn),
        )?;
        Ok(ConvBn::Train(conv, bn))
    }

    fn fold(&self) -> Result<Self> {
        match self {
            ConvBn::Train(conv, bn) => Ok(ConvBn::Folded(conv.absorb_bn(bn)?)),
            ConvBn::Folded(c) => Ok(ConvBn::Folded(c.clone())),
        }
    }

    /// A folded layer in `dtype`.
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        match self {
            ConvBn::Folded(c) => Ok(ConvBn::Folded(Conv2d::new(
                c.weight().to_dtype(dtype)?,
                c.bias().map(|b| b.to_dtype(dtype)).transpose()?,
                *c.config(),
            ))),
            ConvBn::Train(..) => Err(candle_core::Error::Msg(
                "only a network with batch-norm folded changes dtype".into(),
            )),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            ConvBn::Train(conv, bn) => xs.apply(conv)?.apply_t(bn, train),
            ConvBn::Folded(conv) => conv.forward(xs),
        }
    }
}

/// One residual block: basic (two 3x3) or bottleneck (1x1, 3x3, 1x1).
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) convs: Vec<ConvBn>,
    pub(crate) downsample: Option<ConvBn>,
}

impl Block {
    fn new(
        c_in: usize,
        width: usize,
        stride: usize,
        bottleneck: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (convs, c_out) = if bottleneck {
            let out = 4 * width;
            (
                vec![
                    ConvBn::new(c_in, width, 1, 1, 0, &vb, ("conv1", "bn1"))?,
                    // torchvision v1.5: the stride sits on the 3x3 convolution.
                    ConvBn::new(width, width, 3, stride, 1, &vb, ("conv2", "bn2"))?,
                    ConvBn::new(width, out, 1, 1, 0, &vb, ("conv3", "bn3"))?,
                ],
                out,
            )
        } else {
            (
                vec![
                    ConvBn::new(c_in, width, 3, stride, 1, &vb, ("conv1", "bn1"))?,
                    ConvBn::new(width, width, 3, 1, 1, &vb, ("conv2", "bn2"))?,
                ],
                width,
            )
        };
        let downsample = if stride != 1 || c_in != c_out {
            Some(ConvBn::new(
                c_in,
                c_out,
                1,
                stride,
                0,
                &vb.pp("downsample"),
                ("0", "1"),
            )?)
        } else {
            None
        };
        Ok(Block { convs, downsample })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut ys = xs.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            ys = conv.forward_t(&ys, train)?;
            if i != last {
                ys = ys.relu()?;
            }
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward_t(xs, train)?,
            None => xs.clone(),
        };
        (ys + shortcut)?.relu()
    }

    fn fold(&self) -> Result<Self> {
        Ok(Block {
            convs: self.convs.iter().map(ConvBn::fold).collect::<Result<_>>()?,
            downsample: self.downsample.as_ref().map(ConvBn::fold).transpose()?,
        })
    }

    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Block {
            convs: self
                .convs
                .iter()
                .map(|c| c.to_dtype(dtype))
                .collect::<Result<_>>()?,
            downsample: self
                .downsample
                .as_ref()
                .map(|c| c.to_dtype(dtype))
                .transpose()?,
        })
    }
}

/// A torchvision ResNet without its classification head.
#[derive(Debug, Clone)]
pub struct ResNet {
    depth: ResNetDepth,
    pub(crate) stem: ConvBn,
    pub(crate) layers: Vec<Vec<Block>>,
}

impl ResNet {
    /// Reads (or, with a `VarMap`, creates) the parameters under torchvision's names. `fc.*`
    /// is not read: checkpoints with or without a head both load.
    pub fn new(depth: ResNetDepth, vb: VarBuilder) -> Result<Self> {
        let stem = ConvBn::new(3, 64, 7, 2, 3, &vb, ("conv1", "bn1"))?;
        let bottleneck = depth.bottleneck();
        let expansion = if bottleneck { 4 } else { 1 };
        let mut c_in = 64;
        let mut layers = Vec::with_capacity(4);
        for (stage, count) in depth.blocks().into_iter().enumerate() {
            let width = 64 << stage;
            let vb_layer = vb.pp(format!("layer{}", stage + 1));
            let mut blocks = Vec::with_capacity(count);
            for i in 0..count {
                let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                blocks.push(Block::new(c_in, width, stride, bottleneck, vb_layer.pp(i))?);
                c_in = width * expansion;
            }
            layers.push(blocks);
        }
        Ok(ResNet {
            depth,
            stem,
            layers,
        })
    }

    pub fn depth(&self) -> ResNetDepth {
        self.depth
    }

    /// Width of the embedding.
    pub fn dim(&self) -> usize {
        self.depth.dim()
    }

    /// The same network with batch-norm folded into the convolutions (inference only: the
    /// result uses the running statistics whatever `train` says).
    pub fn fold_batch_norm(&self) -> Result<Self> {
        Ok(ResNet {
            depth: self.depth,
            stem: self.stem.fold()?,
            layers: self
                .layers
                .iter()
                .map(|l| l.iter().map(Block::fold).collect::<Result<Vec<_>>>())
                .collect::<Result<_>>()?,
        })
    }

    /// The folded network (see [`ResNet::fold_batch_norm`]) computing in `dtype`, e.g. f16 on
    /// a GPU.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(ResNet {
            depth: self.depth,
            stem: self.stem.to_dtype(dtype)?,
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.iter()
                        .map(|b| b.to_dtype(dtype))
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<_>>()?,
        })
    }

    /// `[B, 3, H, W]` normalised images to `[B, dim]` pooled features.
    pub fn features_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let xs = self.stem.forward_t(xs, train)?.relu()?;
        // MaxPool2d(3, stride 2, padding 1). After ReLU every value is >= 0, so zero padding
        // never wins the max over a window that also holds a real value: same as -inf padding.
        let mut xs = if train {
            max_pool_3x3_s2_differentiable(&xs)?
        } else {
            xs.pad_with_zeros(D::Minus1, 1, 1)?
                .pad_with_zeros(D::Minus2, 1, 1)?
                .max_pool2d_with_stride(3, 2)?
        };
        for layer in &self.layers {
            for block in layer {
                xs = block.forward_t(&xs, train)?;
            }
        }
        xs.mean(D::Minus1)?.mean(D::Minus1)
    }
}

/// Inference forward (running statistics). Training calls [`ResNet::features_t`] with
/// `train = true`.
impl Module for ResNet {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.features_t(xs, false)
    }
}

/// MaxPool2d(3, stride 2, padding 1) on non-negative input from ops candle can differentiate
/// (its own max-pool backward needs kernel == stride): the max of the nine shifted, strided
/// views, each taken by a narrow and a reshape that keeps every other row and column.
fn max_pool_3x3_s2_differentiable(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // One zero row/column before, two after, so every offset has 2 * out rows to take.
    let padded = xs
        .pad_with_zeros(D::Minus1, 1, 2)?
        .pad_with_zeros(D::Minus2, 1, 2)?;
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        let rows = padded
            .narrow(2, dy, 2 * ho)?
            .reshape((b, c, ho, 2, w + 3))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for dx in 0..3 {
            let view = rows
                .narrow(3, dx, 2 * wo)?
                .reshape((b, c, ho, wo, 2))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            out = Some(match out {
                None => view,
                Some(m) => m.maximum(&view)?,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("empty pooling window".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn differentiable_max_pool_matches_candles_max_pool() {
        for (h, w) in [(8, 8), (7, 9), (5, 6)] {
            let x = Tensor::rand(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
            let ours = max_pool_3x3_s2_differentiable(&x).unwrap();
            let theirs = x
                .pad_with_zeros(D::Minus1, 1, 1)
                .unwrap()
                .pad_with_zeros(D::Minus2, 1, 1)
                .unwrap()
                .max_pool2d_with_stride(3, 2)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{h}x{w}");
        }
    }
}
