"""The decoding loop's temperature fallback and sampling, over a scripted network whose greedy
choice loops: what openai/whisper's fallback exists for, without depending on a model's mood."""

from __future__ import annotations

import numpy as np
import pytest

from asrops.engines.decoding import COMPRESSION_RATIO_THRESHOLD, SpecialTokens, compression_ratio
from asrops.engines.engine import WhisperEngine
from asrops.engines.types import DecodeOptions

LOOP_LOGIT, EOT_LOGIT = 1.0, 0.9
"""Greedy always takes the looping word; sampling at 0.2 ends the text with probability 0.38 per
token after the first word (the first is always the word), so a fallback gets a short text, never
an empty one, whatever the seed the window's features give it."""


class LoopingBackend:
    """A network that says one word forever unless sampling picks end-of-text; on a window whose
    log-mel is flat (a steady tone) it says one word and ends, and never needs a fallback."""

    def __init__(self, special: SpecialTokens, word: int, vocab: int):
        self.special, self.word, self.vocab = special, word, vocab
        self.encoded_batches: list[int] = []
        self.decoded_batches: list[int] = []
        """Rows of each `encode` call, and of each decoding (`start`): one per try."""

    def _logits(self, terse: np.ndarray, said: int) -> np.ndarray:
        logits = np.full((len(terse), self.vocab), -30.0, dtype=np.float32)
        logits[:, self.word] = LOOP_LOGIT
        logits[:, self.special.eot] = EOT_LOGIT if said else -30.0
        if said:
            logits[terse, self.special.eot] = 30.0
        return logits

    def encode(self, mel):
        self.encoded_batches.append(len(mel))
        return mel.std(axis=(1, 2)) < FLAT_MEL_STD

    def start(self, encoded, tokens):
        self.decoded_batches.append(len(tokens))
        logits = self._logits(encoded, said=0)
        return np.repeat(logits[:, None], tokens.shape[1], axis=1), (encoded, 1)

    def step(self, tokens, cache):
        terse, said = cache
        return self._logits(terse, said), (terse, said + 1)

    def reorder(self, cache, index):
        return cache[0][index], cache[1]


FLAT_MEL_STD = 0.3
"""Whisper's log-mel of 3 s of a steady tone padded to 30 s varies far less than of 3 s of noise."""


@pytest.fixture(scope="module")
def looping(stable_dir):
    from tokenizers import Tokenizer

    special = SpecialTokens.from_tokenizer_file(stable_dir / "tokenizer.json")
    word = Tokenizer.from_file(str(stable_dir / "tokenizer.json")).encode(" hello", add_special_tokens=False).ids[0]
    backend = LoopingBackend(special, word=word, vocab=special.timestamp_begin + 1501)
    return WhisperEngine("looping", backend, stable_dir, suppress_tokens=[], begin_suppress_tokens=[], special=special)


