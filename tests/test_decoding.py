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
