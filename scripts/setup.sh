#!/usr/bin/env bash
# Idempotent setup on a fresh Debian machine with Python 3.11: Debian packages, a virtual
# environment in .venv, and asrops installed into it (editable, with the test extras).
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# What asrops needs at run time (espeak-ng, flite, ffmpeg), listed in scripts/apt-packages.txt,
# which the images read too. Then what only a machine needs: prometheus (with promtool), the
# local metrics server `asrops serve` starts and the tests query; chromium: the tests render the
# drift report in a headless browser.
mapfile -t APT_PACKAGES < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' scripts/apt-packages.txt)
APT_PACKAGES+=(prometheus chromium)
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
  echo "==> installing the Python packages (first time: a minute or two)"
  extras="test"
  command -v nvidia-smi >/dev/null 2>&1 && extras="test,gpu"
  # torch (pip), then asrops (uv): the same script the images (k8s/images/) run.
  bash scripts/install-python.sh .venv/bin/python -e ".[$extras]"
  echo "$want" > "$stamp"
fi
echo "==> setup done: $(.venv/bin/asrops --version 2>/dev/null || echo asrops)"
