# Sourced by the scripts: settings that only make sense for a run from this checkout.
# The real speech data beside the checkout, when it is there (see ../shared/data/speech/README).
if [ -z "${ASROPS_SPEECH_DATA_DIR:-}" ] && [ -f ../shared/data/speech/manifest.jsonl ]; then
  ASROPS_SPEECH_DATA_DIR="$(cd ../shared/data/speech && pwd)"
  export ASROPS_SPEECH_DATA_DIR
fi
