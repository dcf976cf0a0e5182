//! A DINOv2/timm-style Vision Transformer, the architecture of today's pathology foundation
//! models. Parameter names follow DINOv2 and timm (`patch_embed.proj`, `cls_token`,
//! `pos_embed`, `register_tokens`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
//! mlp.fc1,mlp.fc2,ls2.gamma}`, `norm`), so their checkpoints load unchanged.
//!
//! The position embedding is resized once, at load, to the configured input size with
//! PyTorch's bicubic kernel and DINOv2's 0.1 offset, as DINOv2 does at every forward pass.

use candle_core::{IndexOp, Module, Result, Tensor, D};
use candle_nn::{
    layer_norm, Conv2d, Conv2dConfig, Init, LayerNorm, LayerNormConfig, Linear, VarBuilder,
};

/// Shape of a ViT. Heads are `dim / 64` in every standard size.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub patch_size: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    /// Side, in patches, of the position-embedding grid stored in the weights (DINOv2: 518 px
    /// / 14 = 37). Read from the weights when they hold `pos_embed`.
    pub pos_grid: usize,
    /// Extra "register" tokens (DINOv2-reg, H-optimus); read from the weights when present.
    pub registers: usize,
}

impl VitConfig {
    /// ViT-S/14 as in DINOv2 (384 wide, 12 blocks).
    pub fn small14() -> Self {
        VitConfig {
            patch_size: 14,
            dim: 384,
            depth: 12,
            heads: 6,
            pos_grid: 37,
            registers: 0,
        }
    }
    /// ViT-B/14 as in DINOv2 (768 wide, 12 blocks).
    pub fn base14() -> Self {
        VitConfig {
            patch_size: 14,
            dim: 768,
            depth: 12,
            heads: 12,
            pos_grid: 37,
            registers: 0,
        }
    }
    /// ViT-L/14 as in DINOv2 (1024 wide, 24 blocks).
    pub fn large14() -> Self {
        VitConfig {
            patch_size: 14,
            dim: 1024,
            depth: 24,
            heads: 16,
            pos_grid: 37,
            registers: 0,
        }
    }
    /// ViT-B/16 as in timm at 224 px (Phikon and friends).
    pub fn base16() -> Self {
        VitConfig {
            patch_size: 16,
            dim: 768,
            depth: 12,
            heads: 12,
            pos_grid: 14,
            registers: 0,
        }
    }
    /// ViT-L/16 as in timm at 224 px (UNI and friends).
    pub fn large16() -> Self {
        VitConfig {
            patch_size: 16,
            dim: 1024,
            depth: 24,
            heads: 16,
            pos_grid: 14,
            registers: 0,
        }
    }
}

/// How the token sequence becomes one embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VitPooling {
    /// The normalised class token (`dim` wide).
    Cls,
    /// The class token concatenated with the mean patch token (`2 * dim` wide), as DINOv2's
    /// linear evaluation does.
    ClsMean,
}

fn linear(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Linear> {
    candle_nn::linear(d_in, d_out, vb)
}

fn norm(dim: usize, vb: VarBuilder) -> Result<LayerNorm> {
    layer_norm(
        dim,
        LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        },
        vb,
    )
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Option<Tensor>,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Option<Tensor>,
    heads: usize,
}

impl Block {
    fn new(cfg: &VitConfig, layer_scale: bool, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        let gamma = |name: &str| -> Result<Option<Tensor>> {
            if layer_scale {
                vb.pp(name)
                    .get_with_hints(d, "gamma", Init::Const(1.0))
                    .map(Some)
            } else {
                Ok(None)
            }
        };
        Ok(Block {
            norm1: norm(d, vb.pp("norm1"))?,
            qkv: linear(vb.pp("attn").pp("qkv"), d, 3 * d)?,
            proj: linear(vb.pp("attn").pp("proj"), d, d)?,
            ls1: gamma("ls1")?,
            norm2: norm(d, vb.pp("norm2"))?,
            fc1: linear(vb.pp("mlp").pp("fc1"), d, 4 * d)?,
            fc2: linear(vb.pp("mlp").pp("fc2"), 4 * d, d)?,
            ls2: gamma("ls2")?,
            heads: cfg.heads,
        })
    }

    fn attention(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let hd = c / self.heads;
        // [B, N, 3, H, hd] -> [3, B, H, N, hd]
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.i(0)? * (1.0 / (hd as f64).sqrt()))?.contiguous()?;
        let k = qkv.i(1)?.contiguous()?;
        let v = qkv.i(2)?.contiguous()?;
        let attn = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.proj.forward(&out)
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let scale = |ys: Tensor, g: &Option<Tensor>| match g {
            Some(g) => ys.broadcast_mul(g),
            None => Ok(ys),
        };
        let xs = (xs + scale(self.attention(&self.norm1.forward(xs)?)?, &self.ls1)?)?;
        let mlp = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&xs)?)?.gelu_erf()?)?;
        xs + scale(mlp, &self.ls2)?
    }
}

