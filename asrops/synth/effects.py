"""Acoustic conditions applied to clean TTS output: noise at a set SNR, room reverberation and a
telephone channel. Pure numpy/scipy on 16 kHz float32; randomness only through the `rng` passed in,
so a clip's seed fixes its audio.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import signal

from asrops.audio import SAMPLE_RATE

NoiseKind = Literal["white", "babble"]
ACTIVE_FLOOR_DB = -35.0
"""Frames more than this far below the loudest frame count as silence when measuring speech."""
FRAME = 320  # 20 ms at 16 kHz


def speech_power(x: np.ndarray, floor_db: float = ACTIVE_FLOOR_DB) -> float:
    """Mean power over the non-silent 20-ms frames: TTS clips have pauses and padding, and an SNR
    over the whole clip would make short sentences noisier than long ones."""
    x = np.asarray(x, dtype=np.float64)
    frames = x[: len(x) // FRAME * FRAME].reshape(-1, FRAME) if len(x) >= FRAME else x[None, :]
    energy = (frames**2).mean(axis=1)
    if energy.max() <= 0:
        raise ValueError("the signal is silent: its SNR is undefined")
    return float(energy[energy >= energy.max() * 10 ** (floor_db / 10)].mean())


def snr_db(clean: np.ndarray, noise: np.ndarray) -> float:
    """SNR as `add_noise` sets it: active speech power over the noise's mean power."""
    return 10 * np.log10(speech_power(clean) / np.mean(np.asarray(noise, np.float64) ** 2))


def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def babble_noise(
    n: int, rng: np.random.Generator, talkers: int = 6, sr: int = SAMPLE_RATE
) -> np.ndarray:
    """Crowd-like noise without recordings: several speech-shaped noise streams (150-4000 Hz,
    falling with frequency), each switched on and off at a syllable rate (3-6 Hz)."""
    band = signal.butter(2, [150, 4000], btype="bandpass", fs=sr, output="sos")
    tilt = signal.butter(1, 500, btype="lowpass", fs=sr, output="sos")
    out = np.zeros(n)
    for _ in range(talkers):
        voice = signal.sosfilt(tilt, signal.sosfilt(band, rng.standard_normal(n)))
        syllables = signal.butter(2, rng.uniform(3, 6), btype="lowpass", fs=sr, output="sos")
        envelope = np.maximum(signal.sosfilt(syllables, rng.standard_normal(n)), 0)
        out += voice / (voice.std() + 1e-12) * envelope / (envelope.std() + 1e-12)
    return out


def add_noise(
    x: np.ndarray, snr: float, rng: np.random.Generator, kind: NoiseKind = "white"
) -> np.ndarray:
    """`x` plus noise scaled so that `snr_db(x, noise)` equals `snr`. Not rescaled: the sum can
    exceed [-1, 1]; normalise afterwards."""
    noise = (white_noise if kind == "white" else babble_noise)(len(x), rng)
    gain = np.sqrt(speech_power(x) / 10 ** (snr / 10) / np.mean(noise**2))
    return (x + gain * noise).astype(np.float32)


def room_impulse_response(
    rt60_s: float, rng: np.random.Generator, sr: int = SAMPLE_RATE
) -> np.ndarray:
    """Direct path plus exponentially decaying noise that falls 60 dB in `rt60_s` (a diffuse
    tail), scaled so the tail holds as much energy as the direct sound."""
    t = np.arange(1, int(rt60_s * sr)) / sr
    tail = rng.standard_normal(t.size) * 10 ** (-3 * t / rt60_s)
    tail /= np.sqrt(np.sum(tail**2)) + 1e-12
    return np.concatenate([[1.0], tail])


def reverb(
    x: np.ndarray, rt60_s: float, rng: np.random.Generator, sr: int = SAMPLE_RATE
) -> np.ndarray:
    """Convolve with a synthetic room, keeping the whole decay: the output is longer than `x`
    by the impulse response's length (about `rt60_s`)."""
    return signal.fftconvolve(x, room_impulse_response(rt60_s, rng, sr)).astype(np.float32)


def mulaw(x: np.ndarray, mu: int = 255) -> np.ndarray:
    """G.711-style 8-bit mu-law encode/decode round trip (adds the codec's quantisation noise)."""
    x = np.clip(x, -1, 1)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    q = np.round((y + 1) / 2 * mu) / mu * 2 - 1
    return np.sign(q) * ((1 + mu) ** np.abs(q) - 1) / mu


def telephone(x: np.ndarray, use_mulaw: bool = False, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A narrowband phone line: 300-3400 Hz band-pass, 8 kHz sampling (optionally mu-law), then
    back to `sr` so the engines accept it; nothing is left above 4 kHz."""
    band = signal.butter(6, [300, 3400], btype="bandpass", fs=sr, output="sos")
    narrow = signal.resample_poly(signal.sosfilt(band, x), 8000, sr)
    if use_mulaw:
        peak = np.max(np.abs(narrow)) or 1.0
        narrow = mulaw(narrow / peak) * peak
    return signal.resample_poly(narrow, sr, 8000)[: len(x)].astype(np.float32)


def normalize_peak(x: np.ndarray, peak: float = 0.9) -> np.ndarray:
    """Scale to a fixed peak: effects change the level, and clipping would add distortion."""
    top = float(np.max(np.abs(x))) if len(x) else 0.0
    return (x * (peak / top) if top > 0 else x).astype(np.float32)
