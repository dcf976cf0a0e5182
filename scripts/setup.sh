#!/usr/bin/env bash
# Installs the system packages tessera builds against (Debian/Ubuntu): OpenSlide and libclang
# (openslide-rs generates its bindings with bindgen), libturbojpeg (the tiling stage's direct
# JPEG tile decoder), libhdf5 (`kind: h5_features` reads CLAM/TRIDENT feature files), vips for
# the benchmarks' big slides, the direct reader's tests and the Slurm test's slides, Slurm +
# munge for tests/slurm.rs (a one-node cluster on localhost), and a TrueType font (DejaVu) for
# the text of `tessera report`'s figures.
#
# Then OpenSlide 4 (DICOM WSI, and the other formats 4.0 added), which Debian does not ship
# (it has 3.4.1): the `libopenslide.so.1` of PyPI's `openslide-bin` wheel (a self-contained
# build: its dependencies are linked in, only libc is needed), downloaded with pip (nothing
# installed into any Python) and installed the way a source install of OpenSlide 4 would be:
# /usr/local/lib/x86_64-linux-gnu/libopenslide.so.1 (+ the libopenslide.so link), a pkg-config
# file there that cargo's openslide-sys finds before Debian's, and ldconfig so the binary finds
# the library at run time. The wheel has no header: the bindings come from Debian's 3.4.1
# `openslide.h`, whose functions OpenSlide 4 all still exports with the same signatures.
# Debian's 3.4.1 stays installed: without this step (TESSERA_OPENSLIDE4=0, or no pip/PyPI)
# tessera builds against it and reads everything but DICOM. `tessera --version` says which
# OpenSlide a build runs on.
#
# Idempotent; uses sudo when not root.
set -euo pipefail
pkgs=(libopenslide-dev libclang-dev pkg-config libturbojpeg0-dev libhdf5-dev libvips-tools slurm-wlm munge fonts-dejavu-core)
# pip fetches the OpenSlide 4 wheel below; a Python with pip on PATH (pyenv, a venv) will do.
python3 -m pip --version >/dev/null 2>&1 || pkgs+=(python3-pip)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

# OpenSlide 4 from openslide-bin (see above). The version is pinned: the wheel's library is
# what the tests were run against.
openslide_bin=4.0.1.2
openslide_version=4.0.1
if [ "${TESSERA_OPENSLIDE4:-1}" != 0 ]; then
  # The multiarch folder (x86_64-linux-gnu, aarch64-linux-gnu): first in pkg-config's and
  # ld.so's search paths, before /usr/lib/<arch> where Debian's 3.4.1 lives.
  arch=$(gcc -print-multiarch 2>/dev/null || true)
  [ -n "$arch" ] || arch=$(uname -m)-linux-gnu
  libdir=/usr/local/lib/$arch
  pc=$libdir/pkgconfig/openslide.pc
  if [ "$(pkg-config --modversion openslide 2>/dev/null)" = "$openslide_version" ] \
      && [ -e "$libdir/libopenslide.so.1" ] && [ -e "$pc" ]; then
    echo "setup: OpenSlide $openslide_version already installed in $libdir"
  else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: --dest "$tmp" "openslide-bin==$openslide_bin" || {
      echo "setup: cannot download openslide-bin $openslide_bin from PyPI; TESSERA_OPENSLIDE4=0" \
        "scripts/setup.sh keeps Debian's OpenSlide 3.4.1 (no DICOM)" >&2
      exit 1
    }
    # Unpack the one file needed (a wheel is a zip).
    python3 - "$tmp" <<'EOF'
import sys, zipfile, pathlib
tmp = pathlib.Path(sys.argv[1])
wheels = list(tmp.glob("openslide_bin-*.whl"))
if len(wheels) != 1:
    sys.exit(f"setup: expected one openslide-bin wheel, found {wheels}")
with zipfile.ZipFile(wheels[0]) as z:
    (tmp / "libopenslide.so.1").write_bytes(z.read("openslide_bin/libopenslide.so.1"))
EOF
    $sudo install -d "$libdir/pkgconfig"
    $sudo install -m 0755 "$tmp/libopenslide.so.1" "$libdir/libopenslide.so.1"
    $sudo ln -sfn libopenslide.so.1 "$libdir/libopenslide.so"
    $sudo tee "$pc" >/dev/null <<EOF
# OpenSlide $openslide_version from PyPI's openslide-bin $openslide_bin, installed by tessera's
# scripts/setup.sh. Headers: Debian's libopenslide-dev (3.4.1), a subset of 4's API.
libdir=$libdir
includedir=/usr/include/openslide

Name: openslide
Description: A library for reading whole slide images (openslide-bin build)
Version: $openslide_version
Libs: -L\${libdir} -lopenslide
Cflags: -I\${includedir}
EOF
    $sudo ldconfig
    echo "setup: installed OpenSlide $openslide_version (openslide-bin $openslide_bin) in $libdir"
  fi
  # A checkout built before links the old library until openslide-sys's build script reruns
  # (its output names the library folder pkg-config gave it).
  for out in "$(dirname "$0")"/../target/*/build/openslide-sys-*/output; do
    if [ -e "$out" ] && ! grep -q "$libdir" "$out"; then
      profile=$(basename "$(dirname "$(dirname "$(dirname "$out")")")")
      flag=""; [ "$profile" = release ] && flag=" --release"
      echo "setup: target/$profile was built against another OpenSlide; to link" \
        "$openslide_version, run \`cargo clean -p openslide-sys$flag\` once" >&2
    fi
  done
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup first" >&2; exit 1; }
