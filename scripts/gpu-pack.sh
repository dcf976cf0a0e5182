#!/usr/bin/env bash
# Builds the CUDA binaries (the `tessera` binary, the CUDA test suite, the GPU benchmarks) here,
# where there is no GPU, and packs them with the shared libraries a GPU machine lacks
# (OpenSlide and its dependencies, libjpeg-turbo) and the example slide into .gpu/ (ignored),
# for scripts/gpu-check.sh to run on the GPU machine:
#
#   scripts/gpu-pack.sh                     # here: build (CUDA 13 from PyPI) and pack
#   bash scripts/gpu-check.sh               # there, in a copy of the repository with .gpu/
#
# CARGO_TARGET_DIR defaults to /tmp/cuda-target, away from the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
wrapper=../shared/cuda/with-cuda13
[ -x "$wrapper" ] || { echo "gpu-pack: $wrapper not found" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/cuda-target}
out=.gpu
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude

# Every executable a cargo invocation produced (JSON messages), one path per line.
executables() {
  "$wrapper" cargo "$@" --message-format=json \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    kind = m.get("target", {}).get("kind", [])
    if m.get("reason") == "compiler-artifact" and m.get("executable") and kind[:1] in (["bin"], ["test"], ["bench"]):
        print(m["executable"])'
}
bins=$(executables build --release --features cuda --bin tessera)
bins+=$'\n'$(executables test --release -p tessera-mil --features cuda --test cuda --no-run)
for b in "tessera-embed embed" "tessera-sparse subm_conv" "tessera-mil train_step"; do
  set -- $b
  bins+=$'\n'$(executables bench -p "$1" --features cuda --bench "$2" --no-run)
done

rm -rf "$out"; mkdir -p "$out/lib" "$out/bin" "$out/data"
while read -r exe; do
  [ -n "$exe" ] || continue
  name=$(basename "$exe"); name=${name%-*}   # drop cargo's hash suffix
  [ "$name" = tessera ] || name="$name-bin"
  cp "$exe" "$out/bin/$name"; strip "$out/bin/$name"
done <<< "$bins"
ls -la "$out/bin"
# Shared libraries, except the C runtime and CUDA's (the GPU machine has its own).
for exe in "$out"/bin/*; do ldd "$exe"; done | awk '/=> \//{print $3}' | sort -u \
  | grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*|libstdc\+\+|libgcc_s)\.so' \
  | grep -vE '/lib(cuda|cudart|cublas|cublasLt|curand|nvrtc|cudnn|nccl)\.so' \
  | while read -r so; do cp -L "$so" "$out/lib/"; done
tar -C "$out" -cf - bin lib | xz -T2 -6 > "$out/pack.tar.xz"
rm -rf "$out/bin" "$out/lib"
cp ../shared/data/slides/CMU-1-Small-Region.svs "$out/data/"
du -sh "$out"
