//! One full-size preset against its reference's output, for `scripts/timm-encoder-check.py`
//! (which writes the random weights, the inputs and timm's / transformers' embeddings):
//!
//!     cargo run -p tessera-embed --example encoder_check -- PRESET WEIGHTS IO.safetensors
//!
//! `IO.safetensors` holds `input` (`[B, 3, S, S]`, normalised) and `output` (`[B, D]`). Prints
//! the maximum relative error (max |ours - reference| / max |reference|) and the seconds taken.

use candle_core::Device;
use std::path::PathBuf;
use std::time::Instant;
use tessera_embed::{
    load_embedder, Architecture, ComputeDtype, EmbedderSpec, Preprocess, Preset, WeightsSource,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [preset, weights, io] = args.as_slice() else {
        return Err("usage: encoder_check PRESET WEIGHTS IO.safetensors".into());
    };
    let preset = Preset::from_name(preset).ok_or_else(|| format!("unknown preset {preset}"))?;
    let info = preset.info();
    let io = candle_core::safetensors::load(io, &Device::Cpu)?;
    let (input, want) = (&io["input"], &io["output"]);
    let size = input.dim(2)?;
    let spec = EmbedderSpec {
        arch: Architecture::Resnet18,
        weights: WeightsSource::File(PathBuf::from(weights)),
        weights_prefix: String::new(),
        preprocess: Preprocess {
            input_size: size,
            mean: info.mean,
            std: info.std,
        },
        pooling: info.pooling,
        compute: ComputeDtype::F32,
        preset: Some(preset),
    };
    let t = Instant::now();
    let model = load_embedder(&spec, &Device::Cpu)?;
    let loaded = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let ours = model.forward(input)?;
    let secs = t.elapsed().as_secs_f64();
    let a = ours.flatten_all()?.to_vec1::<f32>()?;
    let b = want.flatten_all()?.to_vec1::<f32>()?;
    if a.len() != b.len() {
        return Err(format!("shape {:?} vs reference {:?}", ours.dims(), want.dims()).into());
    }
    let scale = b.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-12);
    let err = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale;
    println!(
        "{} {} px: width {}, max relative error {err:.2e} (load {loaded:.0} s, forward {secs:.0} s)",
        info.name,
        size,
        ours.dim(1)?
    );
    Ok(())
}
