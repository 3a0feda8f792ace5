#!/usr/bin/env bash
# Idempotent setup on a fresh Debian machine with Python 3.11: Debian packages, a virtual
# environment in .venv, and asrops installed into it (editable, with the test extras).
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# espeak-ng, flite: synthetic speech (asrops synth, tests). ffmpeg: handy for users; PyAV
# bundles its own codecs, so decoding does not depend on it. prometheus (with promtool): the
# local metrics server `asrops serve` starts and the tests query. chromium: the tests render
# the drift report in a headless browser.
APT_PACKAGES=(espeak-ng flite ffmpeg prometheus chromium)
"$PYTHON" -m venv --help >/dev/null 2>&1 && "$PYTHON" -c "import ensurepip" 2>/dev/null || APT_PACKAGES+=(python3-venv)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi

# Reinstall only when the project's dependencies changed.
stamp=.venv/.asrops-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> pip install (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU build of torch first: a later unpinned 'torch' requirement is then satisfied
  # and pip does not fetch a multi-GB CUDA build.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
  extras="test"
  command -v nvidia-smi >/dev/null 2>&1 && extras="test,gpu"
  .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$want" > "$stamp"
fi
echo "==> setup done: $(.venv/bin/asrops --version 2>/dev/null || echo asrops)"
