"""PyTorch reference for the embedding benchmark (stages/embed/benches/embed.rs) on a GPU:
torchvision ResNet-18/50, random weights, eval mode, 224 px, f32, channels_last, cuDNN
autotuning on; TF32 off (as tessera/candle compute in full f32) and on (PyTorch's default for
convolutions). Prints the same best (median) img/s of single timed batches, forward only.

    python3 scripts/torch-embed-bench.py [BATCH ...]     # default 32 128
"""
import sys
import time

import torch
import torchvision


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
