"""The PyTorch reference of the end-to-end bench (scripts/tile-embed-side-by-side.sh): read the
same tiles tessera keeps from the same slide with openslide-python, and embed them with
torchvision's ResNet-18 (random weights, channels_last, inference mode, f32 or bf16 autocast),
as a CLAM/TRIDENT-style pipeline does. A reading thread (openslide-python releases the GIL in
`read_region`) fills a bounded queue of batches while the model runs, so reading overlaps with
the model as it does in tessera.

    python3 scripts/torch-tile-embed.py SLIDE COORDS.parquet [--batch 32] [--threads 2] [--bf16]

COORDS is the `tiles` table tessera wrote (columns x, y, tile_size, level-0 pixels). Prints one
JSON line: wall seconds (open to last embedding), tiles, seconds the reader was busy, seconds
the model was busy.
"""
import argparse
import json
import queue
import threading
import time

import numpy as np
import openslide
import pyarrow.parquet as pq
import torch
import torchvision

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("slide")
    ap.add_argument("coords")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="torch.autocast(cpu, bfloat16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = pq.read_table(args.coords, columns=["x", "y", "tile_size"]).to_pydict()
    coords = list(zip(table["x"], table["y"], table["tile_size"]))
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(memory_format=torch.channels_last)

    start = time.perf_counter()
    slide = openslide.OpenSlide(args.slide)
    batches = queue.Queue(maxsize=4)
    read_busy = [0.0]

    def reader():
        for i in range(0, len(coords), args.batch):
            t = time.perf_counter()
            tiles = [
                np.asarray(slide.read_region((x, y), 0, (s, s)).convert("RGB"))
                for x, y, s in coords[i:i + args.batch]
            ]
            x = (np.stack(tiles).astype(np.float32) / 255.0 - MEAN) / STD
            read_busy[0] += time.perf_counter() - t
            batches.put(torch.from_numpy(x).permute(0, 3, 1, 2))  # NHWC memory = channels_last
        batches.put(None)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    model_busy, done, dim = 0.0, 0, 0
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
        while (x := batches.get()) is not None:
            t = time.perf_counter()
            out = model(x).float()
            model_busy += time.perf_counter() - t
            done += out.shape[0]
            dim = out.shape[1]
    thread.join()
    wall = time.perf_counter() - start
    print(json.dumps({"seconds": wall, "tiles": done, "dim": dim, "read_busy": read_busy[0],
                      "model_busy": model_busy, "torch": torch.__version__,
                      "openslide": openslide.__library_version__}))


if __name__ == "__main__":
    main()
