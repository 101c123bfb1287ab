#!/usr/bin/env bash
# Idempotent environment setup for mimbench on a CPU machine (see ../shared/DESIGN.md,
# "Environment facts"). Creates .venv, installs the torch/torchvision pair that runs on CPU,
# builds mmcv 2.1.0 from source against that torch once (wheel cached outside the checkout,
# in $MIMBENCH_CACHE/wheels), then installs the project with its extras.
#
#   bash scripts/setup.sh            # create / update .venv
#   MIMBENCH_VENV=/path bash ...     # put the virtualenv elsewhere
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MIMBENCH_VENV:-$ROOT/.venv}"
CACHE="${MIMBENCH_CACHE:-$HOME/.cache/mimbench}"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
MMCV_VERSION="2.1.0"
WHEELS="$CACHE/wheels"
mkdir -p "$WHEELS"

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
t0=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip "setuptools<80" wheel ninja

installed_torch=$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$installed_torch" != "$TORCH_VERSION" ]; then
  log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# mmcv: built once per (mmcv, torch, python) and cached outside the checkout.
PYTAG=$("$VPY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
MMCV_DIR="$WHEELS/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PYTAG"
if ! "$VPY" -c 'import mmcv, mmcv.ops' >/dev/null 2>&1; then
  if ! ls "$MMCV_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    log "building mmcv $MMCV_VERSION from source against torch $TORCH_VERSION (about 13 min on 2 cores)"
    BUILD=$(mktemp -d)
    "${PIP[@]}" download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$BUILD"
    tar -xzf "$BUILD"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD"
    SRC="$BUILD/mmcv-$MMCV_VERSION"
    # torch's headers require C++20; mmcv's setup.py hard-codes -std=c++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
    "${PIP[@]}" install -q opencv-python-headless addict mmengine==0.10.7 packaging pyyaml yapf
    (cd "$SRC" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="$(nproc)" \
       "$VPY" -m pip wheel --no-build-isolation --no-deps -w "$BUILD/dist" . )
    mkdir -p "$MMCV_DIR.tmp" && cp "$BUILD"/dist/mmcv-*.whl "$MMCV_DIR.tmp/"
    rm -rf "$MMCV_DIR" && mv "$MMCV_DIR.tmp" "$MMCV_DIR"   # atomic publish of the cache entry
    rm -rf "$BUILD"
  else
    log "reusing cached mmcv wheel from $MMCV_DIR"
  fi
  "${PIP[@]}" install -q "$MMCV_DIR"/mmcv-*.whl
fi

# Debian's Chromium, for the test that opens the HTML leaderboard in a real headless browser.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "installing Debian's chromium (browser test of the HTML report)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || log "could not install chromium; the browser test will say so"
fi

# libjpeg-turbo's headers, for the JPEG crop decoder of the fast data path (a small C helper
# built on first use; without them the fast path decodes whole images: same pixels, slower).
if ! printf '#include <stdio.h>\n#include <jpeglib.h>\n' | cc -E -x c - >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "installing libjpeg-dev (headers of the JPEG crop decoder)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjpeg-dev >/dev/null) \
    || log "could not install libjpeg-dev; the fast data path will decode whole images"
fi

log "installing mimbench with its extras"
"${PIP[@]}" install -q -e "$ROOT[mm,dev]"
"$VPY" -c 'import torch, torchvision, timm, mmcv.ops, mmdet, mmseg, mmengine, pandas; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__, "mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmseg", mmseg.__version__)'
"$VPY" -m harness.core.data.jpegcrop
log "environment ready in $(( $(date +%s) - t0 )) s: $VENV"
