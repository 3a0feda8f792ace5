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
# uv installs everything after torch: the same versions pip resolves (compared on this machine's
# fresh venvs: identical `pip freeze`), in 46 s against pip's 2-2.5 minutes, compiling the .pyc
# files on every core (they must be written here: where PYTHONDONTWRITEBYTECODE is set, Python
# never writes them later and every Ray process would compile its imports at each start). uv reads
# no pip.conf, so pip's index settings in the environment are handed on (uv's find-links list is
# comma-separated, pip's space-separated).
"$python" -m pip install -q --upgrade pip uv
[ -n "${PIP_INDEX_URL:-}" ] && export UV_INDEX_URL=${UV_INDEX_URL:-$PIP_INDEX_URL}
[ -n "${PIP_EXTRA_INDEX_URL:-}" ] && export UV_EXTRA_INDEX_URL=${UV_EXTRA_INDEX_URL:-$PIP_EXTRA_INDEX_URL}
[ -n "${PIP_FIND_LINKS:-}" ] && export UV_FIND_LINKS=${UV_FIND_LINKS:-${PIP_FIND_LINKS// /,}}
# torch first: asrops's unpinned 'torch' requirement is then satisfied, and pip does not choose a
# (multi-GB CUDA) build itself.
torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  torch_index=(--index-url "$TORCH_INDEX_URL")
fi
"$python" -c "import torch" 2>/dev/null || "$python" -m pip install -q "${torch_index[@]}" "torch==$TORCH_VERSION"
"$python" -m uv pip install -q --python "$python" --compile-bytecode "$@"
