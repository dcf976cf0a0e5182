//! One configurable Vision Transformer, timm's `VisionTransformer` in candle: the architecture
//! of DINOv2 and of today's pathology foundation models (UNI, UNI2-h, Virchow 1/2, H-optimus,
//! Prov-GigaPath, Phikon, Hibou, Midnight, ...), which differ only in options — patch size,
//! width, depth, register tokens, whether the class token has a position embedding, GELU or
//! SwiGLU (split or packed) MLPs, LayerScale, qkv bias, final-norm epsilon.
//!
//! Parameter names follow timm (`patch_embed.proj`, `cls_token`, `reg_token`, `pos_embed`,
//! `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,mlp.fc1_g,mlp.fc1_x,
//! ls2.gamma}`, `norm`), which DINOv2's own checkpoints share but for `register_tokens`;
//! Hugging Face `transformers` checkpoints are renamed on the fly by
//! [`crate::hf_names`]. The position embedding is resized once, at load, to the input grid, with
//! the kernel of the implementation the checkpoint comes from ([`PosInterp`]).

use candle_core::{IndexOp, Module, Result, Tensor, D};
use candle_nn::{
    layer_norm, Conv2d, Conv2dConfig, Init, LayerNorm, LayerNormConfig, Linear, VarBuilder,
};

/// The MLP of each block, with timm's parameter layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// timm `Mlp`: `fc1` (dim to hidden), exact GELU, `fc2` (hidden to dim).
    Gelu,
    /// timm `SwiGLUPacked` (= `GluMlp(act_layer=SiLU, gate_last=False)`, DINOv2's and HF
    /// Dinov2's SwiGLU): `fc1` maps dim to `hidden`, its first half goes through SiLU and
    /// multiplies the second; `fc2` maps `hidden / 2` to dim.
    SwiGluPacked,
    /// timm `SwiGLU`: separate `fc1_g` (gate, through SiLU) and `fc1_x` (dim to hidden each),
    /// `fc2` (hidden to dim).
    SwiGlu,
}

/// Which tokens carry a learned position embedding: the three conventions in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PosLayout {
    /// timm `no_embed_class=False` (UNI, Virchow 1/2, Prov-GigaPath): class and register
    /// tokens are prepended first, then `pos_embed` (`1 + registers + patches` long) is added.
    AllTokens,
    /// timm `no_embed_class=True` (UNI2-h, H-optimus, H0-mini, timm's DINOv2-reg): only the
    /// patches get `pos_embed` (`patches` long); class and register tokens are prepended after.
    PatchesOnly,
    /// DINOv2 and Hugging Face `Dinov2`/`ViT` (Phikon, Hibou, Midnight): `pos_embed` covers the
    /// class token and the patches; register tokens (`register_tokens`) are inserted after the
    /// class token without one.
    ClassAndPatches,
}

/// How a stored position-embedding grid is resized to the input's grid. Implementations
/// differ, and an embedding is only exact against its reference with the reference's kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PosInterp {
    /// timm's `resample_abs_pos_embed`: PyTorch bicubic with `antialias=True` (PIL's cubic,
    /// a = -0.5, normalised taps, support widened when shrinking), `size=` target grid.
    TimmAntialias,
    /// PyTorch bicubic without antialiasing (a = -0.75, clamped borders) with source/target scale
    /// `from / (to + offset)`: DINOv2 uses offset 0.1 (`scale_factor` form), Hugging Face
    /// Dinov2/ViT offset 0 (`size=` form).
    Bicubic { offset: f64 },
}

