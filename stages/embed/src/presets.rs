//! Pathology foundation models by name: each preset fixes the architecture (as the model
//! card's timm / `transformers` call builds it), the checkpoint's naming, the preprocessing
//! (input size, mean, std) and the output the model card prescribes, so that
//! `preset: uni2_h` is all an experiment needs to say.

use crate::hf_names::WeightsLayout;
use crate::preprocess::{Resize, ResizeFilter, IMAGENET_MEAN, IMAGENET_STD};
use crate::vit::{MlpKind, PosInterp, PosLayout, VitConfig, VitPooling};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A named pathology foundation model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// UNI (MahmoodLab): timm ViT-L/16, class token, 1024.
    Uni,
    /// UNI2-h (MahmoodLab): timm ViT-H/14, 8 registers, SwiGLU, class token, 1536.
    Uni2H,
    /// Virchow (Paige): timm ViT-H/14, SwiGLU, class token + mean patch token, 2560.
    Virchow,
    /// Virchow2 (Paige): Virchow with 4 registers, class token + mean patch token, 2560.
    Virchow2,
    /// H-optimus-0 (Bioptimus): timm ViT-g/14, 4 registers, SwiGLU, class token, 1536.
    #[serde(rename = "h_optimus_0")]
    HOptimus0,
    /// H-optimus-1 (Bioptimus): as H-optimus-0, class token, 1536.
    #[serde(rename = "h_optimus_1")]
    HOptimus1,
    /// H0-mini (Bioptimus): timm ViT-B/14, 4 registers, SwiGLU, class + mean patch token, 1536.
    H0Mini,
    /// Prov-GigaPath tile encoder: timm ViT-g/16, SwiGLU, class token, 1536.
    ProvGigapath,
    /// Phikon (Owkin): `transformers` ViT-B/16, class token, 768.
    Phikon,
    /// Phikon-v2 (Owkin): `transformers` Dinov2 ViT-L/16, class token, 1024.
    PhikonV2,
    /// GPFM (HKUST): DINOv2 ViT-L/14, class token, 1024.
    Gpfm,
    /// Hibou-B (HistAI): Dinov2 ViT-B/14 with 4 registers, class token, 768.
    HibouB,
    /// Hibou-L (HistAI): Dinov2 ViT-L/14 with 4 registers, class token, 1024.
    HibouL,
    /// Midnight-12k (kaiko.ai): `transformers` Dinov2 ViT-g/14, class + mean patch token, 3072.
    Midnight,
    /// The vision trunk of CONCH v1.5 (MahmoodLab, TITAN's patch encoder): timm ViT-L/16 at
    /// 448 px, class token, 1024. Not CONCH v1.5's 768-wide image embedding, which adds an
    /// attentional pooler and a projection on top.
    #[serde(rename = "conch_v1_5_trunk")]
    ConchV15Trunk,
}

/// Everything a preset fixes.
#[derive(Debug, Clone, PartialEq)]
pub struct PresetInfo {
    /// The name in experiment files.
    pub name: &'static str,
    /// Who made it and what it is, for listings.
    pub about: &'static str,
    /// The Hugging Face repository the weights are usually in (`weights: hf:<repo>` by default).
    pub hf_repo: &'static str,
    /// Licence and access, as the model card states them.
    pub licence: &'static str,
    /// The architecture, as the model card's timm / transformers call builds it.
    pub vit: VitConfig,
    /// How the checkpoint names its parameters.
    pub layout: WeightsLayout,
    /// The side, in pixels, the model card feeds.
    pub input_size: usize,
    /// The model card's normalisation mean (RGB, 0..1).
    pub mean: [f32; 3],
    /// The model card's normalisation standard deviation (RGB).
    pub std: [f32; 3],
    /// The embedding the model card prescribes.
    pub pooling: VitPooling,
    /// The model card's resize (filter, centre crop) from tile to input size.
    pub resize: Resize,
}

impl PresetInfo {
    /// Width of the embedding.
    pub fn dim(&self) -> usize {
        self.pooling.width(self.vit.dim)
    }

    /// How tiles are brought to the input size, in words (`bicubic, 256 then centre 224`).
    pub fn resize_note(&self) -> String {
        let filter = match self.resize.filter {
            ResizeFilter::Bilinear => "bilinear",
            ResizeFilter::Bicubic => "bicubic",
        };
        match self.resize.crop {
            Some(c) => format!(
                "{filter} to {}, centre {}",
                (self.input_size as f64 / c as f64).floor(),
                self.input_size
            ),
            None => filter.to_string(),
        }
    }
}

