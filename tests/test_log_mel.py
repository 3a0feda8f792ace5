"""The numpy log-mel spectrogram is transformers' WhisperFeatureExtractor's, without torch."""

from __future__ import annotations

import numpy as np
import pytest

from asrops.audio_format import SAMPLE_RATE
from asrops.engines.log_mel import LogMel


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    from transformers import WhisperFeatureExtractor

    reference = WhisperFeatureExtractor()
    model_dir = tmp_path_factory.mktemp("version")
    reference.save_pretrained(model_dir)  # the version's preprocessor_config.json
    return LogMel(model_dir), reference


def _tone_in_noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 3 * t) + rng.normal(0, 0.05, t.size)).astype(
        np.float32)


@pytest.mark.parametrize("chunks", [
    pytest.param([_tone_in_noise(3.2, 0)], id="short"),
    pytest.param([_tone_in_noise(30.0, 1)], id="a full window"),
    pytest.param([np.zeros(SAMPLE_RATE, np.float32)], id="digital silence"),
    pytest.param([np.clip(_tone_in_noise(7.5, 2) * 20, -1, 1)], id="clipped"),
    pytest.param([_tone_in_noise(1.0, 3), _tone_in_noise(12.0, 4), np.zeros(10, np.float32)], id="a batch"),
])
def test_features_match_transformers(extractors, chunks):
    ours, reference = extractors
    expected = reference(chunks, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="max_length").input_features
    got = ours(chunks)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_short_window_has_the_first_frames_of_the_30_s_features(extractors):
    """Short windows (engines/engine.py) compute features over 15-25 s only: the same frames, up
    to float32 rounding (the mel projection is one matrix product whose BLAS blocking depends on
    the row count: 297 of 320,000 values 1 ulp apart in one CI run)."""
    ours, _ = extractors
    chunks = [_tone_in_noise(4.0, 5), _tone_in_noise(9.5, 6)]
    full, short = ours(chunks), ours(chunks, 20)
    assert short.shape == (2, 80, 2000)
    np.testing.assert_allclose(short, full[:, :, :2000], rtol=1e-6, atol=1e-6)
    assert not np.allclose(short, full[:, :, 1000:3000], atol=1e-3)  # the first frames, not any 2000
