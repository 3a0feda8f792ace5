"""The one audio format inside asrops: mono float32 in [-1, 1] at Whisper's 16 kHz. Uploads are
decoded into it (audio.py); features, engines, training and synthesis all assume it. Between
processes (ingress to model replica) it travels as 16-bit PCM."""

import numpy as np

SAMPLE_RATE = 16_000
"""Samples per second of every array of audio past the decoder."""
LONGEST_AUDIO_S = 2 * 3600.0
"""The most that `AudioSettings.max_duration_s` may allow: what a message between processes
(asrops/raycluster.py, Serve's gRPC hop to a model replica) is sized to carry as 16-bit PCM."""


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as 16-bit PCM: half the bytes, and what Whisper's own loader
    (`ffmpeg -f s16le`) feeds the model; a 16-bit source comes back exactly."""
    return np.clip(np.round(np.asarray(samples, dtype=np.float32) * 32768.0), -32768, 32767).astype(np.int16)


def from_pcm16(pcm: np.ndarray) -> np.ndarray:
    """16-bit PCM as float32 samples in [-1, 1)."""
    return pcm.astype(np.float32) / np.float32(32768.0)
