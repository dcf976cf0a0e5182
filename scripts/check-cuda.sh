#!/usr/bin/env bash
# Checks that the CUDA path (`--features cuda`: candle's CUDA backend in every crate) still
# compiles, on a machine with no GPU and no CUDA toolkit: CUDA 13.0's compiler and libraries come
# from PyPI wheels through ../shared/cuda/with-cuda13 (first run: ~600 MB download and about
# 7 minutes for candle's kernels). Pass `build --release` to build the binary instead;
# scripts/gpu-pack.sh builds and packs the binary, the CUDA tests and the GPU benchmarks for a
# GPU machine (run there with scripts/gpu-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
wrapper=../shared/cuda/with-cuda13
[ -x "$wrapper" ] || { echo "check-cuda: $wrapper not found" >&2; exit 1; }
if [ $# -eq 0 ]; then set -- check; fi
exec "$wrapper" cargo "$@" --features cuda
