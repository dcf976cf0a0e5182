//! The tile-embedder interface other stages reuse (the training stage fine-tunes through it),
//! and the loader that turns a spec (architecture, weights, preprocessing) into one.

use crate::error::{EmbedError, EmbedResult};
use crate::preprocess::{Preprocess, Resize};
use crate::presets::Preset;
use crate::resnet::{ResNet, ResNetDepth};
use crate::resnet_cpu::CpuResNet;
use crate::vit::{Vit, VitConfig, VitPooling};
use crate::vit_cpu::CpuVit;
use crate::weights::{var_builder, WeightsSource};
use candle_core::{DType, Device, Module, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tessera_pipeline::DeviceSpec;

/// The network architectures `embed` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// torchvision ResNet-18: 512-wide embedding (the SparseConvMIL paper's choice).
    Resnet18,
    /// torchvision ResNet-34: 512-wide embedding.
    Resnet34,
    /// torchvision ResNet-50: 2048-wide embedding.
    Resnet50,
    /// DINOv2 ViT-S/14: 384 wide (768 with `cls_mean`).
    VitS14,
    /// DINOv2 ViT-B/14: 768 wide (1536 with `cls_mean`).
    VitB14,
    /// DINOv2 ViT-L/14: 1024 wide (2048 with `cls_mean`).
    VitL14,
    /// timm ViT-B/16: 768 wide (1536 with `cls_mean`).
    VitB16,
    /// timm ViT-L/16 (e.g. UNI): 1024 wide (2048 with `cls_mean`).
    VitL16,
}

impl Architecture {
    fn vit_config(self) -> Option<VitConfig> {
        match self {
            Architecture::VitS14 => Some(VitConfig::small14()),
            Architecture::VitB14 => Some(VitConfig::base14()),
            Architecture::VitL14 => Some(VitConfig::large14()),
            Architecture::VitB16 => Some(VitConfig::base16()),
            Architecture::VitL16 => Some(VitConfig::large16()),
            _ => None,
        }
    }

    /// Width of the embedding this architecture produces.
    pub fn dim(self, pooling: VitPooling) -> usize {
        match self {
            Architecture::Resnet18 => ResNetDepth::R18.dim(),
            Architecture::Resnet34 => ResNetDepth::R34.dim(),
            Architecture::Resnet50 => ResNetDepth::R50.dim(),
            vit => pooling.width(vit.vit_config().map(|c| c.dim).unwrap_or(0)),
        }
    }

    /// The patch size of ViTs (input sizes must be multiples of it); 1 for CNNs.
    pub fn patch_size(self) -> usize {
        self.vit_config().map(|c| c.patch_size).unwrap_or(1)
    }
}

/// Everything that defines an embedder.
/// The numbers an embedder computes in. `f16`/`bf16` put a GPU's tensor cores to work and
/// halve its memory traffic, at about three significant digits per value. On the CPU, `bf16`
/// rounds the operands of the convolutions' and linear layers' products to bf16 (sums stay
/// f32) where the CPU has AVX512-BF16 (twice the multiplies of an f32 FMA per instruction)
/// or AMX (tiles of 8192 per instruction); `f16` is GPU only.
/// Embeddings come out as f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl ComputeDtype {
    /// True for the default, f32.
    pub fn is_f32(&self) -> bool {
        *self == ComputeDtype::F32
    }

    /// The name in experiment files.
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::F16 => "f16",
            ComputeDtype::Bf16 => "bf16",
        }
    }

    /// candle's dtype.
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::F16 => DType::F16,
            ComputeDtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedderSpec {
    pub arch: Architecture,
    pub weights: WeightsSource,
    /// Prefix of the parameter names in the weights file (`module.`, `backbone.`); empty for
    /// none.
    pub weights_prefix: String,
    pub preprocess: Preprocess,
    /// ViTs only.
    pub pooling: VitPooling,
    /// What the network computes in (f16 on a GPU only; bf16 on a GPU or an AVX512-BF16 CPU).
    pub compute: ComputeDtype,
    /// A named foundation model: replaces `arch` (its architecture and weights naming; the
    /// preprocessing and pooling above are used as given).
    pub preset: Option<Preset>,
}