/// The shape and options of a ViT, timm's `VisionTransformer` keyword arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    /// Side of the square patches (14 for DINOv2-style models, 16 for ViT-B/16, L/16, g/16).
    pub patch_size: usize,
    /// Token width (384 S, 768 B, 1024 L, 1280 H, 1536 g).
    pub dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads (`dim` must be a multiple).
    pub heads: usize,
    /// Width of the MLP's first layer: timm's `int(dim * mlp_ratio)` (for `SwiGluPacked` this
    /// is both halves together).
    pub mlp_hidden: usize,
    pub mlp: MlpKind,
    /// Bias on the attention's qkv projection.
    pub qkv_bias: bool,
    /// LayerScale (`ls1.gamma`, `ls2.gamma`) with this initial value for random weights;
    /// `None` for none.
    pub layer_scale: Option<f64>,
    /// Register tokens (`reg_token` in timm, `register_tokens` in DINOv2 / Hugging Face).
    pub registers: usize,
    pub pos_layout: PosLayout,
    pub pos_interp: PosInterp,
    /// Side, in patches, of the position-embedding grid stored in the weights (timm's
    /// `img_size / patch_size`). Read from the weights when they hold `pos_embed`.
    pub pos_grid: usize,
    /// Epsilon of every LayerNorm (timm 1e-6; Hugging Face ViT 1e-12).
    pub norm_eps: f64,
}

impl VitConfig {
    /// A DINOv2-layout ViT of `patch_size`, `dim`, `depth` (heads `dim / 64`, GELU MLP of
    /// ratio 4, qkv bias, LayerScale, 518 px position grid): the historical `vit_*14` archs.
    pub fn dinov2(patch_size: usize, dim: usize, depth: usize) -> Self {
        VitConfig {
            patch_size,
            dim,
            depth,
            heads: dim / 64,
            mlp_hidden: 4 * dim,
            mlp: MlpKind::Gelu,
            qkv_bias: true,
            layer_scale: Some(1.0),
            registers: 0,
            pos_layout: PosLayout::ClassAndPatches,
            pos_interp: PosInterp::Bicubic { offset: 0.1 },
            pos_grid: 518 / patch_size,
            norm_eps: 1e-6,
        }
    }
    /// ViT-S/14 as in DINOv2 (384 wide, 12 blocks).
    pub fn small14() -> Self {
        Self::dinov2(14, 384, 12)
    }
    /// ViT-B/14 as in DINOv2 (768 wide, 12 blocks).
    pub fn base14() -> Self {
        Self::dinov2(14, 768, 12)
    }
    /// ViT-L/14 as in DINOv2 (1024 wide, 24 blocks).
    pub fn large14() -> Self {
        Self::dinov2(14, 1024, 24)
    }
    /// ViT-B/16 at 224 px (the historical `vit_b16` arch).
    pub fn base16() -> Self {
        VitConfig {
            pos_grid: 14,
            ..Self::dinov2(16, 768, 12)
        }
    }
    /// ViT-L/16 at 224 px (the historical `vit_l16` arch).
    pub fn large16() -> Self {
        VitConfig {
            pos_grid: 14,
            ..Self::dinov2(16, 1024, 24)
        }
    }

    /// Tokens before the patches: the class token and the registers.
    pub fn prefix_tokens(&self) -> usize {
        1 + self.registers
    }

    /// Where register tokens are stored: timm's name or DINOv2's.
    fn register_name(&self) -> &'static str {
        match self.pos_layout {
            PosLayout::ClassAndPatches => "register_tokens",
            _ => "reg_token",
        }
    }

    /// Position embeddings before the grid's (those of the class and register tokens).
    fn pos_prefix(&self) -> usize {
        match self.pos_layout {
            PosLayout::AllTokens => self.prefix_tokens(),
            PosLayout::PatchesOnly => 0,
            PosLayout::ClassAndPatches => 1,
        }
    }

    /// Takes registers and LayerScale from a weights file where it says (the historical
    /// `vit_*` archs accept DINOv2 checkpoints with and without either).
    pub fn detect_from(&mut self, vb: &VarBuilder) {
        if vb.get_unchecked("cls_token").is_err() {
            return; // random weights: keep the configuration
        }
        if let Ok(n) = vb.get_unchecked("register_tokens").and_then(|r| r.dim(1)) {
            self.registers = n;
        }
        if !vb.contains_tensor("blocks.0.ls1.gamma") {
            self.layer_scale = None;
        }
    }
}

