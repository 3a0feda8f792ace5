"""Whisper's log-mel spectrogram in numpy.

The same computation as transformers' `WhisperFeatureExtractor` (periodic Hann window, centred
reflect-padded STFT, Slaney mel filters, log10 clamped 8 below the window's peak, scaled to
about [-1, 1]), without importing transformers, which imports torch: about 230 MB of a
serving process's memory for one STFT. The parameters come from the version's own
`preprocessor_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from asrops.audio_format import SAMPLE_RATE


class MelConfig(BaseModel):
    """The fields of a Whisper `preprocessor_config.json` the spectrogram depends on."""

    feature_size: int = 80
    n_fft: int = 400
    hop_length: int = 160
    n_samples: int = 30 * SAMPLE_RATE
    sampling_rate: int = SAMPLE_RATE


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = 3.0 * hz / 200.0
    log_region = hz >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


def mel_filters(config: MelConfig) -> np.ndarray:
    """[n_fft/2 + 1, feature_size] triangular filters from 0 to the Nyquist frequency, each
    normalised to unit area (Slaney), as librosa and transformers make them."""
    n_freqs = config.n_fft // 2 + 1
    fft_hz = np.linspace(0, config.sampling_rate // 2, n_freqs)
    mel_edges = np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), config.feature_size + 2)
    hz_edges = _mel_to_hz(mel_edges)
    slopes = hz_edges[None, :] - fft_hz[:, None]  # [n_freqs, n_mels + 2]
    widths = np.diff(hz_edges)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (hz_edges[2:] - hz_edges[:-2]))[None, :]


class LogMel:
    """Audio chunks (16 kHz, at most 30 s each) → [batch, feature_size, 3000] float32 features,
    with the parameters of the version in `model_dir`; `seconds` shorter than 30 gives the first
    frames of the same features (the padding is silence: it never sets the peak they are clamped
    below), for an encoder that takes short windows (engines/engine.py)."""

    def __init__(self, model_dir: Path):
        raw = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
        self.config = config = MelConfig.model_validate({k: raw[k] for k in MelConfig.model_fields if k in raw})
        self.filters = mel_filters(config).astype(np.float32)
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(config.n_fft) / config.n_fft)).astype(np.float32)

    def __call__(self, chunks: list[np.ndarray], seconds: int | None = None) -> np.ndarray:
        n_samples = self.config.n_samples if seconds is None else seconds * self.config.sampling_rate
        return np.stack([self._one(np.asarray(c, dtype=np.float32), n_samples) for c in chunks])

    def _one(self, audio: np.ndarray, n_samples: int) -> np.ndarray:
        c = self.config
        padded = np.zeros(n_samples, dtype=np.float32)
        padded[: min(len(audio), n_samples)] = audio[:n_samples]
        half = c.n_fft // 2
        signal = np.pad(padded, half, mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(signal, c.n_fft)[:: c.hop_length]
        spectrum = np.fft.rfft(frames * self.window, axis=-1)
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)[:-1]  # Whisper drops the last frame
        log_spec = np.log10(np.maximum(power @ self.filters, 1e-10)).T
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32)
