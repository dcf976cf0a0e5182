#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks, run on a GPU machine from what scripts/gpu-pack.sh packed
# into .gpu/ (that machine needs no Rust): the CUDA test suite (GPU against CPU), the embedding,
# sparse convolution and training-step benchmarks on the GPU, PyTorch's embedding figures on the
# same GPU (scripts/torch-embed-bench.py), and the examples end to end with `device: cuda`
# next to `device: cpu` on the same machine. Logs and the runs' metrics, tables and figures go
# into one archive, $OUT/gpu-check.tar.gz (OUT defaults to /tmp/gpu-out).
#
#   bash scripts/gpu-check.sh [STEP ...]
#
# Steps (default: all): tests embed sparse train torch e2e-cuda e2e-cpu half (the quickstart
# with `embed.compute: f16`).
set -uo pipefail
cd "$(dirname "$0")/.."
archive=${OUT:-/tmp/gpu-out}
out=/tmp/gpu-logs
mkdir -p "$archive" "$out" /tmp/gpu
steps=${*:-tests embed sparse train torch e2e-cuda e2e-cpu half}
has() { [[ " $steps " == *" $1 "* ]]; }

xz -dc .gpu/pack.tar.xz | tar -C /tmp/gpu -xf -
cu=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null)/cu13/lib
export PATH=/tmp/gpu/bin:$PATH
export LD_LIBRARY_PATH=/tmp/gpu/lib:$cu:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
# Kernels are JIT-compiled from PTX once and then cached across processes.
export CUDA_CACHE_PATH=/tmp/gpu/nv-cache CUDA_CACHE_MAXSIZE=4294967296
nvidia-smi -L | tee "$out/device.txt"
nproc | sed 's/^/cpus: /' | tee -a "$out/device.txt"

# Runs a step with a time limit, its output into $out/NAME.log and on stdout; never aborts.
step() {
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "rc=$rc seconds=$((SECONDS - t0))" >> "$out/$name.log"
  grep -vE '^\s*$' "$out/$name.log" | tail -n "${TAIL:-40}"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
}

if has tests; then
  TAIL=25 step cuda-tests 240 cuda-bin --test-threads 1 --nocapture
fi
export TESSERA_BENCH_DEVICE=cuda EMBED_BENCH_BATCHES=10
if has embed; then
  for compute in f32 f16 bf16; do
    export EMBED_BENCH_COMPUTE=$compute
    EMBED_BENCH_BATCH=32 TAIL=6 step embed-gpu-$compute-32 120 embed-bin --bench
    EMBED_BENCH_BATCH=128 TAIL=6 step embed-gpu-$compute-128 120 embed-bin --bench
  done
  unset EMBED_BENCH_COMPUTE
fi
has sparse && step subm-conv-gpu 120 subm_conv-bin --bench
has train && step train-step-gpu 120 train_step-bin --bench
unset TESSERA_BENCH_DEVICE
if has torch; then
  step torch-embed 150 python3 scripts/torch-embed-bench.py 32 128
fi
devices=""
has e2e-cuda && devices+=" cuda"
has e2e-cpu && devices+=" cpu"
if [ -n "$devices" ]; then
  # The examples read the slide from ../shared/data beside the repository.
  slide=../shared/data/slides/CMU-1-Small-Region.svs
  [ -f $slide ] || { mkdir -p "$(dirname $slide)" && cp .gpu/data/CMU-1-Small-Region.svs $slide; }
  for dev in $devices; do
    rm -rf /tmp/e2e-$dev
    common=(--set device=$dev --set cache_dir=/tmp/e2e-$dev/cache)
    TAIL=12 step quickstart-$dev 120 tessera run examples/quickstart/quickstart.yaml \
      "${common[@]}" --set out_dir=/tmp/e2e-$dev/quickstart
    TAIL=12 step spatial-$dev 200 tessera run examples/spatial/spatial.yaml \
      "${common[@]}" --set out_dir=/tmp/e2e-$dev/spatial
    # End-to-end fine-tuning at the paper's scale of tile: 224 px at 1 mpp, 16 tiles per slide.
    TAIL=12 step finetune-$dev 200 tessera run examples/quickstart/finetune.yaml \
      "${common[@]}" --set out_dir=/tmp/e2e-$dev/finetune --set tiles.tile_size=224 \
      --set tiles.mpp=1.0 --set train.embedder_input_size=224 --set sample.tiles_per_slide=16
  done
  has e2e-cuda && TAIL=8 step heatmap-cuda 120 tessera run examples/quickstart/heatmap.yaml --set device=cuda \
    --set cache_dir=/tmp/e2e-cuda/cache --set out_dir=/tmp/e2e-cuda/heatmap \
    --set heatmap.checkpoint=/tmp/e2e-cuda/quickstart
  (cd /tmp && find $(for d in $devices; do echo e2e-$d; done) -path '*/cache' -prune -o -type f \
    \( -name '*.json' -o -name '*.md' -o -name '*.csv' \) -print) \
    | tar -C /tmp -czf "$out/e2e.tar.gz" -T -
fi
if has half; then
  slide=../shared/data/slides/CMU-1-Small-Region.svs
  [ -f $slide ] || { mkdir -p "$(dirname $slide)" && cp .gpu/data/CMU-1-Small-Region.svs $slide; }
  rm -rf /tmp/e2e-half
  TAIL=12 step quickstart-f16 120 tessera run examples/quickstart/quickstart.yaml \
    --set device=cuda --set embed.compute=f16 --set cache_dir=/tmp/e2e-half/cache \
    --set out_dir=/tmp/e2e-half/quickstart
fi
tar -C /tmp -czf "$archive/gpu-check.tar.gz" gpu-logs
ls -la "$out" "$archive"
