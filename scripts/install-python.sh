#!/usr/bin/env bash
# The Python part of an install, shared by scripts/setup.sh (the checkout's .venv: editable, with
# the test extras) and the images (k8s/images/Dockerfile.*: non-editable), so both install the
# same way. tests/test_k8s.py checks that all of them call this script.
#   usage: scripts/install-python.sh PYTHON PIP-INSTALL-ARGUMENTS...
#   e.g.:  scripts/install-python.sh .venv/bin/python -e ".[test]"
# TORCH_INDEX_URL (optional): the index torch comes from, e.g. https://download.pytorch.org/whl/cpu
# for the CPU-only build; unset, pip's configured index.
set -euo pipefail

TORCH_VERSION=2.13.0

python=$1
shift
"$python" -m pip install -q --upgrade pip
# torch first: asrops's unpinned 'torch' requirement is then satisfied, and pip does not choose a
# (multi-GB CUDA) build itself.
torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  torch_index=(--index-url "$TORCH_INDEX_URL")
fi
"$python" -c "import torch" 2>/dev/null || "$python" -m pip install -q "${torch_index[@]}" "torch==$TORCH_VERSION"
"$python" -m pip install -q "$@"
