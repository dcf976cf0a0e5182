"""Small oracle fixtures for tessera's ViT encoders (stages/embed/tests/fixtures/vit/).

For each family of pathology foundation models, the reference implementation (timm, or
Hugging Face `transformers` for the presets that come from it) builds the same architecture
as the preset, reduced (depth 2, width 24, patch 8 or 14, grid 4x4) but with the same
structural options (registers, SwiGLU packed or split, LayerScale, no_embed_class, qkv bias,
pooling, position-embedding interpolation to a 2x input, the 448-px case), with every
parameter randomised. The weights (float16 values, so that the file is small and both sides
compute from the very same numbers), and the reference's embeddings of a few inputs are
written; `cargo test -p tessera-embed --test encoders` loads them with tessera and requires a
relative error <= 1e-5. Inputs are not stored: both sides compute them from the same integer
formula (`input_tensor` below, `input_tensor` in tests/encoders.rs).

    python3 scripts/timm-encoder-fixtures.py [OUT_DIR]

CI does not run this (it needs torch, timm and transformers); the fixtures are committed.
"""
import json
import math
import os
import sys

import numpy as np
import timm
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from timm.layers import SwiGLU, SwiGLUPacked

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "stages", "embed", "tests", "fixtures", "vit")
DIM, DEPTH, HEADS = 24, 2, 2


def input_tensor(batch, size):
    """[batch, 3, size, size]: v_i = ((i * 7919 + 13) mod 10007) / 10007 * 3 - 1.5 over the
    flat index i, exact in float64 on both sides."""
    i = np.arange(batch * 3 * size * size, dtype=np.int64)
    v = ((i * 7919 + 13) % 10007).astype(np.float64) / 10007.0 * 3.0 - 1.5
    return torch.from_numpy(v.astype(np.float32)).reshape(batch, 3, size, size)


