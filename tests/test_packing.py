"""Window packing's plan and cut (engines/packing.py) on token sequences written by hand: which
clips share a window, and when a decoded window may be cut back into each clip's answer."""

from __future__ import annotations

import numpy as np
import pytest

from asrops.audio_format import SAMPLE_RATE
from asrops.engines import packing
from asrops.engines.decoding import DecodedWindow, SpecialTokens

SPECIAL = SpecialTokens(eot=100, sot=101, sot_prev=102, no_speech=103, no_timestamps=104, timestamp_begin=105)


def ts(seconds: float) -> int:
    return SPECIAL.timestamp_begin + round(seconds / 0.02)


def seconds(*lengths: float) -> list[np.ndarray]:
    return [np.full(round(n * SAMPLE_RATE), 0.1, dtype=np.float32) for n in lengths]


def window(tokens: list[int]) -> DecodedWindow:
    return DecodedWindow(tokens=tokens, sum_logprob=-0.1 * len(tokens), no_speech_prob=0.01,
                         token_logprobs=[-0.1] * len(tokens))


def test_plan_fills_windows_and_leaves_long_lonely_and_unpackable_clips_out():
    lengths = [round(s * SAMPLE_RATE) for s in (6, 6, 6, 6, 6, 20, 3)]
    bins = packing.plan(lengths, [True] * 6 + [False])
    packed = sorted(i for b in bins for i in b)
    assert 5 not in packed, "a 20-s clip is longer than MAX_CLIP_S"
    assert 6 not in packed, "a clip marked unpackable (silent) stays out"
    assert all(len(b) >= 2 for b in bins)
    for b in bins:  # each bin's audio and gaps fit one window
        assert sum(lengths[i] for i in b) + (len(b) - 1) * packing.GAP_S * SAMPLE_RATE <= packing.WINDOW_S * SAMPLE_RATE
    assert len(packed) == 4 and bins == [packed], "four 6-s clips fill a window; the fifth, alone, is not packed"
    assert packing.plan([round(5 * SAMPLE_RATE)], [True]) == [], "one clip alone is not packed"


def test_pack_lays_clips_end_to_end_with_silence_between():
    audios = seconds(2.0, 3.0)
    packed = packing.pack([0, 1], audios)
    assert packed.spans == ((0.0, 2.0), (3.0, 6.0))
    assert len(packed.audio) == 6 * SAMPLE_RATE
    assert not packed.audio[2 * SAMPLE_RATE : 3 * SAMPLE_RATE].any()
    assert packed.regions()[0] == (0.0, 2.5) and packed.regions()[1][0] == 2.5


def test_split_gives_each_clip_its_own_segments_in_its_own_time():
    packed = packing.pack([0, 1], seconds(2.0, 3.0))
    tokens = [ts(0.0), 10, 11, ts(1.9), ts(3.1), 12, ts(4.0), ts(4.0), 13, ts(5.8)]
    pieces = packing.split(window(tokens), packed, SPECIAL)
    assert pieces is not None
    first, second = pieces
    assert [p.positions for p in first] == [[1, 2]]
    assert [p.positions for p in second] == [[5], [8]]
    assert (first[0].start, first[0].end) == (0.0, pytest.approx(1.9))
    assert second[0].start == pytest.approx(0.1) and second[-1].end == pytest.approx(2.8)
    assert first[0].stamps == [0, 3]


@pytest.mark.parametrize("tokens, why", [
    ([ts(0.0), 10, 11, ts(3.4), ts(3.4), 12, ts(5.8)], "a segment runs 0.4 s into the second clip"),
    ([ts(0.0), 10, ts(1.9), ts(2.2), 11, ts(2.4), ts(3.1), 12, ts(5.8)], "a segment starts in the gap after a clip"),
    ([ts(0.0), 10, 11, ts(1.9), ts(2.0), 12, ts(2.4)], "the second clip got no segment"),
    ([ts(0.0), 10, ts(1.0), ts(1.2), 11], "the window ended mid-segment before the second clip"),
    ([ts(0.0), 10, ts(0.5), ts(3.1), 12, ts(5.8)], "the first clip's text stops 1.5 s before its speech does"),
])
def test_split_refuses_a_window_it_cannot_cut_cleanly(tokens, why):
    packed = packing.pack([0, 1], seconds(2.0, 3.0))
    assert packing.split(window(tokens), packed, SPECIAL) is None, why


def test_a_segment_may_end_in_the_next_clips_leading_silence_only():
    """Whisper hears no pause in the gap and often ends a segment where the next one starts; past
    the next clip's start that is allowed while that clip is still silent there."""
    first_clip, second_clip = seconds(2.0, 3.0)
    second_clip[: SAMPLE_RATE // 2] = 0.0  # the second clip opens with half a second of silence
    packed = packing.pack([0, 1], [first_clip, second_clip])
    tokens = [ts(0.0), 10, ts(3.4), ts(3.4), 12, ts(5.8)]
    first, second = packing.split(window(tokens), packed, SPECIAL)
    assert first[0].end == 2.0, "cut back to the clip's own length"
    assert [p.positions for p in second] == [[4]]
    tokens = [ts(0.0), 10, ts(3.7), ts(3.7), 12, ts(5.8)]
    assert packing.split(window(tokens), packed, SPECIAL) is None, "0.2 s into its speech"


def test_a_clips_average_logprob_counts_its_own_tokens_only():
    packed = packing.pack([0, 1], seconds(2.0, 3.0))
    tokens = [ts(0.0), 10, ts(1.9), ts(3.1), 12, 13, ts(5.8)]
    w = DecodedWindow(tokens=tokens, sum_logprob=-3.0, no_speech_prob=0.0,
                      token_logprobs=[-0.5, -0.5, -0.5, -0.1, -0.1, -0.1, -0.1])
    first, second = packing.split(w, packed, SPECIAL)
    assert packing.clip_avg_logprob(w, first) == pytest.approx(-1.5 / 4)
    assert packing.clip_avg_logprob(w, second) == pytest.approx(-0.4 / 5)


def test_the_engine_benchmark_names_packed_and_batched_runs():
    from asrops.benchmarks.engine_worker import parse_engine

    assert parse_engine("onnx-int8") == ("onnx-int8", "", 1)
    assert parse_engine("onnx-int8@8") == ("onnx-int8", "", 8)
    assert parse_engine("onnx-int8+pack@8") == ("onnx-int8", "pack", 8)
    assert parse_engine("onnx+full") == ("onnx", "full", 1)
    for bad in ("onnx-int8+packed", "onnx-int8@0", "onnx-int8@x", "fw-int8+pack"):
        with pytest.raises(ValueError):
            parse_engine(bad)
