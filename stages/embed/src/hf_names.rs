//! Checkpoints whose parameter names are not timm's, read under timm's names so that one
//! [`crate::vit::Vit`] serves them all: Hugging Face `transformers` ViT (`ViTModel`: Phikon) and
//! Dinov2 (`Dinov2Model`, `Dinov2WithRegistersModel`, Hibou's remote code: Phikon-v2, Hibou,
//! Midnight) checkpoints, whose attention stores `query`, `key` and `value` apart (they are
//! concatenated into timm's `qkv`), and DINOv2 training checkpoints with chunked blocks
//! (`blocks.{chunk}.{i}`, e.g. GPFM's).

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// The naming scheme of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsLayout {
    /// timm's (and DINOv2's) names, as the model reads them.
    Timm,
    /// DINOv2 training checkpoints: timm's names, blocks possibly chunked (`blocks.1.6.*` for
    /// block 6 in chunk 1).
    Dinov2Chunked,
    /// Hugging Face `ViTModel`.
    HfVit,
    /// Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`.
    HfDinov2,
}

impl WeightsLayout {
    /// Wraps `vb` (the file, already under its prefix) so that it answers to timm's names.
    pub fn wrap(self, vb: VarBuilder<'static>) -> VarBuilder<'static> {
        if self == WeightsLayout::Timm {
            return vb;
        }
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        VarBuilder::from_backend(
            Box::new(Renamed {
                inner: vb,
                layout: self,
            }),
            dtype,
            device,
        )
    }
}

/// Where a timm-named parameter lives in the file: one tensor, or several concatenated along
/// dim 0 (`query`, `key`, `value` into `qkv`; a split SwiGLU's gate and up projections into a
/// packed `fc1`).
struct Source(Vec<String>);

impl Source {
    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

struct Renamed {
    inner: VarBuilder<'static>,
    layout: WeightsLayout,
}

impl Renamed {
    /// The file's possible names for a timm parameter name, most usual first: Hugging Face
    /// checkpoints on the hub were written by `transformers` 4 (`attention.attention.query`,
    /// `intermediate.dense`, `mlp.weights_in`), `transformers` 5 writes `q_proj`, `o_proj`,
    /// `mlp.gate_proj`, ...
    fn candidates(&self, name: &str) -> Vec<Source> {
        let one = |s: String| vec![Source(vec![s])];
        if self.layout == WeightsLayout::Dinov2Chunked {
            if let Some((i, tail)) = name
                .strip_prefix("blocks.")
                .and_then(|rest| rest.split_once('.'))
            {
                let mut c: Vec<Source> = (0..=16)
                    .map(|chunk| Source(vec![format!("blocks.{chunk}.{i}.{tail}")]))
                    .collect();
                c.insert(0, Source(vec![name.to_string()]));
                return c;
            }
            return one(name.to_string());
        }
        let hf_vit = self.layout == WeightsLayout::HfVit;
        match name {
            "cls_token" => return one("embeddings.cls_token".into()),
            "pos_embed" => return one("embeddings.position_embeddings".into()),
            "register_tokens" | "reg_token" => return one("embeddings.register_tokens".into()),
            _ => {}
        }
        if let Some(p) = name.strip_prefix("patch_embed.proj.") {
            return one(format!("embeddings.patch_embeddings.projection.{p}"));
        }
        if let Some(p) = name.strip_prefix("norm.") {
            return one(format!("layernorm.{p}"));
        }
        let Some((i, tail)) = name
            .strip_prefix("blocks.")
            .and_then(|rest| rest.split_once('.'))
        else {
            return one(name.to_string());
        };
        // transformers 4 and Dinov2 in 5 nest blocks under encoder.layer; ViT in 5 under layers.
        let (v4, v5) = (
            format!("encoder.layer.{i}"),
            if hf_vit {
                format!("layers.{i}")
            } else {
                format!("encoder.layer.{i}")
            },
        );
        let alt = |a: String, b: String| vec![Source(vec![a]), Source(vec![b])];
        if let Some(p) = tail.strip_prefix("attn.qkv.") {
            return vec![
                Source(
                    ["query", "key", "value"]
                        .map(|q| format!("{v4}.attention.attention.{q}.{p}"))
                        .to_vec(),
                ),
                Source(
                    ["q_proj", "k_proj", "v_proj"]
                        .map(|q| format!("{v5}.attention.{q}.{p}"))
                        .to_vec(),
                ),
            ];
        }
        if let Some(p) = tail.strip_prefix("attn.proj.") {
            return alt(
                format!("{v4}.attention.output.dense.{p}"),
                format!("{v5}.attention.o_proj.{p}"),
            );
        }
        for (timm, vit, dinov2) in [
            ("norm1.", "layernorm_before.", "norm1."),
            ("norm2.", "layernorm_after.", "norm2."),
        ] {
            if let Some(p) = tail.strip_prefix(timm) {
                let hf = if hf_vit { vit } else { dinov2 };
                return alt(format!("{v4}.{hf}{p}"), format!("{v5}.{hf}{p}"));
            }
        }
        if tail == "ls1.gamma" || tail == "ls2.gamma" {
            let k = &tail[2..3];
            return one(format!("{v4}.layer_scale{k}.lambda1"));
        }
        if let Some(p) = tail.strip_prefix("mlp.fc1.") {
            return if hf_vit {
                alt(
                    format!("{v4}.intermediate.dense.{p}"),
                    format!("{v5}.mlp.fc1.{p}"),
                )
            } else {
                vec![
                    Source(vec![format!("{v4}.mlp.fc1.{p}")]),
                    Source(vec![format!("{v4}.mlp.weights_in.{p}")]),
                    Source(vec![
                        format!("{v4}.mlp.gate_proj.{p}"),
                        format!("{v4}.mlp.up_proj.{p}"),
                    ]),
                ]
            };
        }
        if let Some(p) = tail.strip_prefix("mlp.fc2.") {
            return if hf_vit {
                alt(
                    format!("{v4}.output.dense.{p}"),
                    format!("{v5}.mlp.fc2.{p}"),
                )
            } else {
                vec![
                    Source(vec![format!("{v4}.mlp.fc2.{p}")]),
                    Source(vec![format!("{v4}.mlp.weights_out.{p}")]),
                    Source(vec![format!("{v4}.mlp.down_proj.{p}")]),
                ]
            };
        }
        one(format!("{v4}.{tail}"))
    }

