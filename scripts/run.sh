#!/usr/bin/env bash
# Set everything up, then run the whole service locally on its embedded defaults: local Ray,
# Serve, the registry under ~/.local/share/asrops (the embedded Whisper tiny.en is imported
# as `stable` on first run, about a minute) and the OpenAI-compatible API on port 8000.
# Extra arguments go to `asrops serve` (e.g. --port 9000, --config serve/serve_config.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/asrops serve "$@"
