#!/usr/bin/env bash
# Tile embedding on the CPU, tessera and PyTorch side by side in one run: for each model, the
# `embed` bench times tessera's batches, then runs scripts/torch-embed-bench.py on the same
# architecture, batch and thread count, and prints img/s, the ratio and GFLOP/s (as a share of
# PEAK_GFLOPS). Each row runs ROUNDS paired rounds (tessera's batches, then PyTorch's) and
# prints the median of the per-round ratios with their range: on a shared machine the clock
# drifts by tens of percent within minutes, so only rates measured next to each other compare.
#
#   scripts/embed-bench-side-by-side.sh [ROW ...]   # rows: resnet-18 resnet-50 vit-s uni virchow2
#
# Env: BATCH (32), BATCHES (timed batches per model and round, 3), BIG_BATCHES (for ViT-L/H,
# 1), ROUNDS (paired rounds per row, 3), THREADS (2: rayon and PyTorch), PEAK_GFLOPS (the f32 FMA peak of THREADS cores; default 230
# = 2 cores x 32 FLOP/cycle x 3.6 GHz, a Zen 4 core issuing one 512-bit FMA per cycle; set it
# for another CPU), COMPUTE (f32; bf16 runs tessera's AVX512-BF16 tile and PyTorch under
# bf16 autocast). Needs python3 with torch, torchvision and timm.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(resnet-18 resnet-50 vit-s uni virchow2)
export EMBED_BENCH_TORCH=1 EMBED_BENCH_BATCH="${BATCH:-32}" EMBED_BENCH_ROUNDS="${ROUNDS:-3}"
export RAYON_NUM_THREADS="${THREADS:-2}" TORCH_THREADS="${THREADS:-2}"
export EMBED_BENCH_PEAK_GFLOPS="${PEAK_GFLOPS:-230}" EMBED_BENCH_COMPUTE="${COMPUTE:-f32}"
cargo bench -p tessera-embed --bench embed --no-run 2>/dev/null
echo "load before: $(uptime)"
for row in "${rows[@]}"; do
    case "$row" in
        uni|virchow2) n="${BIG_BATCHES:-1}" ;;
        *) n="${BATCHES:-3}" ;;
    esac
    EMBED_BENCH_BATCHES="$n" cargo bench -q -p tessera-embed --bench embed -- "$row" 2>/dev/null |
        grep '^|' | { [ "$row" = "${rows[0]}" ] && cat || tail -n +3; }
    echo "load after $row: $(uptime | sed 's/.*load average/load average/')" >&2
done
echo "load after: $(uptime)"
