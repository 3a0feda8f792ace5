"""The voices `asrops synth` can speak with, and one call that turns text into 16 kHz samples.

Two command-line engines, run as subprocesses (no Python bindings to install): espeak-ng
(formant synthesis, many English accents) and flite (CMU diphone/cluster voices). Both are
deterministic: the same text, voice and rate give the same bytes.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from asrops.audio import decode_audio

Engine = Literal["espeak-ng", "flite"]
FLITE_NATURAL_WPM = 175
"""flite's speed at duration_stretch=1, roughly; a requested rate R becomes stretch 175/R."""
TTS_TIMEOUT_S = 60


class Voice(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    """Id used in specs and manifests: espeak-ng's voice name, or flite's."""
    engine: Engine
    accent: str
    """espeak-ng language code of the accent (flite's awb is a Scottish speaker)."""
    description: str


CATALOGUE: dict[str, Voice] = {
    v.name: v
    for v in [
        Voice(name="en-us", engine="espeak-ng", accent="en-us", description="General American"),
        Voice(name="en-gb", engine="espeak-ng", accent="en-gb", description="British"),
        Voice(name="en-gb-x-rp", engine="espeak-ng", accent="en-gb-x-rp", description="Received Pronunciation"),
        Voice(name="en-gb-scotland", engine="espeak-ng", accent="en-gb-scotland", description="Scottish"),
        Voice(name="en-029", engine="espeak-ng", accent="en-029", description="Caribbean"),
        Voice(name="en-us-nyc", engine="espeak-ng", accent="en-us-nyc", description="New York City"),
        Voice(name="en-gb-x-gbclan", engine="espeak-ng", accent="en-gb-x-gbclan", description="Lancaster"),
        Voice(name="en-gb-x-gbcwmd", engine="espeak-ng", accent="en-gb-x-gbcwmd", description="West Midlands"),
        Voice(name="kal", engine="flite", accent="en-us", description="American male, 8 kHz diphones"),
        Voice(name="kal16", engine="flite", accent="en-us", description="American male, 16 kHz diphones"),
        Voice(name="awb", engine="flite", accent="en-gb-scotland", description="Scottish male"),
        Voice(name="rms", engine="flite", accent="en-us", description="American male"),
        Voice(name="slt", engine="flite", accent="en-us", description="American female"),
    ]
}  # fmt: skip
ACCENTS = sorted({v.accent for v in CATALOGUE.values()})


@cache
def installed_voices() -> tuple[str, ...]:
    """Catalogue voices whose engine is on PATH and knows the voice (asked once per process)."""
    found: set[str] = set()
    if shutil.which("espeak-ng"):
        out = _run(["espeak-ng", "--voices=en"]).stdout.decode()
        found |= {line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1}
    if shutil.which("flite"):
        out = _run(["flite", "-lv"]).stdout.decode()
        found |= set(out.split(":", 1)[-1].split())
    return tuple(name for name, v in CATALOGUE.items() if name in found)


def synthesize(voice: Voice, text: str, rate_wpm: int) -> np.ndarray:
    """Speak `text` and return 16 kHz mono float32 samples (the engines write 22.05/8/16 kHz)."""
    with tempfile.TemporaryDirectory(prefix="asrops-tts-") as tmp:
        wav = Path(tmp) / "tts.wav"
        if voice.engine == "espeak-ng":
            cmd = ["espeak-ng", "-v", voice.name, "-s", str(rate_wpm), "-w", str(wav), "--", text]
        else:  # flite: options must come before -t/-o
            stretch = f"{FLITE_NATURAL_WPM / rate_wpm:.3f}"
            cmd = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={stretch}",
                   "-t", text, "-o", str(wav)]  # fmt: skip
        _run(cmd)
        return decode_audio(wav).samples


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, timeout=TTS_TIMEOUT_S)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-500:]
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}): {err}")
    return proc