/// How the token sequence becomes one embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VitPooling {
    /// The normalised class token (`dim` wide).
    Cls,
    /// The mean of the normalised patch tokens, registers excluded (`dim` wide).
    Mean,
    /// The class token concatenated with the mean patch token (`2 * dim` wide), as Virchow,
    /// H0-mini, Midnight and DINOv2's linear evaluation do.
    ClsMean,
}

impl VitPooling {
    /// Width of the embedding of a ViT `dim` wide.
    pub fn width(self, dim: usize) -> usize {
        match self {
            VitPooling::Cls | VitPooling::Mean => dim,
            VitPooling::ClsMean => 2 * dim,
        }
    }
}

fn linear(vb: VarBuilder, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
    if bias {
        candle_nn::linear(d_in, d_out, vb)
    } else {
        candle_nn::linear_no_bias(d_in, d_out, vb)
    }
}

fn norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    layer_norm(
        dim,
        LayerNormConfig {
            eps,
            ..Default::default()
        },
        vb,
    )
}

#[derive(Debug, Clone)]
pub(crate) enum Mlp {
    Gelu {
        fc1: Linear,
        fc2: Linear,
    },
    Packed {
        fc1: Linear,
        fc2: Linear,
    },
    Split {
        fc1_g: Linear,
        fc1_x: Linear,
        fc2: Linear,
    },
}

