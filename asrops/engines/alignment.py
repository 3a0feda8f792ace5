"""Word timestamps: dynamic time warping over the alignment heads' cross-attention, as
openai/whisper's `timing.py` does it.

Every engine decodes the text; this is a separate alignment pass over the same version's torch
weights (the ONNX decoders do not output attention): one teacher-forced decoder pass over each
window's text tokens gives the cross-attention of the heads the model card names as aligned with
time (`alignment_heads` in generation_config.json). The attention is normalised per head,
median-filtered along time, averaged, and the cheapest monotonic path through it (DTW) says at
which audio frame each token starts. Each word is then shrunk to the sound inside it (the path
tends to start a word where the previous one ended, pause included). Only requests that ask for
word timestamps pay for the pass; the torch model is loaded on the first such request.
"""

from __future__ import annotations

import json
import logging
import math
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asrops.audio_format import SAMPLE_RATE
from asrops.engines.decoding import SpecialTokens
from asrops.engines.types import Segment, Word

log = logging.getLogger(__name__)

FRAMES_PER_S = 50
"""Encoder frames per second of audio (1500 per 30-s window)."""
MEDIAN_FILTER_WIDTH = 7
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END = ".。!！?？"


@dataclass
class _Timing:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through `cost` [tokens, frames] from (0, 0) to the far corner,
    moving right, down or diagonally → (token index, frame index) per step. Row by row, each row
    in closed form: c[j] = x[j] + min(a[j], c[j-1]) with a[j] = min(c'[j-1], c'[j]) from the row
    above, which is S[j] + cummin(a[k] - S[k-1]) over the row's prefix sums S."""
    rows, cols = cost.shape
    acc = np.full((rows + 1, cols + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, rows + 1):
        above = np.minimum(acc[i - 1, :-1], acc[i - 1, 1:])  # a[j] for j = 1..cols
        prefix = np.concatenate([[0.0], np.cumsum(cost[i - 1])])  # S[0..cols]
        acc[i, 1:] = prefix[1:] + np.minimum.accumulate(above - prefix[:-1])
    i, j, path = rows, cols, []
    while i > 0 and j > 0:  # back from the far corner: diagonal, up or left, cheapest first
        path.append((i - 1, j - 1))
        moves = ((acc[i - 1, j - 1], 0), (acc[i - 1, j], 1), (acc[i, j - 1], 2))
        move = min(moves)[1]
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    path.reverse()
    steps = np.asarray(path)
    return steps[:, 0], steps[:, 1]


def _median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window along the last axis (reflect-padded, as openai/whisper)."""
    if x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1), axis=-1)


class WordAligner:
    """Word timings for decoded windows, from one version's torch weights (loaded lazily)."""

    def __init__(self, model_dir: Path, special: SpecialTokens, decode: Callable[[list[int]], str]):
        """`decode`: the engine's text decoding of token ids (words are split on what it makes of them)."""
        self.model_dir, self.special, self._decode = model_dir, special, decode
        heads = json.loads((model_dir / "generation_config.json").read_text()).get("alignment_heads")
        if not heads:
            raise ValueError(f"{model_dir}'s generation_config.json names no alignment_heads: no word timestamps")
        self.heads = [tuple(h) for h in heads]
        self._model, self._lock = None, threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                from transformers import WhisperForConditionalGeneration

                log.info("loading %s's torch weights for word alignment", self.model_dir.name)
                self._model = WhisperForConditionalGeneration.from_pretrained(
                    self.model_dir, attn_implementation="eager").eval()
        return self._model

    def align(self, mel: np.ndarray, windows: list[list[Segment]], offsets_s: list[float],
              audio: list[np.ndarray]) -> None:
        """Set `words` on each window's segments: `mel` [B, n_mels, 3000] holds the windows, each
        starting at `offsets_s[b]` in its audio, whose samples in the window are `audio[b]`."""
        todo = [b for b, segments in enumerate(windows) if any(s.tokens for s in segments)]
        if not todo:
            return
        sp = self.special
        tokens = [[sp.sot, sp.no_timestamps, *[t for s in windows[b] for t in s.tokens], sp.eot] for b in todo]
        width = max(len(t) for t in tokens)
        weights = self._attention([mel[b] for b in todo], [t + [sp.eot] * (width - len(t)) for t in tokens])
        for k, b in enumerate(todo):
            n = len(tokens[k])
            text = tokens[k][2:-1]
            probs = [p for s in windows[b] for p in (s.token_probs or [math.nan] * len(s.tokens))]
            frames = max(1, min(round(len(audio[b]) / SAMPLE_RATE * FRAMES_PER_S), weights.shape[-1]))
            timings = self._timings(weights[k][:, :n, :frames], np.asarray(probs), text)
            _fit_to_sound(timings, sounding_frames(audio[b]))
            _assign(windows[b], timings, offsets_s[b])

    def _attention(self, mels: list[np.ndarray], tokens: list[list[int]]) -> np.ndarray:
        """The alignment heads' cross-attention [B, heads, T, 1500] over the teacher-forced tokens."""
        import torch

        model = self._load()
        with torch.inference_mode():
            out = model(input_features=torch.from_numpy(np.stack(mels)), decoder_input_ids=torch.tensor(tokens),
                        output_attentions=True)
            cross = torch.stack([out.cross_attentions[layer][:, head] for layer, head in self.heads], dim=1)
        return cross.float().numpy()

    def _timings(self, weights: np.ndarray, token_probs: np.ndarray, text: list[int]) -> list[_Timing]:
        """openai/whisper's find_alignment on one window: [heads, tokens, frames] attention of the
        sequence <|sot|><|notimestamps|> text <|endoftext|>; a word's probability is its tokens'
        mean probability when they were decoded."""
        weights = weights / weights.sum(-1, keepdims=True)  # attention within the audio's frames only
        weights = (weights - weights.mean(-2, keepdims=True)) / (weights.std(-2, keepdims=True) + 1e-10)
        matrix = _median_filter(weights, MEDIAN_FILTER_WIDTH).mean(0)[1:-1]  # rows: text tokens + EOT
        token_index, frame_index = dtw(-matrix)
        words, word_tokens = split_words(text + [self.special.eot], self._decode, self.special.eot)
        if len(word_tokens) <= 1:
            return []
        boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
        jumps = np.pad(np.diff(token_index), (1, 0), constant_values=1).astype(bool)
        jump_times = frame_index[jumps] / FRAMES_PER_S
        starts, ends = jump_times[boundaries[:-1]], jump_times[boundaries[1:]]
        return [_Timing(w, t, float(s), float(e), float(np.mean(token_probs[i:j])))
                for w, t, s, e, i, j in zip(words, word_tokens, starts, ends, boundaries[:-1], boundaries[1:])]


def split_words(tokens: list[int], decode: Callable[[list[int]], str], eot: int) -> tuple[list[str], list[list[int]]]:
    """Tokens grouped into words: a word starts at a token that begins with a space, at
    punctuation, or at a special token (openai/whisper's split for space-separated languages).
    Tokens that end mid-character are held until the character is whole."""
    pieces, piece_tokens, pending = [], [], []
    for token in tokens:
        pending.append(token)
        text = "<|endoftext|>" if token >= eot else decode(pending)
        if "\ufffd" in text and token < eot:
            continue
        pieces.append(text)
        piece_tokens.append(pending)
        pending = []
    words, word_tokens = [], []
    for piece, toks in zip(pieces, piece_tokens, strict=True):
        starts_word = toks[0] >= eot or piece.startswith(" ") or piece.strip() in string.punctuation
        if starts_word or not words:
            words.append(piece)
            word_tokens.append(list(toks))
        else:
            words[-1] += piece
            word_tokens[-1].extend(toks)
    return words, word_tokens


def word_probabilities(tokens: list[int], token_probs: list[float], decode: Callable[[list[int]], str],
                       eot: int) -> list[float]:
    """The mean token probability of each word of `tokens`, punctuation left out."""
    probability = dict(zip(range(len(tokens)), token_probs, strict=True))
    words, word_tokens = split_words(tokens, decode, eot)
    out, at = [], 0
    for word, toks in zip(words, word_tokens, strict=True):
        if word.strip() and word.strip() not in string.punctuation:
            out.append(float(np.mean([probability[k] for k in range(at, at + len(toks))])))
        at += len(toks)
    return out


def sounding_frames(samples: np.ndarray) -> np.ndarray:
    """Per 10-ms frame: whether it sounds, i.e. is at least 6 dB (or 15 % of the way to the loud
    frames) above the window's quiet floor."""
    frame = SAMPLE_RATE // 100
    frames = samples[: len(samples) // frame * frame].reshape(-1, frame)
    if not len(frames):
        return np.zeros(0, dtype=bool)
    level = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    floor, loud = np.percentile(level, 10), np.percentile(level, 99)
    return level > floor + max(6.0, 0.15 * (loud - floor))


def _fit_to_sound(timings: list[_Timing], sounding: np.ndarray) -> None:
    """Shrink each word to the sound inside it: the attention path often starts a word where the
    previous one ended, taking the pause between them (on words with known boundaries this halved
    the start errors). A word with no sound inside it is left as it is; none is ever widened."""
    for t in timings:
        first, last = int(t.start * 100), int(np.ceil(t.end * 100))
        inside = np.flatnonzero(sounding[first:last])
        if len(inside):
            t.start, t.end = (first + inside[0]) / 100, (first + inside[-1] + 1) / 100


def _merge_punctuation(timings: list[_Timing]) -> None:
    """Opening punctuation joins the next word, closing punctuation the previous one (in place:
    the absorbed entry keeps no word and no tokens), as openai/whisper's merge_punctuations."""
    j = len(timings) - 1
    for i in range(len(timings) - 2, -1, -1):
        previous, following = timings[i], timings[j]
        if previous.word.startswith(" ") and previous.word.strip() and previous.word.strip() in PREPEND_PUNCTUATION:
            following.word, following.tokens = previous.word + following.word, previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
    i = 0
    for j in range(1, len(timings)):
        previous, following = timings[i], timings[j]
        if not previous.word.endswith(" ") and following.word and following.word in APPEND_PUNCTUATION:
            previous.word, previous.tokens = previous.word + following.word, previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j


def _assign(segments: list[Segment], timings: list[_Timing], offset_s: float) -> None:
    """The window's word timings, in seconds of the audio, given to the segments they belong to
    (by token counts), with openai/whisper's clamps on words that swallowed a pause."""
    durations = np.array([t.end - t.start for t in timings])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = 2 * median
    for i in range(1, len(timings)):  # a pause swallowed by a word next to a sentence's end
        t = timings[i]
        if t.end - t.start > longest:
            if t.word in SENTENCE_END:
                t.end = t.start + longest
            elif timings[i - 1].word in SENTENCE_END:
                t.start = t.end - longest
    _merge_punctuation(timings)
    index = 0
    for segment in segments:
        words, taken = [], 0
        while index < len(timings) and taken < len(segment.tokens):
            t = timings[index]
            if t.word.strip():
                words.append(Word(word=t.word.strip(), start=round(offset_s + t.start, 3),
                                  end=round(offset_s + t.end, 3), probability=round(t.probability, 4)))
            taken += len(t.tokens)
            index += 1
        if words and words[0].end - words[0].start > longest > 0:  # a first word that starts too early
            words[0].start = round(max(words[0].start, words[0].end - longest), 3)
        segment.words = words
