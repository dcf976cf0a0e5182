"""PyTorch reference for the embedding benchmark (stages/embed/benches/embed.rs) on a GPU:
torchvision ResNet-18/50, random weights, eval mode, 224 px, f32, channels_last, cuDNN
autotuning on; TF32 off (as tessera/candle compute in full f32) and on (PyTorch's default for
convolutions). Prints the same best (median) img/s of single timed batches, forward only.

    python3 scripts/torch-embed-bench.py [BATCH ...]     # default 32 128

On the CPU, as a worker of the Rust bench (`EMBED_BENCH_TORCH=1`), for one model: the same
architecture as tessera's row (timm for the ViTs, as the presets' model cards build them),
random weights, inference mode, f32 (bf16 autocast under `EMBED_BENCH_COMPUTE=bf16`),
`TORCH_THREADS` threads (default 2); prints one JSON line
`{"best": img/s, "median": img/s, "gflop": per image}` (FLOPs of convolutions, matmuls and
attention as PyTorch's FlopCounterMode counts them: 2 per multiply-add).

    python3 scripts/torch-embed-bench.py --cpu MODEL BATCH RUNS
    # MODEL: resnet18 | resnet50 | vit_s14 | uni | virchow2
"""
import os
import json
import sys
import time

import torch
import torchvision


def cpu_model(name):
    """The CPU reference for a row of the Rust bench."""
    if name in ("resnet18", "resnet50"):
        return getattr(torchvision.models, name)(weights=None).eval().to(
            memory_format=torch.channels_last)
    import timm
    if name == "vit_s14":
        return timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0).eval()
    if name == "uni":
        return timm.create_model("vit_large_patch16_224", img_size=224, init_values=1e-5,
                                 num_classes=0, dynamic_img_size=True).eval()
    if name == "virchow2":
        return timm.create_model(
            "vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
            mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
            mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU).eval()
    raise SystemExit(f"unknown model {name}")


def bench_cpu(name, batch, runs):
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    model = cpu_model(name)
    x = torch.rand(batch, 3, 224, 224)
    if name.startswith("resnet"):
        x = x.to(memory_format=torch.channels_last)
    # The Rust bench's `EMBED_BENCH_COMPUTE=bf16` (inherited): bf16 autocast, oneDNN's
    # AVX512-BF16 kernels where the CPU has them.
    bf16 = os.environ.get("EMBED_BENCH_COMPUTE") == "bf16"
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            model(x[:1])
        gflop = counter.get_total_flops() / 1e9
        model(x)
        secs = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            secs.append(time.perf_counter() - t)
    secs.sort()
    print(json.dumps({"best": batch / secs[0], "median": batch / secs[len(secs) // 2],
                      "gflop": gflop, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


def bench(model, batch, runs=10):
    x = torch.rand(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        secs = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            secs.append(time.perf_counter() - t)
    secs.sort()
    return batch / secs[0], batch / secs[len(secs) // 2]


def main():
    if sys.argv[1:2] == ["--cpu"]:
        name, batch, runs = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        return bench_cpu(name, batch, runs)
    batches = [int(b) for b in sys.argv[1:]] or [32, 128]
    torch.backends.cudnn.benchmark = True
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| model | batch | TF32 | PyTorch img/s best (median) |")
    print("|---|---|---|---|")
    for name in ["resnet18", "resnet50"]:
        model = getattr(torchvision.models, name)(weights=None).cuda().eval()
        model = model.to(memory_format=torch.channels_last)
        for tf32 in [False, True]:
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for batch in batches:
                best, med = bench(model, batch)
                print(f"| {name} | {batch} | {'on' if tf32 else 'off'} | {best:.0f} ({med:.0f}) |")


if __name__ == "__main__":
    main()