/// H-optimus and H0-mini's normalisation.
const HOPTIMUS_MEAN: [f32; 3] = [0.707223, 0.578729, 0.703617];
const HOPTIMUS_STD: [f32; 3] = [0.211883, 0.230117, 0.177517];
/// Hibou's normalisation.
const HIBOU_MEAN: [f32; 3] = [0.7068, 0.5755, 0.722];
const HIBOU_STD: [f32; 3] = [0.195, 0.2316, 0.1816];

/// A timm `VisionTransformer` with timm's defaults (qkv bias, class position embedded, LayerNorm
/// eps 1e-6, antialiased bicubic position resampling), 224 px position grid.
fn timm(patch: usize, dim: usize, depth: usize, heads: usize, mlp_ratio: f64) -> VitConfig {
    VitConfig {
        patch_size: patch,
        dim,
        depth,
        heads,
        mlp_hidden: (dim as f64 * mlp_ratio) as usize,
        mlp: MlpKind::Gelu,
        qkv_bias: true,
        layer_scale: None,
        registers: 0,
        pos_layout: PosLayout::AllTokens,
        pos_interp: PosInterp::TimmAntialias,
        pos_grid: 224 / patch,
        norm_eps: 1e-6,
    }
}

/// A Hugging Face `transformers` ViT / Dinov2 (bicubic without antialias, `size=` grid).
fn hf(patch: usize, dim: usize, depth: usize, heads: usize, mlp_hidden: usize) -> VitConfig {
    VitConfig {
        mlp_hidden,
        layer_scale: Some(1.0),
        pos_layout: PosLayout::ClassAndPatches,
        pos_interp: PosInterp::Bicubic { offset: 0.0 },
        ..timm(patch, dim, depth, heads, 4.0)
    }
}

impl Preset {
    /// Every preset, in listing order.
    pub const ALL: [Preset; 15] = [
        Preset::Uni,
        Preset::Uni2H,
        Preset::Virchow,
        Preset::Virchow2,
        Preset::HOptimus0,
        Preset::HOptimus1,
        Preset::H0Mini,
        Preset::ProvGigapath,
        Preset::Phikon,
        Preset::PhikonV2,
        Preset::Gpfm,
        Preset::HibouB,
        Preset::HibouL,
        Preset::Midnight,
        Preset::ConchV15Trunk,
    ];

