#!/usr/bin/env bash
# End to end, tiling + embedding of the big benchmark slide (2602 tiles of 224 px at level 0,
# ResNet-18, random weights, batch 32), tessera and openslide-python + PyTorch in the same run,
# alternated REPS times: `tessera run examples/big-slide/tile-embed.yaml` (open, tissue
# detection, read, embed, overlapped through the engine's channel) against
# scripts/torch-tile-embed.py (openslide-python reading the same tiles on a thread, PyTorch
# ResNet-18 channels_last). Prints each repetition's seconds and `uptime`, then the medians and
# the ratio (with the spread of the per-repetition ratios).
#
#   scripts/tile-embed-side-by-side.sh          # REPS=3 THREADS=2 PRECISION=f32
#
# PRECISION=bf16 runs tessera with `compute: bf16` (CPUs with AVX512-BF16) and PyTorch under
# `torch.autocast("cpu", torch.bfloat16)`; TORCH_PRECISION (default PRECISION) sets PyTorch's
# side alone, e.g. `PRECISION=bf16 TORCH_PRECISION=f32` (tessera bf16 against PyTorch f32,
# what a user choosing the faster of each gets: PyTorch's bf16 autocast on the CPU is slower
# than its f32 here). Needs `pip install torch torchvision openslide-python
# openslide-bin pyarrow`, and the slide (built here with ../shared/data/make_big_slide.sh when
# missing; needs vips).
set -euo pipefail
cd "$(dirname "$0")/.."
reps="${REPS:-3}"
threads="${THREADS:-2}"
precision="${PRECISION:-f32}"
torch_precision="${TORCH_PRECISION:-$precision}"
slide=target/tessera-bench/big.tif
[ -f "$slide" ] || ../shared/data/make_big_slide.sh "$slide"
cargo build -q --release -p tessera
bin=./target/release/tessera
export RAYON_NUM_THREADS="$threads"
# The tile list: tessera's own tiling, coordinates only, cached as Parquet.
$bin run --quiet examples/big-slide/tiles.yaml >/dev/null
coords=$(find target/tessera-bench/cache-tiles -name '*.parquet' | head -n 1)
[ -n "$coords" ] || { echo "no tile table under target/tessera-bench/cache-tiles" >&2; exit 1; }
exp=(examples/big-slide/tile-embed.yaml)
torch_args=()
[ "$precision" = bf16 ] && exp+=(--set embed.compute=bf16)
[ "$torch_precision" = bf16 ] && torch_args=(--bf16)
echo "tiles: $(python3 -c "import pyarrow.parquet as pq; print(pq.read_metadata('$coords').num_rows)"), threads $threads, precision: tessera $precision, PyTorch $torch_precision"
echo "load before: $(uptime)"
t_all=(); p_all=()
for rep in $(seq "$reps"); do
    s=$(date +%s.%N)
    $bin run --quiet "${exp[@]}" >/dev/null
    t=$(echo "$(date +%s.%N) - $s" | bc)
    p=$(python3 scripts/torch-tile-embed.py "$slide" "$coords" --threads "$threads" "${torch_args[@]}")
    ps=$(echo "$p" | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["seconds"])')
    printf 'rep %d: tessera %.2f s, openslide+PyTorch %s s (%s); %s\n' "$rep" "$t" "$ps" "$p" \
        "$(uptime | sed 's/.*load average/load average/')"
    t_all+=("$t"); p_all+=("$ps")
done
python3 - "${t_all[*]}" "${p_all[*]}" <<'PY'
import statistics as st, sys
t = [float(v) for v in sys.argv[1].split()]
p = [float(v) for v in sys.argv[2].split()]
r = [b / a for a, b in zip(t, p)]
print(f"tessera median {st.median(t):.2f} s (min {min(t):.2f}, max {max(t):.2f}); "
      f"openslide+PyTorch median {st.median(p):.2f} s (min {min(p):.2f}, max {max(p):.2f})")
print(f"ratio of medians {st.median(p) / st.median(t):.2f}x; per-repetition ratios "
      f"{', '.join(f'{x:.2f}' for x in r)}")
PY
echo "load after: $(uptime)"
