"""Full-size check of tessera's foundation-model presets against their references.

For each preset, the reference implementation builds the full-size architecture exactly as the
model card does (timm.create_model with the card's keyword arguments, or a `transformers`
model with the card's configuration), with random weights (every parameter randomised, the
same rules as the fixtures); the weights (in the checkpoint naming the preset reads: timm's,
or transformers 4's for the HF presets), two normalised inputs and the reference's
embeddings are written to a scratch folder, then tessera's `encoder_check` example loads the
file through the preset and prints the maximum relative error. One model at a time, the
scratch file deleted after each (the giant ones are 4.5 GB in f32).

    cargo build -p tessera-embed --example encoder_check
    python3 scripts/timm-encoder-check.py [PRESET ...]     # default: all

Heavy (1.1 B parameters for the ViT-g presets, several GB of memory each): run it by hand,
never in CI. Needs torch, timm, transformers.
"""
import gc
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch
import timm
import transformers
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("fixtures", os.path.join(HERE, "timm-encoder-fixtures.py"))
fx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fx)

PACKED = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)

# preset: (builder, input size, pooling, prefix tokens)
TIMM = {
    "uni": ("vit_large_patch16_224", dict(img_size=224, init_values=1e-5, num_classes=0,
                                          dynamic_img_size=True)),
    "uni2_h": ("vit_giant_patch14_224", dict(
        img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
        mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8,
        dynamic_img_size=True, **PACKED)),
    "virchow": ("vit_huge_patch14_224", dict(
        img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
        dynamic_img_size=True, **PACKED)),
    "virchow2": ("vit_huge_patch14_224", dict(
        img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
        global_pool="", dynamic_img_size=True, **PACKED)),
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", dict(
        img_size=224, num_classes=0, global_pool="token", init_values=1e-5,
        dynamic_img_size=False)),
    "h0_mini": ("vit_base_patch14_reg4_dinov2", dict(img_size=224, num_classes=0, **PACKED)),
    "prov_gigapath": ("vit_giant_patch14_dinov2", dict(
        img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
        init_values=1e-5, mlp_ratio=5.33334, num_classes=0)),
    "gpfm": ("vit_large_patch14_dinov2", dict(img_size=224, patch_size=14, init_values=1e-5,
                                              qkv_bias=True, dynamic_img_size=True,
                                              num_classes=0)),
    "conch_v1_5_trunk": ("vit_large_patch16_224", dict(
        img_size=448, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)),
}
HF = {
    "phikon": (transformers.ViTModel, transformers.ViTConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        image_size=224, patch_size=16, layer_norm_eps=1e-12)),
    "phikon_v2": (transformers.Dinov2Model, transformers.Dinov2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
        image_size=224, patch_size=16, layer_norm_eps=1e-6)),
    "hibou_b": (transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
        image_size=224, patch_size=14, num_register_tokens=4, layer_norm_eps=1e-6)),
    "hibou_l": (transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
        image_size=224, patch_size=14, num_register_tokens=4, layer_norm_eps=1e-6)),
    "midnight": (transformers.Dinov2Model, transformers.Dinov2Config(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
        image_size=224, patch_size=14, use_swiglu_ffn=True, layer_norm_eps=1e-6)),
}
POOLING = {"virchow": "cls_mean", "virchow2": "cls_mean", "h0_mini": "cls_mean",
           "midnight": "cls_mean"}
# (preset, input size), smallest first: every preset at its own size, UNI also at 448
# (dynamic_img_size resampling). H-optimus-1 has H-optimus-0's architecture.
RUNS = [("phikon", 224), ("h0_mini", 224), ("hibou_b", 224), ("uni", 224), ("uni", 448),
        ("conch_v1_5_trunk", 448), ("gpfm", 224), ("phikon_v2", 224), ("hibou_l", 224),
        ("virchow", 224), ("virchow2", 224), ("uni2_h", 224), ("h_optimus_0", 224),
        ("prov_gigapath", 224), ("midnight", 224)]


def reference(preset, size):
    """(state dict in the preset's naming, inputs, reference embeddings)."""
    pooling = POOLING.get(preset, "cls")
    x = fx.input_tensor(2, size)
    with torch.no_grad():
        if preset in TIMM:
            name, kwargs = TIMM[preset]
            model = timm.create_model(name, pretrained=False, **kwargs)
            randomise(model)
            tokens = model.forward_features(x)
            prefix = model.num_prefix_tokens
            state = model.state_dict()
        else:
            cls, config = HF[preset]
            model = cls(config)
            randomise(model)
            kw = {"interpolate_pos_encoding": True} if cls is transformers.ViTModel else {}
            tokens = model(pixel_values=x, **kw).last_hidden_state
            prefix = 1 + getattr(config, "num_register_tokens", 0)
            state = fx.legacy_hf_names(model.state_dict(), cls is transformers.ViTModel)
    out = fx.pool(tokens, prefix, pooling)
    return {k: v.contiguous() for k, v in state.items()}, x, out.contiguous()


def randomise(model):
    """The fixtures' rules, without the float16 rounding (full-size files stay f32)."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("gamma") or name.endswith("lambda1"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif any(t in name for t in ("cls_token", "reg_token", "register_tokens", "pos_embed",
                                     "position_embeddings", "mask_token")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif p.ndim == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    model.eval()


def main():
    only = set(sys.argv[1:])
    root = os.path.join(HERE, "..")
    example = os.environ.get("ENCODER_CHECK", os.path.join(root, "target", "debug", "examples",
                                                           "encoder_check"))
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"timm {timm.__version__}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}")
    for preset, size in RUNS:
        if only and preset not in only:
            continue
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
            t = time.time()
            state, x, out = reference(preset, size)
            weights = os.path.join(tmp, "weights.safetensors")
            save_file(state, weights)
            del state
            gc.collect()
            io = os.path.join(tmp, "io.safetensors")
            save_file({"input": x, "output": out}, io)
            ref_secs = time.time() - t
            res = subprocess.run([example, preset, weights, io], capture_output=True, text=True)
            line = (res.stdout.strip() or res.stderr.strip()).splitlines()[-1:]
            print(f"{line[0] if line else res.returncode} (reference {ref_secs:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