    /// The preset's architecture, weights naming, preprocessing and output.
    pub fn info(self) -> PresetInfo {
        let swiglu = |c: VitConfig| VitConfig {
            mlp: MlpKind::SwiGluPacked,
            ..c
        };
        let ls = |c: VitConfig| VitConfig {
            layer_scale: Some(1e-5),
            ..c
        };
        let regs = |c: VitConfig, n: usize, layout: PosLayout| VitConfig {
            registers: n,
            pos_layout: layout,
            ..c
        };
        let base = |name, about, hf_repo, licence, vit, pooling| PresetInfo {
            name,
            about,
            hf_repo,
            licence,
            vit,
            layout: WeightsLayout::Timm,
            input_size: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            pooling,
            resize: Resize::default(),
        };
        let bicubic = Resize {
            filter: ResizeFilter::Bicubic,
            crop: None,
        };
        const NC_GATED: &str = "CC-BY-NC-ND 4.0, gated (accept the terms on Hugging Face)";
        match self {
            // timm.create_model("vit_large_patch16_224", init_values=1e-5, dynamic_img_size=True)
            Preset::Uni => base(
                "uni",
                "UNI (MahmoodLab), timm ViT-L/16",
                "MahmoodLab/UNI",
                NC_GATED,
                ls(timm(16, 1024, 24, 16, 4.0)),
                VitPooling::Cls,
            ),
            // vit_giant_patch14_224 with embed_dim 1536, depth 24, 24 heads, mlp_ratio
            // 2.66667*2, SwiGLUPacked, reg_tokens 8, no_embed_class, init_values 1e-5.
            Preset::Uni2H => base(
                "uni2_h",
                "UNI2-h (MahmoodLab), timm ViT-H/14, 8 registers, SwiGLU",
                "MahmoodLab/UNI2-h",
                NC_GATED,
                regs(
                    swiglu(ls(timm(14, 1536, 24, 24, 2.66667 * 2.0))),
                    8,
                    PosLayout::PatchesOnly,
                ),
                VitPooling::Cls,
            ),
            // vit_huge_patch14_224, mlp_ratio 5.3375, SwiGLUPacked, init_values 1e-5; the card
            // concatenates the class token and the mean patch token.
            Preset::Virchow => PresetInfo {
                resize: bicubic,
                ..base(
                    "virchow",
                    "Virchow (Paige), timm ViT-H/14, SwiGLU",
                    "paige-ai/Virchow",
                    "Apache 2.0, gated (accept the terms on Hugging Face)",
                    swiglu(ls(timm(14, 1280, 32, 16, 5.3375))),
                    VitPooling::ClsMean,
                )
            },
            // As Virchow with reg_tokens 4 (class position embedded: no_embed_class False).
            Preset::Virchow2 => PresetInfo {
                resize: bicubic,
                ..base(
                    "virchow2",
                    "Virchow2 (Paige), timm ViT-H/14, 4 registers, SwiGLU",
                    "paige-ai/Virchow2",
                    NC_GATED,
                    regs(
                        swiglu(ls(timm(14, 1280, 32, 16, 5.3375))),
                        4,
                        PosLayout::AllTokens,
                    ),
                    VitPooling::ClsMean,
                )
            },
            // vit_giant_patch14_reg4_dinov2 at img_size 224, global_pool "token".
            Preset::HOptimus0 | Preset::HOptimus1 => PresetInfo {
                mean: HOPTIMUS_MEAN,
                std: HOPTIMUS_STD,
                ..base(
                    if self == Preset::HOptimus0 {
                        "h_optimus_0"
                    } else {
                        "h_optimus_1"
                    },
                    if self == Preset::HOptimus0 {
                        "H-optimus-0 (Bioptimus), timm ViT-g/14, 4 registers, SwiGLU"
                    } else {
                        "H-optimus-1 (Bioptimus), timm ViT-g/14, 4 registers, SwiGLU"
                    },
                    if self == Preset::HOptimus0 {
                        "bioptimus/H-optimus-0"
                    } else {
                        "bioptimus/H-optimus-1"
                    },
                    if self == Preset::HOptimus0 {
                        "Apache 2.0, gated (accept the terms on Hugging Face)"
                    } else {
                        "Bioptimus non-commercial licence, gated (accept the terms on Hugging Face)"
                    },
                    regs(
                        swiglu(ls(timm(14, 1536, 40, 24, 2.66667 * 2.0))),
                        4,
                        PosLayout::PatchesOnly,
                    ),
                    VitPooling::Cls,
                )
            },
            // vit_base_patch14_reg4_dinov2 with SwiGLUPacked; the card concatenates the class
            // token and the mean patch token.
            Preset::H0Mini => PresetInfo {
                resize: bicubic,
                mean: HOPTIMUS_MEAN,
                std: HOPTIMUS_STD,
                ..base(
                    "h0_mini",
                    "H0-mini (Bioptimus), timm ViT-B/14, 4 registers, SwiGLU",
                    "bioptimus/H0-mini",
                    NC_GATED,
                    regs(
                        swiglu(ls(timm(14, 768, 12, 12, 4.0))),
                        4,
                        PosLayout::PatchesOnly,
                    ),
                    VitPooling::ClsMean,
                )
            },
            // vit_giant_patch14_dinov2 (SwiGLUPacked) with patch 16, mlp_ratio 5.33334.
            // Its card: Resize(256, bicubic) + CenterCrop(224).
            Preset::ProvGigapath => PresetInfo {
                resize: Resize {
                    filter: ResizeFilter::Bicubic,
                    crop: Some(0.875),
                },
                ..base(
                    "prov_gigapath",
                    "Prov-GigaPath tile encoder, timm ViT-g/16, SwiGLU",
                    "prov-gigapath/prov-gigapath",
                    "Apache 2.0, gated (accept the terms on Hugging Face)",
                    swiglu(ls(timm(16, 1536, 40, 24, 5.33334))),
                    VitPooling::Cls,
                )
            },
            // transformers ViTModel, last_hidden_state[:, 0].
            Preset::Phikon => PresetInfo {
                layout: WeightsLayout::HfVit,
                ..base(
                    "phikon",
                    "Phikon (Owkin), transformers ViT-B/16",
                    "owkin/phikon",
                    "Owkin non-commercial licence, not gated",
                    VitConfig {
                        layer_scale: None,
                        norm_eps: 1e-12,
                        ..hf(16, 768, 12, 12, 3072)
                    },
                    VitPooling::Cls,
                )
            },
            // transformers Dinov2Model, last_hidden_state[:, 0].
            Preset::PhikonV2 => PresetInfo {
                layout: WeightsLayout::HfDinov2,
                ..base(
                    "phikon_v2",
                    "Phikon-v2 (Owkin), transformers Dinov2 ViT-L/16",
                    "owkin/phikon-v2",
                    "Owkin non-commercial licence, not gated",
                    hf(16, 1024, 24, 16, 4096),
                    VitPooling::Cls,
                )
            },
            // vit_large_patch14_dinov2 at img_size 224 from the DINOv2 training checkpoint
            // (`teacher`, `backbone.` prefix, chunked blocks).
            Preset::Gpfm => PresetInfo {
                layout: WeightsLayout::Dinov2Chunked,
                ..base(
                    "gpfm",
                    "GPFM (HKUST), DINOv2 ViT-L/14",
                    "majiabo/GPFM",
                    "see the GPFM repository (research use)",
                    ls(timm(14, 1024, 24, 16, 4.0)),
                    VitPooling::Cls,
                )
            },
            // Hibou's remote-code Dinov2 with registers, pooler_output (normed class token).
            Preset::HibouB | Preset::HibouL => {
                let b = self == Preset::HibouB;
                PresetInfo {
                    layout: WeightsLayout::HfDinov2,
                    resize: bicubic,
                    mean: HIBOU_MEAN,
                    std: HIBOU_STD,
                    ..base(
                        if b { "hibou_b" } else { "hibou_l" },
                        if b {
                            "Hibou-B (HistAI), Dinov2 ViT-B/14, 4 registers"
                        } else {
                            "Hibou-L (HistAI), Dinov2 ViT-L/14, 4 registers"
                        },
                        if b {
                            "histai/hibou-b"
                        } else {
                            "histai/hibou-L"
                        },
                        "Apache 2.0, not gated",
                        if b {
                            regs(hf(14, 768, 12, 12, 3072), 4, PosLayout::ClassAndPatches)
                        } else {
                            regs(hf(14, 1024, 24, 16, 4096), 4, PosLayout::ClassAndPatches)
                        },
                        VitPooling::Cls,
                    )
                }
            }
            // transformers Dinov2Model (SwiGLU), class token + mean patch token.
            Preset::Midnight => PresetInfo {
                layout: WeightsLayout::HfDinov2,
                mean: [0.5; 3],
                std: [0.5; 3],
                ..base(
                    "midnight",
                    "Midnight-12k (kaiko.ai), transformers Dinov2 ViT-g/14, SwiGLU",
                    "kaiko-ai/midnight",
                    "MIT, not gated",
                    swiglu(hf(14, 1536, 40, 24, 8192)),
                    VitPooling::ClsMean,
                )
            },
            // TITAN's CONCH v1.5 trunk: vit_large_patch16_224 at img_size 448, init_values
            // 1e-5.
            Preset::ConchV15Trunk => PresetInfo {
                input_size: 448,
                resize: bicubic,
                ..base(
                    "conch_v1_5_trunk",
                    "CONCH v1.5 vision trunk (MahmoodLab), timm ViT-L/16 at 448 px",
                    "MahmoodLab/conchv1_5",
                    NC_GATED,
                    VitConfig {
                        pos_grid: 28,
                        ..ls(timm(16, 1024, 24, 16, 4.0))
                    },
                    VitPooling::Cls,
                )
            },
        }
    }