    /// The first candidate the file holds entirely, else the most usual one (for the error).
    fn source(&self, name: &str) -> Source {
        let mut candidates = self.candidates(name);
        let found = candidates
            .iter()
            .position(|c| c.0.iter().all(|n| self.inner.contains_tensor(n)))
            .unwrap_or(0);
        candidates.swap_remove(found)
    }

    fn load(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let source = self.source(name);
        let found = source
            .0
            .iter()
            .map(|n| self.inner.get_unchecked_dtype(n, dtype))
            .collect::<Result<Vec<_>>>()
            .and_then(|ts| {
                if ts.len() == 1 {
                    Ok(ts[0].clone())
                } else {
                    Tensor::cat(&ts, 0)
                }
            });
        found.map_err(|e| {
            candle_core::Error::Msg(format!(
                "cannot find tensor {name} (stored as {}): {e}",
                source.describe()
            ))
        })
    }
}

impl SimpleBackend for Renamed {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.load(name, dtype)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!(
                    "shape mismatch for {name} (stored as {})",
                    self.source(name).describe()
                ),
                expected: s,
                got: t.shape().clone(),
            });
        }
        t.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let source = self.source(name);
        source.0.iter().all(|n| self.inner.contains_tensor(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vb_of(tensors: Vec<(&str, Tensor)>) -> VarBuilder<'static> {
        let map: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
    }

    #[test]
    fn hf_attention_is_concatenated_into_qkv() {
        let dev = Device::Cpu;
        let part = |v: f32| Tensor::full(v, (2, 2), &dev).unwrap();
        let vb = WeightsLayout::HfVit.wrap(vb_of(vec![
            (
                "encoder.layer.0.attention.attention.query.weight",
                part(1.0),
            ),
            ("encoder.layer.0.attention.attention.key.weight", part(2.0)),
            (
                "encoder.layer.0.attention.attention.value.weight",
                part(3.0),
            ),
            ("encoder.layer.0.layernorm_before.weight", part(4.0)),
        ]));
        let qkv = vb.get((6, 2), "blocks.0.attn.qkv.weight").unwrap();
        let col: Vec<f32> = qkv.to_vec2::<f32>().unwrap().iter().map(|r| r[0]).collect();
        assert_eq!(col, vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        assert!(vb.contains_tensor("blocks.0.norm1.weight"));
        let err = vb.get((6, 3), "blocks.0.attn.qkv.weight").unwrap_err();
        assert!(
            err.to_string().contains("blocks.0.attn.qkv.weight"),
            "{err}"
        );
        let err = vb.get(2, "blocks.1.norm1.weight").unwrap_err().to_string();
        assert!(
            err.contains("blocks.1.norm1.weight") && err.contains("layernorm_before"),
            "{err}"
        );
    }

    #[test]
    fn chunked_dinov2_blocks_are_found() {
        let dev = Device::Cpu;
        let vb = WeightsLayout::Dinov2Chunked.wrap(vb_of(vec![
            (
                "blocks.1.6.norm1.weight",
                Tensor::ones(3, DType::F32, &dev).unwrap(),
            ),
            (
                "cls_token",
                Tensor::ones((1, 1, 3), DType::F32, &dev).unwrap(),
            ),
        ]));
        assert!(vb.get(3, "blocks.6.norm1.weight").is_ok());
        assert!(vb.get((1, 1, 3), "cls_token").is_ok());
    }
}
