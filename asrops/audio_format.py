"""The one audio format inside asrops: mono float32 in [-1, 1] at Whisper's 16 kHz. Uploads are
decoded into it (audio.py); features, engines, training and synthesis all assume it."""

SAMPLE_RATE = 16_000
"""Samples per second of every array of audio past the decoder."""