impl Mlp {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let (d, h) = (cfg.dim, cfg.mlp_hidden);
        Ok(match cfg.mlp {
            MlpKind::Gelu => Mlp::Gelu {
                fc1: linear(vb.pp("fc1"), d, h, true)?,
                fc2: linear(vb.pp("fc2"), h, d, true)?,
            },
            MlpKind::SwiGluPacked => {
                if h % 2 != 0 {
                    candle_core::bail!("a packed SwiGLU needs an even hidden width, not {h}");
                }
                Mlp::Packed {
                    fc1: linear(vb.pp("fc1"), d, h, true)?,
                    fc2: linear(vb.pp("fc2"), h / 2, d, true)?,
                }
            }
            MlpKind::SwiGlu => Mlp::Split {
                fc1_g: linear(vb.pp("fc1_g"), d, h, true)?,
                fc1_x: linear(vb.pp("fc1_x"), d, h, true)?,
                fc2: linear(vb.pp("fc2"), h, d, true)?,
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Gelu { fc1, fc2 } => fc2.forward(&fc1.forward(xs)?.gelu_erf()?),
            Mlp::Packed { fc1, fc2 } => {
                let h = fc1.forward(xs)?;
                let half = h.dim(D::Minus1)? / 2;
                let gate = candle_nn::ops::silu(&h.narrow(D::Minus1, 0, half)?)?;
                fc2.forward(&(gate * h.narrow(D::Minus1, half, half)?)?)
            }
            Mlp::Split { fc1_g, fc1_x, fc2 } => {
                let gate = candle_nn::ops::silu(&fc1_g.forward(xs)?)?;
                fc2.forward(&(gate * fc1_x.forward(xs)?)?)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) norm1: LayerNorm,
    pub(crate) qkv: Linear,
    pub(crate) proj: Linear,
    pub(crate) ls1: Option<Tensor>,
    pub(crate) norm2: LayerNorm,
    pub(crate) mlp: Mlp,
    pub(crate) ls2: Option<Tensor>,
    pub(crate) heads: usize,
}

impl Block {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        let gamma = |name: &str| -> Result<Option<Tensor>> {
            cfg.layer_scale
                .map(|init| vb.pp(name).get_with_hints(d, "gamma", Init::Const(init)))
                .transpose()
        };
        Ok(Block {
            norm1: norm(d, cfg.norm_eps, vb.pp("norm1"))?,
            qkv: linear(vb.pp("attn").pp("qkv"), d, 3 * d, cfg.qkv_bias)?,
            proj: linear(vb.pp("attn").pp("proj"), d, d, true)?,
            ls1: gamma("ls1")?,
            norm2: norm(d, cfg.norm_eps, vb.pp("norm2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
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
        let mlp = self.mlp.forward(&self.norm2.forward(&xs)?)?;
        xs + scale(mlp, &self.ls2)?
    }
}

/// A ViT encoder producing one embedding per image.
#[derive(Debug, Clone)]
pub struct Vit {
    cfg: VitConfig,
    patch_embed: Conv2d,
    cls_token: Tensor,
    /// Position embedding resized to the input grid (prefix positions, if any, then the grid).
    pos_embed: Tensor,
    register_tokens: Option<Tensor>,
    pub(crate) blocks: Vec<Block>,
    norm: LayerNorm,
    pooling: VitPooling,
    input_size: usize,
}

impl Vit {
    /// Reads the parameters for images of side `input_size` (a multiple of the patch size).
    /// The stored position grid is read from the weights; everything else must match `cfg`
    /// (a missing or misshapen parameter is an error naming it).
    pub fn new(
        mut cfg: VitConfig,
        input_size: usize,
        pooling: VitPooling,
        vb: VarBuilder,
    ) -> Result<Self> {
        if input_size == 0 || !input_size.is_multiple_of(cfg.patch_size) {
            candle_core::bail!(
                "input size {input_size} is not a multiple of the patch size {}",
                cfg.patch_size
            );
        }
        if cfg.heads == 0 || !cfg.dim.is_multiple_of(cfg.heads) {
            candle_core::bail!("width {} is not a multiple of {} heads", cfg.dim, cfg.heads);
        }
        let d = cfg.dim;
        let prefix = cfg.pos_prefix();
        if let Ok(pos) = vb.get_unchecked("pos_embed") {
            let n = pos.dim(1)?.saturating_sub(prefix);
            let side = (n as f64).sqrt().round() as usize;
            if side == 0 || side * side != n {
                candle_core::bail!(
                    "pos_embed holds {} positions: not {prefix} prefix positions and a square grid",
                    pos.dim(1)?
                );
            }
            cfg.pos_grid = side;
        }
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
        let stored = vb.get_with_hints(
            (1, prefix + cfg.pos_grid * cfg.pos_grid, d),
            "pos_embed",
            trunc,
        )?;
        let grid = input_size / cfg.patch_size;
        let pos_embed = resize_pos_embed(&stored, prefix, cfg.pos_grid, grid, cfg.pos_interp)?;
        let register_tokens = if cfg.registers > 0 {
            Some(vb.get_with_hints((1, cfg.registers, d), cfg.register_name(), trunc)?)
        } else {
            None
        };
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&cfg, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = norm(d, cfg.norm_eps, vb.pp("norm"))?;
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
        self.pooling.width(self.cfg.dim)
    }

    /// The configuration, with the position grid read from the weights.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// `[B, 3, S, S]` normalised images to the final-normed tokens `[B, 1 + registers +
    /// patches, dim]` (class token, registers, patches: timm's `forward_features`).
    pub fn tokens(&self, xs: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.run_blocks(self.input_tokens(xs)?)?)
    }

    fn run_blocks(&self, mut tokens: Tensor) -> Result<Tensor> {
        for block in &self.blocks {
            tokens = block.forward(&tokens)?;
        }
        Ok(tokens)
    }

    /// The tokens entering the first block: patch embeddings, class and register tokens,
    /// position embeddings.
    pub(crate) fn input_tokens(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        if h != self.input_size || w != self.input_size {
            candle_core::bail!("ViT built for {0}x{0} input, got {h}x{w}", self.input_size);
        }
        let d = self.cfg.dim;
        let patches = self
            .patch_embed
            .forward(xs)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let reg = match &self.register_tokens {
            Some(r) => Some(r.broadcast_as((b, self.cfg.registers, d))?),
            None => None,
        };
        let tokens = match self.cfg.pos_layout {
            PosLayout::AllTokens => {
                let mut parts = vec![&cls];
                parts.extend(reg.as_ref());
                parts.push(&patches);
                Tensor::cat(&parts, 1)?.broadcast_add(&self.pos_embed)?
            }
            PosLayout::PatchesOnly => {
                let patches = patches.broadcast_add(&self.pos_embed)?;
                let mut parts = vec![&cls];
                parts.extend(reg.as_ref());
                parts.push(&patches);
                Tensor::cat(&parts, 1)?
            }
            PosLayout::ClassAndPatches => {
                let t = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.pos_embed)?;
                match &reg {
                    Some(reg) => Tensor::cat(&[&t.i((.., ..1))?, reg, &t.i((.., 1..))?], 1)?,
                    None => t,
                }
            }
        };
        Ok(tokens)
    }

    /// `[B, 3, S, S]` normalised images to `[B, dim]` embeddings.
    pub fn features(&self, xs: &Tensor) -> Result<Tensor> {
        self.pool(&self.run_blocks(self.input_tokens(xs)?)?)
    }

    /// The last block's tokens to the embedding: final norm, then the pooling.
    pub(crate) fn pool(&self, tokens: &Tensor) -> Result<Tensor> {
        let tokens = self.norm.forward(tokens)?;
        let cls = || tokens.i((.., 0));
        let mean = || tokens.i((.., self.cfg.prefix_tokens()..))?.mean(1);
        match self.pooling {
            VitPooling::Cls => cls()?.contiguous(),
            VitPooling::Mean => mean(),
            VitPooling::ClsMean => Tensor::cat(&[&cls()?, &mean()?], D::Minus1),
        }
    }
}

impl Module for Vit {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.features(xs)
    }
}

/// Resizes `[1, prefix + from^2, D]` position embeddings to a `to x to` grid with `interp`;
/// the first `prefix` embeddings (class, registers) are kept as they are.
pub fn resize_pos_embed(
    pos: &Tensor,
    prefix: usize,
    from: usize,
    to: usize,
    interp: PosInterp,
) -> Result<Tensor> {
    if from == to {
        return Ok(pos.clone());
    }
    let d = pos.dim(2)?;
    let grid = pos
        .i((0, prefix..))?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    let taps = match interp {
        PosInterp::TimmAntialias => antialias_taps(from, to),
        PosInterp::Bicubic { offset } => cubic_taps(from, to, from as f64 / (to as f64 + offset)),
    };
    // Columns (width) first, then rows (height), as PyTorch's separable kernels; taps in f64.
    let mut tmp = vec![0f64; from * to * d];
    for y in 0..from {
        for (ox, (ix, wx)) in taps.iter().enumerate() {
            let out = &mut tmp[(y * to + ox) * d..(y * to + ox + 1) * d];
            for (&i, &w) in ix.iter().zip(wx) {
                for (o, s) in out.iter_mut().zip(&grid[y * from + i]) {
                    *o += w * *s as f64;
                }
            }
        }
    }
    let mut resized = vec![0f32; to * to * d];
    for (oy, (iy, wy)) in taps.iter().enumerate() {
        for ox in 0..to {
            let out = &mut resized[(oy * to + ox) * d..(oy * to + ox + 1) * d];
            let mut acc = vec![0f64; d];
            for (&i, &w) in iy.iter().zip(wy) {
                let src = &tmp[(i * to + ox) * d..(i * to + ox + 1) * d];
                for (a, s) in acc.iter_mut().zip(src) {
                    *a += w * s;
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = a as f32;
            }
        }
    }
    let resized =
        Tensor::from_vec(resized, (1, to * to, d), pos.device())?.to_dtype(pos.dtype())?;
    if prefix == 0 {
        return Ok(resized);
    }
    Tensor::cat(&[&pos.i((.., ..prefix))?, &resized], 1)
}

/// Source indices and weights of one output sample.
type Taps = (Vec<usize>, Vec<f64>);

/// PyTorch's `upsample_bicubic2d` (`align_corners=False`, no antialias) along one axis at
/// `scale` (source pixels per output pixel): 4 taps, A = -0.75, indices clamped to the border.
fn cubic_taps(from: usize, to: usize, scale: f64) -> Vec<Taps> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    (0..to)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let x0 = src.floor();
            let t = src - x0;
            let w = vec![far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
            let idx = (0..4)
                .map(|k| (x0 as i64 - 1 + k).clamp(0, from as i64 - 1) as usize)
                .collect();
            (idx, w)
        })
        .collect()
}

/// PyTorch's `_upsample_bicubic2d_aa` (`antialias=True`) along one axis from `from` to `to`
/// samples: PIL's cubic (a = -0.5) over a support of 2 source pixels (times the scale when
/// shrinking), window cut at the borders and its weights renormalised.
fn antialias_taps(from: usize, to: usize) -> Vec<Taps> {
    const A: f64 = -0.5;
    let filter = |x: f64| {
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    };
    let scale = from as f64 / to as f64;
    let (support, invscale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    (0..to)
        .map(|o| {
            let center = scale * (o as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(from as i64).max(0) as usize;
            let idx: Vec<usize> = (xmin..xmax.max(xmin)).collect();
            let mut w: Vec<f64> = idx
                .iter()
                .map(|&j| filter((j as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (idx, w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn apply(taps: &[Taps], signal: &[f64]) -> Vec<f64> {
        taps.iter()
            .map(|(i, w)| i.iter().zip(w).map(|(&i, w)| w * signal[i]).sum())
            .collect()
    }

    #[test]
    fn bicubic_weights_sum_to_one_and_hit_samples_exactly() {
        for kind in [cubic_taps(5, 9, 5.0 / 9.0), antialias_taps(5, 9)] {
            for (o, (_, w)) in kind.iter().enumerate() {
                let s: f64 = w.iter().sum();
                assert!((s - 1.0).abs() < 1e-9, "output {o}: {s}");
            }
        }
        // Scale 1: every output sits on a sample, all weight on it.
        for (o, (i, w)) in cubic_taps(4, 4, 1.0).iter().enumerate() {
            assert_eq!(i[1], o);
            assert!((w[1] - 1.0).abs() < 1e-12 && w[0].abs() < 1e-12);
        }
    }

    #[test]
    fn resizing_keeps_constants_and_the_prefix_tokens() {
        let dev = Device::Cpu;
        for interp in [PosInterp::Bicubic { offset: 0.1 }, PosInterp::TimmAntialias] {
            let mut v = vec![7f32, 8.0];
            v.extend(std::iter::repeat_n([3f32, -1.0], 9).flatten());
            let pos = Tensor::from_vec(v, (1, 10, 2), &dev).unwrap();
            let out = resize_pos_embed(&pos, 1, 3, 5, interp).unwrap();
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
    }

    #[test]
    fn resizing_a_linear_ramp_matches_torch_bicubic() {
        // PyTorch's upsample_bicubic2d for [0, 1, 2, 3] -> 2 samples (scale 2, align_corners
        // False): source 0.5 with weights [-0.09375, 0.59375, 0.59375, -0.09375] on indices
        // [0 (clamped), 0, 1, 2] gives 0.40625; by symmetry the other is 3 - 0.40625.
        let got = apply(&cubic_taps(4, 2, 2.0), &[0.0, 1.0, 2.0, 3.0]);
        assert!(
            (got[0] - 0.40625).abs() < 1e-9 && (got[1] - 2.59375).abs() < 1e-9,
            "{got:?}"
        );
    }

    #[test]
    fn antialiased_resampling_matches_torch() {
        // torch.nn.functional.interpolate(x.view(1, 1, 1, -1), size=(1, n), mode="bicubic",
        // antialias=True): upsampling a ramp, and shrinking squares (widened support).
        let up = apply(&antialias_taps(4, 8), &[0.0, 1.0, 2.0, 3.0]);
        let want_up = [
            -0.0882352963,
            0.1678832173,
            0.7099236846,
            1.25,
            1.75,
            2.2900762558,
            2.8321168423,
            3.0882351399,
        ];
        let squares: Vec<f64> = (0..8).map(|v| (v * v) as f64).collect();
        let down = apply(&antialias_taps(8, 3), &squares);
        let want_down = [1.035793662, 12.718559265, 37.485275269];
        for (g, w) in up.iter().chain(&down).zip(want_up.iter().chain(&want_down)) {
            assert!((g - w).abs() < 1e-5 * w.abs().max(1.0), "{up:?} {down:?}");
        }
    }
}
