"""What a request's audio and transcript looked like, as numbers drift detection can compare.

Plain functions over 16 kHz mono float32 samples and a `Transcription`; the production log
(serve), the drift reference (monitoring) and the retraining data checks all use these, so a
feature means the same thing everywhere.
"""

from __future__ import annotations

import re

import numpy as np
from pydantic import BaseModel

from asrops.audio_format import SAMPLE_RATE
from asrops.engines.types import Transcription
from asrops.textnorm import normalize_english

FRAME = 400  # 25 ms frames at 16 kHz
CLIP_LEVEL = 0.999  # |sample| at or above this counts as clipped
SILENCE_DBFS = -45.0  # a frame quieter than this is silence
MAX_ANALYSED_S = 60  # long audio: features from its first minute (bounded cost per request)
_EPS = 1e-10


class AudioFeatures(BaseModel):
    duration_s: float
    original_sample_rate: int
    original_channels: int
    rms_dbfs: float
    """Loudness of the whole clip, dB relative to full scale."""
    peak: float
    """Largest absolute sample, 0..1."""
    clipping_ratio: float
    """Share of samples at full scale."""
    snr_db: float
    """Estimated signal-to-noise ratio: loud frames (90th percentile energy) against quiet ones (10th)."""
    silence_ratio: float
    """Share of 25-ms frames below -45 dBFS."""
    spectral_centroid_hz: float
    """Energy-weighted mean frequency: falls with telephone band-limiting, rises with hiss."""


class TranscriptFeatures(BaseModel):
    words: int
    characters: int
    words_per_s: float
    avg_logprob: float | None
    """Mean of the segments' avg_logprob (Whisper doubts a segment below -1)."""
    no_speech_prob: float | None
    compression_ratio: float | None
    """Largest segment gzip ratio (above 2.4 is repetitive, likely hallucinated)."""
    oov_share: float | None
    """Share of words outside the stable model's reference vocabulary; None with no vocabulary."""
    low_confidence_word_share: float | None = None
    """Share of words the model decoded with a mean token probability under 0.5: unfamiliar speech
    raises it before any label says so. None when there are no words or no probabilities."""


def _frame_energies(x: np.ndarray) -> np.ndarray:
    n = len(x) // FRAME
    if n == 0:
        return np.array([float(np.mean(x**2))]) if len(x) else np.array([0.0])
    frames = x[: n * FRAME].reshape(n, FRAME).astype(np.float64)
    return np.mean(frames**2, axis=1)


def _db(power: float) -> float:
    return float(10 * np.log10(power + _EPS))


def spectral_centroid(x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    n = len(x) // 512
    if n == 0:
        return 0.0
    frames = x[: n * 512].reshape(n, 512) * np.hanning(512)
    magnitude = np.abs(np.fft.rfft(frames, axis=1)).sum(axis=0)
    freqs = np.fft.rfftfreq(512, 1 / sample_rate)
    return float((magnitude * freqs).sum() / (magnitude.sum() + _EPS))


def audio_features(samples: np.ndarray, original_sample_rate: int, original_channels: int) -> AudioFeatures:
    x = samples[: MAX_ANALYSED_S * SAMPLE_RATE]
    energies = _frame_energies(x)
    quiet, loud = np.percentile(energies, 10), np.percentile(energies, 90)
    return AudioFeatures(
        duration_s=len(samples) / SAMPLE_RATE,
        original_sample_rate=original_sample_rate,
        original_channels=original_channels,
        rms_dbfs=_db(float(np.mean(x.astype(np.float64) ** 2)) if len(x) else 0.0),
        peak=float(np.max(np.abs(x))) if len(x) else 0.0,
        clipping_ratio=float(np.mean(np.abs(x) >= CLIP_LEVEL)) if len(x) else 0.0,
        snr_db=_db(loud) - _db(quiet),
        silence_ratio=float(np.mean(10 * np.log10(energies + _EPS) < SILENCE_DBFS)),
        spectral_centroid_hz=spectral_centroid(x),
    )


_WORD = re.compile(r"[a-z0-9']+")


def words_of(text: str) -> list[str]:
    """Normalised words (Whisper's English normaliser), the unit of WER and of the vocabulary."""
    return _WORD.findall(normalize_english(text))


def transcript_features(t: Transcription, vocabulary: frozenset[str] | None = None) -> TranscriptFeatures:
    words = words_of(t.text)
    segments = t.segments
    return TranscriptFeatures(
        words=len(words),
        characters=len(t.text.strip()),
        words_per_s=len(words) / t.duration_s if t.duration_s > 0 else 0.0,
        avg_logprob=float(np.mean([s.avg_logprob for s in segments])) if segments else None,
        no_speech_prob=float(np.mean([s.no_speech_prob for s in segments])) if segments else None,
        compression_ratio=max(s.compression_ratio for s in segments) if segments else None,
        oov_share=(sum(w not in vocabulary for w in words) / len(words)) if vocabulary and words else None,
        low_confidence_word_share=low_confidence_share(t),
    )


LOW_CONFIDENCE = 0.5
"""A word decoded with a mean token probability below this counts as low-confidence."""


def low_confidence_share(t: Transcription) -> float | None:
    probabilities = [p for s in t.segments for p in (s.word_probs or [])]
    if not probabilities or any(s.word_probs is None for s in t.segments):
        return None
    return sum(p < LOW_CONFIDENCE for p in probabilities) / len(probabilities)


def vocabulary_of(texts: list[str]) -> frozenset[str]:
    """The reference vocabulary: every normalised word of the reference transcripts."""
    return frozenset(w for text in texts for w in words_of(text))
