#!/usr/bin/env bash
# Accuracy of `compute: bf16` on the CPU (AVX512-BF16) against f32, on the real tiles of
# CMU-1-Small-Region.svs (224 px at level 0, tissue >= 0.5): `tessera run` embeds them once
# with `compute: f32` and once with `compute: bf16`, then the per-tile cosine similarity and
# relative error (‖bf16 - f32‖ / ‖f32‖, and the largest element error over the largest |f32|
# element of the tile) are printed per architecture. Random weights (seed 0): no trained
# checkpoint is on this machine.
#
#   scripts/bf16-accuracy.sh [ARCH ...]      # default: resnet18 resnet50 vit_s14
#
# Needs python3 with numpy and pyarrow. Scratch files go to a temporary folder, removed after.
set -euo pipefail
cd "$(dirname "$0")/.."
archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(resnet18 resnet50 vit_s14)
cargo build -q --release -p tessera
bin=$PWD/target/release/tessera
slide=$(cd ../shared/data/slides 2>/dev/null && pwd)/CMU-1-Small-Region.svs
[ -f "$slide" ] || slide=$PWD/../shared/data/slides/CMU-1-Small-Region.svs
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
printf 'slide_id,path,label\ncmu1,%s,0\n' "$slide" >"$tmp/dataset.csv"
for arch in "${archs[@]}"; do
    for compute in f32 bf16; do
        cat >"$tmp/exp.yaml" <<YAML
name: bf16-accuracy
seed: 0
dataset: dataset.csv
cache_dir: cache-$arch-$compute
out_dir: out
stages:
  tiles:
    kind: tile
    cache: false
    params: {tile_size: 224, min_tissue: 0.5, thumbnails: false}
  embed:
    kind: embed
    inputs: [tiles]
    cache: true
    params: {arch: $arch, weights: random, batch_size: 32, compute: $compute}
YAML
        "$bin" run --quiet "$tmp/exp.yaml" >/dev/null
    done
    python3 - "$tmp/cache-$arch-f32" "$tmp/cache-$arch-bf16" "$arch" <<'PY'
import glob, sys
import numpy as np
import pyarrow.parquet as pq

def load(root):
    for f in glob.glob(f"{root}/**/*.parquet", recursive=True):
        t = pq.read_table(f)
        if "embedding" in t.column_names:
            d = t.to_pydict()
            order = np.lexsort((np.array(d["x"]), np.array(d["y"])))
            return np.array(d["embedding"], dtype=np.float64)[order]
    raise SystemExit(f"no embeddings under {root}")

a, b = load(sys.argv[1]), load(sys.argv[2])
cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
rel = np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1)
elem = np.abs(b - a).max(1) / np.abs(a).max(1)
print(f"{sys.argv[3]}: {len(a)} tiles, dim {a.shape[1]}: cosine min {cos.min():.6f} "
      f"median {np.median(cos):.6f}; relative L2 error median {np.median(rel):.2e} "
      f"max {rel.max():.2e}; max element error / max |f32| {elem.max():.2e}")
PY
done