def randomise(model, seed):
    """Every parameter random (timm's init leaves biases at 0 and LayerScale at 1e-5, which
    would hide errors), rounded to float16 so that the stored file is exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name.endswith("lambda1"):
                v = torch.rand(p.shape, generator=g) + 0.5
            elif any(t in name for t in ("cls_token", "reg_token", "register_tokens", "pos_embed",
                                         "position_embeddings", "mask_token")):
                v = torch.randn(p.shape, generator=g) * 0.5
            elif p.ndim == 1 and name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif p.ndim == 1:
                v = 0.1 * torch.randn(p.shape, generator=g)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
            p.copy_(v.half().float())
    return model.eval()


def pool(tokens, prefix, pooling):
    cls = tokens[:, 0]
    mean = tokens[:, prefix:].mean(1)
    return {"cls": cls, "mean": mean, "cls_mean": torch.cat([cls, mean], -1)}[pooling]


def legacy_hf_names(state, vit):
    """transformers 5 names to the transformers 4 names that checkpoints on the hub carry."""
    out = {}
    for k, v in state.items():
        n = k
        if vit:
            n = n.replace("layers.", "encoder.layer.", 1) if n.startswith("layers.") else n
            n = n.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense.")
        for new, old in (("q_proj", "attention.query"), ("k_proj", "attention.key"),
                         ("v_proj", "attention.value"), ("o_proj", "output.dense")):
            n = n.replace(f".attention.{new}.", f".attention.{old}.")
        out[n] = v
    # A split SwiGLU (gate_proj, up_proj, down_proj) was one packed weights_in / weights_out.
    for k in [k for k in out if ".mlp.gate_proj." in k]:
        up = k.replace("gate_proj", "up_proj")
        out[k.replace("gate_proj", "weights_in")] = torch.cat([out.pop(k), out.pop(up)], 0)
    for k in [k for k in out if ".mlp.down_proj." in k]:
        out[k.replace("down_proj", "weights_out")] = out.pop(k)
    return out


def timm_family(name, seed, vit, patch, sizes, pooling, **kwargs):
    img = patch * 4
    model = randomise(timm.models.VisionTransformer(
        img_size=img, patch_size=patch, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        num_classes=0, dynamic_img_size=True, **kwargs), seed)
    outputs = {}
    with torch.no_grad():
        for s in sizes:
            tokens = model.forward_features(input_tensor(2, s))
            outputs[f"oracle.out_{s}"] = pool(tokens, model.num_prefix_tokens, pooling)
    weights = {k: v.half() for k, v in model.state_dict().items()}
    return weights, outputs, dict(vit, patch_size=patch, pos_grid=4), "timm", pooling, sizes


def hf_family(name, seed, vit, cls, config, sizes, pooling, legacy=True):
    model = randomise(cls(config), seed)
    regs = getattr(config, "num_register_tokens", 0)
    outputs = {}
    with torch.no_grad():
        for s in sizes:
            kw = {"interpolate_pos_encoding": True} if isinstance(model, transformers.ViTModel) else {}
            tokens = model(pixel_values=input_tensor(2, s), **kw).last_hidden_state
            outputs[f"oracle.out_{s}"] = pool(tokens, 1 + regs, pooling)
    state = {k: v.half() for k, v in model.state_dict().items()}
    if legacy:
        state = legacy_hf_names(state, isinstance(model, transformers.ViTModel))
    layout = "hf_vit" if isinstance(model, transformers.ViTModel) else "hf_dinov2"
    return state, outputs, dict(vit, patch_size=config.patch_size, pos_grid=4), layout, pooling, sizes


def vit(mlp_hidden, mlp="gelu", qkv_bias=True, layer_scale=True, registers=0,
        pos_layout="all_tokens", pos_interp="timm", offset=0.0, norm_eps=1e-6):
    return dict(dim=DIM, depth=DEPTH, heads=HEADS, mlp_hidden=mlp_hidden, mlp=mlp,
                qkv_bias=qkv_bias, layer_scale=layer_scale, registers=registers,
                pos_layout=pos_layout, pos_interp=pos_interp, offset=offset, norm_eps=norm_eps)


def main():
    os.makedirs(OUT, exist_ok=True)
    packed = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    families = {
        # UNI, CONCH v1.5 trunk, GPFM: timm ViT, GELU, LayerScale, class position embedded;
        # 2x input = dynamic_img_size resampling (antialiased bicubic), as 448 px on 224 weights.
        "uni": timm_family("uni", 1, vit(4 * DIM), 8, [32, 64], "cls", init_values=1e-5),
        # UNI2-h, H-optimus-0/1, H0-mini: 8 registers, no_embed_class, SwiGLUPacked, patch 14.
        "uni2_h": timm_family(
            "uni2_h", 2, vit(int(DIM * 2.66667 * 2), "swiglu_packed", registers=8,
                             pos_layout="patches_only"),
            14, [56, 112], "cls", init_values=1e-5, mlp_ratio=2.66667 * 2, reg_tokens=8,
            no_embed_class=True, **packed),
        # Virchow2 (Virchow: no registers): registers with embedded positions, SwiGLUPacked,
        # class token + mean patch token.
        "virchow2": timm_family(
            "virchow2", 3, vit(int(DIM * 5.3375), "swiglu_packed", registers=4),
            8, [32, 64], "cls_mean", init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, **packed),
        # Prov-GigaPath: SwiGLUPacked, no registers, patch 16 (here 8).
        "prov_gigapath": timm_family(
            "prov_gigapath", 4, vit(int(DIM * 5.33334), "swiglu_packed"), 8, [32],
            "cls", init_values=1e-5, mlp_ratio=5.33334, **packed),
        # timm's split SwiGLU, no qkv bias, no LayerScale, mean of patch tokens.
        "swiglu_mean": timm_family(
            "swiglu_mean", 5, vit(int(DIM * 2.66667), "swiglu", qkv_bias=False,
                                  layer_scale=False, registers=2, pos_layout="patches_only"),
            8, [32, 64], "mean", mlp_ratio=2.66667, mlp_layer=SwiGLU, act_layer=torch.nn.SiLU,
            qkv_bias=False,
            reg_tokens=2, no_embed_class=True),
        # Phikon: transformers ViTModel (eps 1e-12), transformers-4 names.
        "phikon": hf_family(
            "phikon", 6, vit(4 * DIM, layer_scale=False, pos_layout="class_and_patches",
                             pos_interp="bicubic", norm_eps=1e-12),
            transformers.ViTModel,
            transformers.ViTConfig(hidden_size=DIM, num_hidden_layers=DEPTH,
                                   num_attention_heads=HEADS, intermediate_size=4 * DIM,
                                   image_size=32, patch_size=8, layer_norm_eps=1e-12),
            [32, 64], "cls"),
        # Phikon-v2: transformers Dinov2Model, transformers-5 names.
        "phikon_v2": hf_family(
            "phikon_v2", 7, vit(4 * DIM, pos_layout="class_and_patches", pos_interp="bicubic"),
            transformers.Dinov2Model,
            transformers.Dinov2Config(hidden_size=DIM, num_hidden_layers=DEPTH,
                                      num_attention_heads=HEADS, mlp_ratio=4, image_size=32,
                                      patch_size=8, layer_norm_eps=1e-6),
            [32, 64], "cls", legacy=False),
        # Hibou: Dinov2 with 4 registers inserted after the positions (transformers'
        # Dinov2WithRegistersModel; Hibou's own remote code is the same architecture), native
        # size only (the two implementations resample positions differently).
        "hibou": hf_family(
            "hibou", 8, vit(4 * DIM, registers=4, pos_layout="class_and_patches",
                            pos_interp="bicubic"),
            transformers.Dinov2WithRegistersModel,
            transformers.Dinov2WithRegistersConfig(
                hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                mlp_ratio=4, image_size=32, patch_size=8, num_register_tokens=4,
                layer_norm_eps=1e-6),
            [32], "cls"),
        # Midnight: Dinov2Model with SwiGLU (weights_in / weights_out), class + mean token.
        "midnight": hf_family(
            "midnight", 9, vit(2 * ((int(DIM * 4 * 2 / 3) + 7) // 8 * 8), "swiglu_packed",
                               pos_layout="class_and_patches", pos_interp="bicubic"),
            transformers.Dinov2Model,
            transformers.Dinov2Config(hidden_size=DIM, num_hidden_layers=DEPTH,
                                      num_attention_heads=HEADS, mlp_ratio=4, image_size=32,
                                      patch_size=8, use_swiglu_ffn=True, layer_norm_eps=1e-6),
            [32, 64], "cls_mean"),
    }
    manifest = {"reference": f"timm {timm.__version__}, transformers {transformers.__version__}, "
                             f"torch {torch.__version__}", "families": []}
    for name, (weights, outputs, cfg, layout, pooling, sizes) in families.items():
        tensors = dict(weights)
        tensors.update({k: v.contiguous().float() for k, v in outputs.items()})
        save_file(tensors, os.path.join(OUT, f"{name}.safetensors"))
        manifest["families"].append(dict(name=name, file=f"{name}.safetensors", layout=layout,
                                         pooling=pooling, batch=2, sizes=sizes, vit=cfg))

    # Position-embedding resampling kernels alone: grid 4 -> 7 and 4 -> 2, against PyTorch.
    g = torch.Generator().manual_seed(10)
    grid = torch.randn(1, 5, 4, 4, generator=g)
    pos = {"pos.grid": grid.permute(0, 2, 3, 1).reshape(16, 5)}
    for to in (7, 2):
        pos[f"pos.timm_{to}"] = F.interpolate(grid, size=(to, to), mode="bicubic",
                                              antialias=True)
        pos[f"pos.hf_{to}"] = F.interpolate(grid, size=(to, to), mode="bicubic",
                                            align_corners=False)
        # DINOv2: scale_factor (to + 0.1) / from.
        pos[f"pos.dinov2_{to}"] = F.interpolate(grid, scale_factor=((to + 0.1) / 4,) * 2,
                                                mode="bicubic", align_corners=False)
    pos = {k: (v if k == "pos.grid" else v.permute(0, 2, 3, 1).reshape(-1, 5)).contiguous()
           for k, v in pos.items()}
    save_file(pos, os.path.join(OUT, "pos_resample.safetensors"))
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {len(families)} families + pos_resample to {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