/// A model that turns tiles into embeddings.
pub trait TileEmbedder: Send {
    /// Width of each embedding.
    fn dim(&self) -> usize;
    /// How tiles become the model's input.
    fn preprocess(&self) -> &Preprocess;
    fn device(&self) -> &Device;
    /// Normalised `[B, 3, S, S]` input to `[B, dim]` f32 embeddings.
    fn forward(&self, input: &Tensor) -> EmbedResult<Tensor>;

    /// Square RGB8 tiles of side `px` (resized when `px` differs from the input size) to
    /// `[B, dim]` f32 embeddings.
    fn embed(&self, pixels: &[&[u8]], px: usize) -> EmbedResult<Tensor> {
        let input = self.preprocess().to_tensor(pixels, px, self.device())?;
        self.forward(&input)
    }

    /// Like [`TileEmbedder::embed`], for tiles whose sides may differ from row to row.
    fn embed_sized(&self, images: &[(&[u8], usize)]) -> EmbedResult<Tensor> {
        let input = self.preprocess().to_tensor_sized(images, self.device())?;
        self.forward(&input)
    }
}

struct ResNetEmbedder {
    model: ResNet,
    /// The model's dtype (inputs are converted to it, outputs back to f32).
    dtype: DType,
    /// The NHWC fast path, on CPU.
    cpu: Option<CpuResNet>,
    preprocess: Preprocess,
    device: Device,
}

impl TileEmbedder for ResNetEmbedder {
    fn dim(&self) -> usize {
        self.model.dim()
    }
    fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn forward(&self, input: &Tensor) -> EmbedResult<Tensor> {
        match &self.cpu {
            Some(cpu) => Ok(cpu.forward(input)?),
            None => Ok(self
                .model
                .forward(&input.to_dtype(self.dtype)?)?
                .to_dtype(DType::F32)?),
        }
    }
}

struct VitEmbedder {
    model: Vit,
    /// The AVX-512 block stack, on CPU in f32.
    cpu: Option<CpuVit>,
    dtype: DType,
    preprocess: Preprocess,
    /// The preset's resize (filter, centre crop); bilinear without crop otherwise.
    resize: Resize,
    device: Device,
}

impl TileEmbedder for VitEmbedder {
    fn dim(&self) -> usize {
        self.model.dim()
    }
    fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn forward(&self, input: &Tensor) -> EmbedResult<Tensor> {
        if let Some(cpu) = &self.cpu {
            return Ok(cpu.forward(&self.model, input)?);
        }
        Ok(self
            .model
            .forward(&input.to_dtype(self.dtype)?)?
            .to_dtype(DType::F32)?)
    }

    fn embed(&self, pixels: &[&[u8]], px: usize) -> EmbedResult<Tensor> {
        let images: Vec<(&[u8], usize)> = pixels.iter().map(|p| (*p, px)).collect();
        self.embed_sized(&images)
    }

    fn embed_sized(&self, images: &[(&[u8], usize)]) -> EmbedResult<Tensor> {
        let input = self
            .preprocess
            .to_tensor_resized(images, self.resize, &self.device)?;
        self.forward(&input)
    }
}

/// Maps the engine's device to candle's. CUDA needs this crate's `cuda` feature.
pub fn candle_device(spec: &DeviceSpec) -> EmbedResult<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(EmbedError::Device {
                    device: spec.to_string(),
                    message:
                        "this build has no CUDA support: rebuild tessera with `--features cuda`"
                            .into(),
                });
            }
            Device::new_cuda(*n).map_err(|e| EmbedError::Device {
                device: spec.to_string(),
                message: e.to_string(),
            })
        }
    }
}

/// Loads the ResNet of `depth` from `weights` for training or inference (batch-norm not
/// folded), e.g. to fine-tune it end to end: pass a `VarBuilder::from_varmap` instead to
/// train from scratch.
pub fn load_resnet(
    depth: ResNetDepth,
    weights: &WeightsSource,
    prefix: &str,
    device: &Device,
) -> EmbedResult<ResNet> {
    let vb = var_builder(weights, prefix, device)?;
    ResNet::new(depth, vb).map_err(|e| weights_error(weights, e))
}

