#!/usr/bin/env bash
# Installs the system packages tessera builds against (Debian/Ubuntu): OpenSlide and libclang
# (openslide-rs generates its bindings with bindgen), libturbojpeg (the tiling stage's direct
# JPEG tile decoder), libhdf5 (`kind: h5_features` reads CLAM/TRIDENT feature files), vips for
# the benchmarks' big slides, the direct reader's tests and the Slurm test's slides, Slurm +
# munge for tests/slurm.rs (a one-node cluster on localhost), and a TrueType font (DejaVu) for
# the text of `tessera report`'s figures.
# Idempotent; uses sudo when not root.
set -euo pipefail
pkgs=(libopenslide-dev libclang-dev pkg-config libturbojpeg0-dev libhdf5-dev libvips-tools slurm-wlm munge fonts-dejavu-core)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup first" >&2; exit 1; }