/// A ViT encoder producing one embedding per image.
#[derive(Debug, Clone)]
pub struct Vit {
    cfg: VitConfig,
    patch_embed: Conv2d,
    cls_token: Tensor,
    /// Position embedding resized to the input grid: `[1, 1 + grid^2, dim]`.
    pos_embed: Tensor,
    register_tokens: Option<Tensor>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    pooling: VitPooling,
    input_size: usize,
}

impl Vit {
    /// Reads the parameters for images of side `input_size` (a multiple of the patch size).
    /// Position-grid size, registers and layer-scale are taken from the weights when present.
    pub fn new(
        mut cfg: VitConfig,
        input_size: usize,
        pooling: VitPooling,
        vb: VarBuilder,
    ) -> Result<Self> {
        if !input_size.is_multiple_of(cfg.patch_size) {
            candle_core::bail!(
                "input size {input_size} is not a multiple of the patch size {}",
                cfg.patch_size
            );
        }
        let d = cfg.dim;
        if let Ok(pos) = vb.get_unchecked("pos_embed") {
            let n = pos.dim(1)?.saturating_sub(1);
            let side = (n as f64).sqrt().round() as usize;
            if side * side != n {
                candle_core::bail!("pos_embed holds {n} patch positions, not a square grid");
            }
            cfg.pos_grid = side;
        }
        if let Ok(reg) = vb.get_unchecked("register_tokens") {
            cfg.registers = reg.dim(1)?;
        }
        // Random weights get layer-scale (at 1); files have it exactly when they store it.
        let layer_scale = !has_real_tensors(&vb) || vb.contains_tensor("blocks.0.ls1.gamma");
        let pc = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let patch_embed =
            candle_nn::conv2d(3, d, cfg.patch_size, pc, vb.pp("patch_embed").pp("proj"))?;
        let trunc = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let cls_token = vb.get_with_hints((1, 1, d), "cls_token", trunc)?;
        let stored =
            vb.get_with_hints((1, 1 + cfg.pos_grid * cfg.pos_grid, d), "pos_embed", trunc)?;
        let grid = input_size / cfg.patch_size;
        let pos_embed = resize_pos_embed(&stored, cfg.pos_grid, grid, 0.1)?;
        let register_tokens = if cfg.registers > 0 {
            Some(vb.get_with_hints((1, cfg.registers, d), "register_tokens", trunc)?)
        } else {
            None
        };
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&cfg, layer_scale, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = norm(d, vb.pp("norm"))?;
        Ok(Vit {
            cfg,
            patch_embed,
            cls_token,
            pos_embed,
            register_tokens,
            blocks,
            norm,
            pooling,
            input_size,
        })
    }

    /// Width of the embedding.
    pub fn dim(&self) -> usize {
        match self.pooling {
            VitPooling::Cls => self.cfg.dim,
            VitPooling::ClsMean => 2 * self.cfg.dim,
        }
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// `[B, 3, S, S]` normalised images to `[B, dim]` embeddings.
    pub fn features(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        if h != self.input_size || w != self.input_size {
            candle_core::bail!("ViT built for {0}x{0} input, got {h}x{w}", self.input_size);
        }
        let patches = self
            .patch_embed
            .forward(xs)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.dim))?;
        let mut tokens = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.pos_embed)?;
        if let Some(reg) = &self.register_tokens {
            let reg = reg.broadcast_as((b, self.cfg.registers, self.cfg.dim))?;
            tokens = Tensor::cat(&[&tokens.i((.., ..1))?, &reg, &tokens.i((.., 1..))?], 1)?;
        }
        for block in &self.blocks {
            tokens = block.forward(&tokens)?;
        }
        let tokens = self.norm.forward(&tokens)?;
        let cls = tokens.i((.., 0))?;
        match self.pooling {
            VitPooling::Cls => cls.contiguous(),
            VitPooling::ClsMean => {
                let mean = tokens.i((.., 1 + self.cfg.registers..))?.mean(1)?;
                Tensor::cat(&[&cls, &mean], D::Minus1)
            }
        }
    }
}

impl Module for Vit {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.features(xs)
    }
}

/// Whether the builder reads a real file: random builders claim every name but cannot give
/// a tensor without its shape.
fn has_real_tensors(vb: &VarBuilder) -> bool {
    vb.get_unchecked("cls_token").is_ok()
}

