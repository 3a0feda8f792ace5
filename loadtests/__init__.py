"""Benchmarks, load tests and the end-to-end demo: run from the checkout (`python -m loadtests.X`),
never installed."""

from pathlib import Path

CHECKOUT_SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"
"""The real speech data beside the checkout, used when ASROPS_SPEECH_DATA_DIR is not set."""
