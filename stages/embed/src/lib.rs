//! tessera's tile embedders on candle.
//!
//! - `kind: embed` ([`EmbedParams`]): tiles (`pixels`) to embeddings with a ResNet-18/34/50
//!   (torchvision names), a DINOv2/timm ViT, or a pathology foundation model by name
//!   ([`Preset`]: UNI, UNI2-h, Virchow, H-optimus, Prov-GigaPath, Phikon, ...), from a local
//!   `.safetensors`/`.pth` file or the local Hugging Face cache (`hf:ORG/NAME`).
//! - [`load_embedder`] / [`TileEmbedder`]: the models, for other stages (fine-tuning).

pub mod columns;
mod cpu_amx;
mod cpu_gemm;
mod cpu_gemm_bf16;
pub mod embed;
pub mod embedder;
pub mod error;
pub mod hf_names;
pub mod preprocess;
pub mod presets;
pub mod resnet;
pub mod resnet_cpu;
pub mod vit;
pub mod vit_cpu;
pub mod weights;

pub use embed::{EmbedParams, Pooling};
pub use embedder::{
    candle_device, load_embedder, load_resnet, Architecture, ComputeDtype, EmbedderSpec,
    TileEmbedder,
};
pub use error::{EmbedError, EmbedResult};
pub use hf_names::WeightsLayout;
pub use preprocess::{Preprocess, Resize, ResizeFilter, IMAGENET_MEAN, IMAGENET_STD};
pub use presets::{Preset, PresetInfo};
pub use resnet::{ResNet, ResNetDepth};
pub use vit::{MlpKind, PosInterp, PosLayout, Vit, VitConfig, VitPooling};
pub use weights::WeightsSource;