/// Resizes `[1, 1 + from^2, D]` position embeddings to a `to x to` grid with PyTorch's bicubic
/// kernel (A = -0.75, `align_corners = False`, no antialias), using DINOv2's scale factor
/// `(to + offset) / from`. The class token's embedding is kept as is.
pub fn resize_pos_embed(pos: &Tensor, from: usize, to: usize, offset: f64) -> Result<Tensor> {
    if from == to {
        return Ok(pos.clone());
    }
    let d = pos.dim(2)?;
    let cls = pos.i((.., ..1))?;
    let grid = pos
        .i((0, 1..))?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    let scale = from as f64 / (to as f64 + offset);
    let taps = cubic_taps(from, to, scale);
    // Rows first (height), then columns (width); separable.
    let mut tmp = vec![0f32; to * from * d];
    for (oy, (iy, wy)) in taps.iter().enumerate() {
        for x in 0..from {
            let out = &mut tmp[(oy * from + x) * d..(oy * from + x + 1) * d];
            for (k, &w) in wy.iter().enumerate() {
                let src = &grid[iy[k] * from + x];
                for (o, s) in out.iter_mut().zip(src) {
                    *o += w * s;
                }
            }
        }
    }
    let mut resized = vec![0f32; to * to * d];
    for oy in 0..to {
        for (ox, (ix, wx)) in taps.iter().enumerate() {
            let out = &mut resized[(oy * to + ox) * d..(oy * to + ox + 1) * d];
            for (k, &w) in wx.iter().enumerate() {
                let src = &tmp[(oy * from + ix[k]) * d..(oy * from + ix[k] + 1) * d];
                for (o, s) in out.iter_mut().zip(src) {
                    *o += w * s;
                }
            }
        }
    }
    let resized =
        Tensor::from_vec(resized, (1, to * to, d), pos.device())?.to_dtype(pos.dtype())?;
    Tensor::cat(&[&cls, &resized], 1)
}

/// For each output index: the 4 clamped source indices and their bicubic weights.
fn cubic_taps(from: usize, to: usize, scale: f64) -> Vec<([usize; 4], [f32; 4])> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    (0..to)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let x0 = src.floor();
            let t = src - x0;
            let w = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
            let idx = |k: i64| (x0 as i64 - 1 + k).clamp(0, from as i64 - 1) as usize;
            ([idx(0), idx(1), idx(2), idx(3)], w.map(|v| v as f32))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bicubic_weights_sum_to_one_and_hit_samples_exactly() {
        for (o, (_, w)) in cubic_taps(5, 9, 5.0 / 9.0).iter().enumerate() {
            let s: f32 = w.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "output {o}: {s}");
        }
        // Scale 1: every output sits on a sample, all weight on it.
        for (o, (i, w)) in cubic_taps(4, 4, 1.0).iter().enumerate() {
            assert_eq!(i[1], o);
            assert!((w[1] - 1.0).abs() < 1e-6 && w[0].abs() < 1e-6);
        }
    }

    #[test]
    fn resizing_keeps_constants_and_the_class_token() {
        let dev = Device::Cpu;
        let mut v = vec![7f32, 8.0];
        v.extend(std::iter::repeat_n([3f32, -1.0], 9).flatten());
        let pos = Tensor::from_vec(v, (1, 10, 2), &dev).unwrap();
        let out = resize_pos_embed(&pos, 3, 5, 0.1).unwrap();
        assert_eq!(out.dims(), &[1, 26, 2]);
        let out = out.get(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out[0], vec![7.0, 8.0]);
        for row in &out[1..] {
            assert!(
                (row[0] - 3.0).abs() < 1e-5 && (row[1] + 1.0).abs() < 1e-5,
                "{row:?}"
            );
        }
    }

    #[test]
    fn resizing_a_linear_ramp_matches_torch_bicubic() {
        // PyTorch's upsample_bicubic2d for [0, 1, 2, 3] -> 2 samples (scale 2, align_corners
        // False): source 0.5 with weights [-0.09375, 0.59375, 0.59375, -0.09375] on indices
        // [0 (clamped), 0, 1, 2] gives 0.40625; by symmetry the other is 3 - 0.40625.
        let taps = cubic_taps(4, 2, 2.0);
        let ramp = [0f32, 1.0, 2.0, 3.0];
        let got: Vec<f32> = taps
            .iter()
            .map(|(i, w)| (0..4).map(|k| w[k] * ramp[i[k]]).sum())
            .collect();
        assert!(
            (got[0] - 0.40625).abs() < 1e-5 && (got[1] - 2.59375).abs() < 1e-5,
            "{got:?}"
        );
    }
}