def _speech(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(16_000 * 3).astype(np.float32) * 0.1


def _tone() -> np.ndarray:
    return (0.1 * np.sin(2 * np.pi * 440 * np.arange(16_000 * 3) / 16_000)).astype(np.float32)


def test_a_looping_window_is_decoded_again_at_rising_temperatures(looping):
    options = DecodeOptions(timestamps=False, max_new_tokens=60)
    kept = looping.transcribe([_speech(0)], options.model_copy(update={"temperature_increment": None}))[0]
    assert compression_ratio(kept.text) > COMPRESSION_RATIO_THRESHOLD, "the scripted network must loop greedily"
    assert [s.temperature for s in kept.segments] == [0.0]

    fixed = looping.transcribe([_speech(0)], options)[0]
    assert compression_ratio(fixed.text) <= COMPRESSION_RATIO_THRESHOLD
    assert len(fixed.text.split()) < len(kept.text.split())
    assert fixed.segments[0].temperature > 0.0  # what the segment reports (verbose_json's temperature)


def test_fallback_re_decodes_only_the_windows_that_need_it(looping):
    """A batch of a looping window and one that is fine: only the looping one is decoded again,
    and the other keeps its first decoding (the backend's decoding calls show each try's windows);
    the windows are encoded once, whatever the number of tries."""
    options = DecodeOptions(timestamps=False, max_new_tokens=60)
    looping.backend.encoded_batches.clear()
    looping.backend.decoded_batches.clear()
    noisy, tone = looping.transcribe([_speech(1), _tone()], options)
    assert looping.backend.decoded_batches[0] == 2
    assert looping.backend.decoded_batches[1:] and set(looping.backend.decoded_batches[1:]) == {1}
    assert looping.backend.encoded_batches == [2]
    assert tone.text == "hello" and [s.temperature for s in tone.segments] == [0.0]
    assert noisy.segments[0].temperature > 0.0


def test_sampling_is_seeded_by_the_window_not_by_its_batch(looping):
    """The same audio gets the same sampled text alone or beside other audio: one request's
    answer never depends on who else was batched with it."""
    options = DecodeOptions(timestamps=False, max_new_tokens=60, temperature=0.6, temperature_increment=None)
    alone = looping.transcribe([_speech(3)], options)[0].text
    beside = looping.transcribe([_speech(4), _speech(3), _speech(5)], options)[1].text
    assert alone == beside
    others = {looping.transcribe([_speech(s)], options)[0].text for s in range(6, 12)}
    assert len(others) > 1, "sampling at 0.6 must vary with the audio"


TOY = SpecialTokens(eot=10, sot=11, sot_prev=12, no_speech=13, no_timestamps=14, timestamp_begin=15)
"""A vocabulary of 15 text tokens and 40 timestamps, enough for the rules' arithmetic."""


def test_logsumexp_matches_scipy_and_takes_rows_that_are_all_minus_infinity():
    from scipy.special import logsumexp

    from asrops.engines.decoding import _logsumexp

    logits = np.random.default_rng(0).normal(0, 8, (4, 55)).astype(np.float32)
    logits[1, ::2] = -np.inf
    logits[3] = -np.inf
    with np.errstate(all="raise"):  # no warning either
        got = _logsumexp(logits.copy())
    np.testing.assert_allclose(got[:3], logsumexp(logits[:3].astype(np.float64), axis=-1), rtol=1e-5)
    assert got[3] == -np.inf


def test_timestamps_win_where_openai_whispers_log_probabilities_say_they_do():
    """openai/whisper compares the timestamps' summed log-probability with the best text token's
    after a softmax over the whole vocabulary; the rule compares logits. Rows of every kind of
    outcome: the text suppressed where the timestamps' mass wins, left where it does not."""
    from scipy.special import log_softmax, logsumexp

    from asrops.engines.decoding import LogitRules

    rng = np.random.default_rng(1)
    rows = 64
    logits = rng.normal(0, 1, (rows, 55)).astype(np.float32)
    logits[:, TOY.timestamp_begin :] += np.linspace(-8, 2, rows, dtype=np.float32)[:, None]
    tokens = np.tile([TOY.sot, TOY.no_timestamps, 5], (rows, 1))  # one text token sampled so far
    rules = LogitRules(TOY, np.array([], dtype=np.int64), np.array([], dtype=np.int64), sample_begin=2, timestamps=True)

    expected = logits.astype(np.float64)
    expected[:, TOY.no_timestamps] = -np.inf
    logprobs = log_softmax(expected, axis=-1)
    timestamps_win = logsumexp(logprobs[:, TOY.timestamp_begin :], axis=-1) > logprobs[:, : TOY.timestamp_begin].max(-1)
    expected[timestamps_win, : TOY.timestamp_begin] = -np.inf

    rules.apply(logits, tokens)
    assert 0 < timestamps_win.sum() < rows
    np.testing.assert_array_equal(np.isneginf(logits), np.isneginf(expected))
