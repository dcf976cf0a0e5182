#!/usr/bin/env bash
# Installs the system packages tessera builds against (Debian/Ubuntu): OpenSlide and libclang
# (openslide-rs generates its bindings with bindgen), libturbojpeg (the tiling stage's direct
# JPEG tile decoder), and vips for the benchmarks' big slides and the direct reader's tests.
# Idempotent; uses sudo when not root.
set -euo pipefail
pkgs=(libopenslide-dev libclang-dev pkg-config libturbojpeg0-dev libvips-tools)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup first" >&2; exit 1; }