    /// The preset called `name` in experiment files.
    pub fn from_name(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.info().name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_widths_are_the_cards() {
        for p in Preset::ALL {
            let info = p.info();
            let json = serde_json::to_value(p).unwrap();
            assert_eq!(json, serde_json::Value::String(info.name.into()));
            assert_eq!(Preset::from_name(info.name), Some(p));
            assert!(info.vit.dim.is_multiple_of(info.vit.heads), "{}", info.name);
        }
        let width = |p: Preset| p.info().dim();
        assert_eq!(width(Preset::Uni), 1024);
        assert_eq!(width(Preset::Uni2H), 1536);
        assert_eq!(width(Preset::Virchow), 2560);
        assert_eq!(width(Preset::Virchow2), 2560);
        assert_eq!(width(Preset::HOptimus0), 1536);
        assert_eq!(width(Preset::H0Mini), 1536);
        assert_eq!(width(Preset::ProvGigapath), 1536);
        assert_eq!(width(Preset::Phikon), 768);
        assert_eq!(width(Preset::Midnight), 3072);
        // timm's int(dim * mlp_ratio).
        assert_eq!(Preset::Uni2H.info().vit.mlp_hidden, 8192);
        assert_eq!(Preset::Virchow2.info().vit.mlp_hidden, 6832);
        assert_eq!(Preset::ProvGigapath.info().vit.mlp_hidden, 8192);
        assert_eq!(
            Preset::ProvGigapath.info().resize_note(),
            "bicubic to 256, centre 224"
        );
    }
}
