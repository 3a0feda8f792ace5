"""Benchmarks, load tests and the end-to-end demo: run from the checkout (`python -m loadtests.X`),
never installed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asrops.settings import Settings

CHECKOUT_SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"
"""The real speech data beside the checkout, used when ASROPS_SPEECH_DATA_DIR is not set."""


def speech_settings() -> Settings:
    """The settings from the environment, with the speech data beside the checkout when
    ASROPS_SPEECH_DATA_DIR is not set: every part of a benchmark (its clips, the engine benchmark
    it runs, the demo's traffic) reads the same speech, with or without the variable."""
    from asrops.settings import load_settings

    settings = load_settings()
    if settings.speech_data_dir is None and CHECKOUT_SPEECH.is_dir():
        settings = settings.model_copy(update={"speech_data_dir": CHECKOUT_SPEECH})
    return settings
