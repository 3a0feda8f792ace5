#!/usr/bin/env bash
# Set everything up, then run asrops on its embedded defaults: import the default model into
# the registry (first time only) and transcribe a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
asrops=.venv/bin/asrops

$asrops models import-default
$asrops models list

sample=../shared/data/speech/faster_whisper/jfk.flac
if [ ! -f "$sample" ]; then
  sample=$(mktemp --suffix=.wav)
  espeak-ng -w "$sample" "Speech recognition turns spoken words into text."
fi
echo "==> asrops transcribe $sample --format verbose_json"
$asrops transcribe "$sample" --format verbose_json