fn weights_error(weights: &WeightsSource, e: candle_core::Error) -> EmbedError {
    weights_error_for(weights, "the architecture", e)
}

/// A weights file that does not fit `what`: names the file and the first parameter missing
/// or misshapen (candle's message).
fn weights_error_for(weights: &WeightsSource, what: &str, e: candle_core::Error) -> EmbedError {
    match weights.file() {
        Ok(Some(path)) => EmbedError::Weights {
            path,
            message: format!("does not fit {what}: {e}"),
        },
        Ok(None) => EmbedError::Candle(e),
        Err(resolve) => resolve,
    }
}

/// Builds an inference embedder: loads the weights, folds batch-norm into the convolutions
/// of ResNets, resizes ViT position embeddings to the input size.
pub fn load_embedder(spec: &EmbedderSpec, device: &Device) -> EmbedResult<Box<dyn TileEmbedder>> {
    let preprocess = spec.preprocess.clone();
    // On the CPU, bf16 is the AMX or AVX512-BF16 kernels': candle's model stays f32 (patch
    // embedding, norms, pooling) and the kernels round the operands of their products.
    let cpu_bf16 = device.is_cpu() && spec.compute == ComputeDtype::Bf16;
    let dtype = match cpu_bf16 {
        true => DType::F32,
        false => spec.compute.dtype(),
    };
    if dtype != DType::F32 && device.is_cpu() {
        return Err(EmbedError::Device {
            device: "cpu".into(),
            message: format!(
                "compute {} runs on a GPU only (the CPU computes in f32, or bf16 where it has AVX512-BF16)",
                spec.compute.name()
            ),
        });
    }
    let bf16_unsupported = |e: candle_core::Error| EmbedError::Device {
        device: "cpu".into(),
        message: e.to_string(),
    };
    let depth = match spec.arch {
        _ if spec.preset.is_some() => None,
        Architecture::Resnet18 => Some(ResNetDepth::R18),
        Architecture::Resnet34 => Some(ResNetDepth::R34),
        Architecture::Resnet50 => Some(ResNetDepth::R50),
        _ => None,
    };
    if let Some(depth) = depth {
        // Batch-norm is folded in f32, then the folded network converted.
        let model = load_resnet(depth, &spec.weights, &spec.weights_prefix, device)?
            .fold_batch_norm()
            .and_then(|m| m.to_dtype(dtype))
            .map_err(EmbedError::Candle)?;
        let cpu = if device.is_cpu() {
            Some(CpuResNet::with_bf16(&model, cpu_bf16).map_err(bf16_unsupported)?)
        } else {
            None
        };
        return Ok(Box::new(ResNetEmbedder {
            model,
            dtype,
            cpu,
            preprocess,
            device: device.clone(),
        }));
    }
    let vb = var_builder(&spec.weights, &spec.weights_prefix, device)?.set_dtype(dtype);
    let model = match spec.preset {
        Some(preset) => {
            let info = preset.info();
            // Random weights are made under timm's names; files are read under theirs.
            let vb = match spec.weights {
                WeightsSource::Random { .. } => vb,
                _ => info.layout.wrap(vb),
            };
            Vit::new(info.vit, preprocess.input_size, spec.pooling, vb).map_err(|e| {
                weights_error_for(&spec.weights, &format!("preset `{}`", info.name), e)
            })?
        }
        None => {
            let mut cfg = spec.arch.vit_config().ok_or_else(|| {
                EmbedError::Candle(candle_core::Error::Msg("unknown architecture".into()))
            })?;
            cfg.detect_from(&vb);
            Vit::new(cfg, preprocess.input_size, spec.pooling, vb)
                .map_err(|e| weights_error(&spec.weights, e))?
        }
    };
    let cpu = if device.is_cpu() {
        CpuVit::with_bf16(&model, cpu_bf16).map_err(bf16_unsupported)?
    } else {
        None
    };
    Ok(Box::new(VitEmbedder {
        model,
        cpu,
        dtype,
        preprocess,
        resize: spec.preset.map(|p| p.info().resize).unwrap_or_default(),
        device: device.clone(),
    }))
}
