"""Whisper decoding, written once for every engine.

An engine only has to run the network (`WhisperBackend`: encode, first decoder pass,
one decoder step, reorder its cache); everything Whisper-specific lives here: the initial
prompt, token suppression, timestamp rules, greedy and beam search, 30-s windows over long
audio, and the quality signals (avg_logprob, no_speech_prob, compression_ratio).
It follows openai/whisper's `decoding.py` and `transcribe.py`, minus conditioning on
previous text, so that every window of every request in a batch starts from the same
tokens and can be decoded in one batch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from asrops.audio_format import SAMPLE_RATE
from asrops.engines.types import DecodeOptions

CHUNK_S = 30
N_SAMPLES = CHUNK_S * SAMPLE_RATE  # 480,000 samples in a 30-s window
TIME_PRECISION = 0.02  # seconds per timestamp token (2 mel frames)
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4
"""openai/whisper's defaults: a window is silence when its no-speech probability is above 0.6 and
its average log-probability below -1.0; it needs a temperature fallback when its text's gzip
compression ratio is above 2.4 (it loops) or its average log-probability is below -1.0."""


@dataclass(frozen=True)
class SpecialTokens:
    """Whisper's special token ids, looked up by name in the model's own tokenizer (the one home
    of these ids: decoding, the checkpoint import and training all take them from here)."""

    eot: int
    sot: int
    sot_prev: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int
    """`<|0.00|>`; one token per TIME_PRECISION seconds up to `<|30.00|>`."""

    @classmethod
    def from_tokenizer_file(cls, tokenizer_json: Path) -> SpecialTokens:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_json))

        def id_of(*names: str) -> int:
            for name in names:
                if (token := tokenizer.token_to_id(name)) is not None:
                    return token
            raise ValueError(f"{tokenizer_json} has no {' or '.join(names)} token: not a Whisper tokenizer")

        no_timestamps = id_of("<|notimestamps|>")
        return cls(
            eot=id_of("<|endoftext|>"),
            sot=id_of("<|startoftranscript|>"),
            sot_prev=id_of("<|startofprev|>"),
            no_speech=id_of("<|nospeech|>", "<|nocaptions|>"),  # older vocabularies name it nocaptions
            no_timestamps=no_timestamps,
            # Timestamps follow <|notimestamps|> (faster-whisper's rule too): tokenizers converted
            # from CTranslate2 do not list them by name.
            timestamp_begin=no_timestamps + 1,
        )


class WhisperBackend(Protocol):
    """The network, and nothing else. Arrays are numpy; `cache` is the backend's own."""

    def encode(self, mel: np.ndarray) -> Any:
        """[B, n_mels, frames] float32 log-mel → encoder output (opaque): 3,000 frames, or fewer
        where the encoder takes short windows (engines/engine.py)."""

    def start(self, encoded: Any, tokens: np.ndarray) -> tuple[np.ndarray, Any]:
        """First decoder pass over [B, T] int64 tokens → (logits [B, T, V] float32, cache)."""

    def step(self, tokens: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """One decoder step on [B, 1] tokens → (logits [B, V] float32, cache)."""

    def reorder(self, cache: Any, index: np.ndarray) -> Any:
        """Keep/duplicate cache rows by `index` (beam search, dropping finished rows)."""


@dataclass
class DecodedWindow:
    tokens: list[int]  # sampled tokens, without the initial prompt and without EOT
    sum_logprob: float
    no_speech_prob: float
    temperature: float = 0.0
    token_logprobs: list[float] = field(default_factory=list)
    """Log-probability of each of `tokens` where it was chosen (the model's confidence in it)."""

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)  # +1 counts EOT, as openai/whisper

    @property
    def is_silence(self) -> bool:
        return self.no_speech_prob > NO_SPEECH_THRESHOLD and self.avg_logprob < LOGPROB_THRESHOLD


def needs_fallback(window: DecodedWindow, text: str) -> bool:
    """Whether a window's decoding is doubtful enough to decode it again at a higher temperature
    (openai/whisper's rule): its text loops or is improbable, and it is not silence."""
    doubtful = compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD or window.avg_logprob < LOGPROB_THRESHOLD
    return doubtful and not window.is_silence


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) for each row of `logits` [N, V]: [N]; a row all -inf gives -inf.
    One pass of exp over the row; the decoding loop needs it once a step over the whole vocabulary."""
    peak = logits.max(axis=-1)
    peak[~np.isfinite(peak)] = 0.0  # a row all -inf: exp gives 0 and its log -inf
    shifted = logits - peak[:, None]
    with np.errstate(divide="ignore"):
        return peak + np.log(np.exp(shifted, out=shifted).sum(axis=-1))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - _logsumexp(logits)[:, None]


@dataclass
class LogitRules:
    """Token suppression and openai/whisper's timestamp rules, applied in place."""

    special: SpecialTokens
    suppress: np.ndarray
    begin_suppress: np.ndarray
    sample_begin: int
    timestamps: bool
    max_initial_timestamp_index: int = 50

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        """`logits` [N, V], `tokens` [N, T]: the sequences so far, prompt included."""
        sp = self.special
        logits[:, self.suppress] = -np.inf
        if tokens.shape[1] == self.sample_begin:
            logits[:, self.begin_suppress] = -np.inf
        if not self.timestamps:
            logits[:, sp.timestamp_begin :] = -np.inf
            return
        logits[:, sp.no_timestamps] = -np.inf
        for row in range(tokens.shape[0]):
            sampled = tokens[row, self.sample_begin :]
            last_ts = len(sampled) >= 1 and sampled[-1] >= sp.timestamp_begin
            penultimate_ts = len(sampled) < 2 or sampled[-2] >= sp.timestamp_begin
            if last_ts:
                if penultimate_ts:  # a pair just closed: text must follow
                    logits[row, sp.timestamp_begin :] = -np.inf
                else:  # a lone timestamp: another timestamp or EOT must follow
                    logits[row, : sp.eot] = -np.inf
            seen = sampled[sampled >= sp.timestamp_begin]
            if len(seen):
                floor = seen[-1] if (last_ts and not penultimate_ts) else seen[-1] + 1
                logits[row, sp.timestamp_begin : floor] = -np.inf  # time never goes back
        if tokens.shape[1] == self.sample_begin:
            logits[:, : sp.timestamp_begin] = -np.inf
            logits[:, sp.timestamp_begin + self.max_initial_timestamp_index + 1 :] = -np.inf
        # Timestamps win when their summed probability beats the likeliest text token's. Both sides
        # share the softmax's normaliser, so the logits compare as the log-probabilities would,
        # without a softmax over the whole vocabulary (at batch 8 that and a sequential
        # np.logaddexp.reduce took about 1.2 ms a step).
        ts_mass = _logsumexp(logits[:, sp.timestamp_begin :])
        best_text = logits[:, : sp.timestamp_begin].max(axis=-1)
        logits[ts_mass > best_text, : sp.timestamp_begin] = -np.inf


@dataclass
class WindowDecoder:
    """Decodes a batch of 30-s windows that share one set of initial tokens."""

    backend: WhisperBackend
    special: SpecialTokens
    suppress: np.ndarray
    begin_suppress: np.ndarray

    def initial_tokens(self, prompt_tokens: list[int], timestamps: bool) -> list[int]:
        sp = self.special
        head = [sp.sot_prev, *prompt_tokens[-223:]] if prompt_tokens else []
        return [*head, sp.sot] + ([] if timestamps else [sp.no_timestamps])

    def decode(self, mel: np.ndarray, initial: list[int], options: DecodeOptions,
               encoded: Any = None) -> list[DecodedWindow]:
        """`encoded`: `mel` already through the encoder (`backend.encode`), e.g. by an earlier try
        at another temperature: the encoding does not depend on it."""
        batch = mel.shape[0]
        sot_index = initial.index(self.special.sot)
        rules = LogitRules(self.special, self.suppress, self.begin_suppress, len(initial), options.timestamps)
        max_len = min(len(initial) + options.max_new_tokens, 448)
        if encoded is None:
            encoded = self.backend.encode(mel)
        tokens = np.tile(np.asarray(initial, dtype=np.int64), (batch, 1))
        logits, cache = self.backend.start(encoded, tokens)
        sot_logits = logits[:, sot_index].astype(np.float32)
        # one token's probability: its logit against the normaliser, not a softmax over the vocabulary
        no_speech = np.exp(sot_logits[:, self.special.no_speech] - _logsumexp(sot_logits))
        last = logits[:, -1].astype(np.float32)
        if options.beam_size > 1 and options.temperature == 0:
            results = self._beam(last, cache, tokens, rules, max_len, options.beam_size)
        else:
            results = self._greedy(last, cache, tokens, rules, max_len, options.temperature, _sampling_seeds(mel))
        return [
            DecodedWindow(toks, lp, float(ns), options.temperature, token_lps)
            for (toks, lp, token_lps), ns in zip(results, no_speech, strict=True)
        ]

    def _greedy(self, logits, cache, tokens, rules, max_len, temperature, seeds):
        eot = self.special.eot
        batch, begin = tokens.shape[0], tokens.shape[1]
        rows = np.arange(batch)  # which request each live row belongs to
        sums = np.zeros(batch)
        chosen = np.zeros((batch, 0))  # each live row's tokens' log-probabilities
        done: dict[int, tuple[list[int], float, list[float]]] = {}
        rngs = [np.random.default_rng([seed, round(temperature * 100)]) for seed in seeds] if temperature > 0 else []
        while True:
            rules.apply(logits, tokens)
            normaliser = _logsumexp(logits)  # the chosen tokens' log-probabilities, not every one
            if temperature > 0:
                probs = np.exp(_log_softmax(logits / temperature))
                nxt = np.array([rngs[request].choice(len(p), p=p) for request, p in zip(rows, probs, strict=True)])
            else:
                nxt = logits.argmax(axis=-1)
            step_lp = logits[np.arange(len(rows)), nxt] - normaliser
            sums[rows] += step_lp
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
            chosen = np.concatenate([chosen, step_lp[:, None]], axis=1)
            finished = (nxt == eot) | (tokens.shape[1] >= max_len)
            for i in np.flatnonzero(finished):
                seq = tokens[i, begin:].tolist()
                kept = [k for k, t in enumerate(seq) if t != eot]
                done[int(rows[i])] = ([seq[k] for k in kept], float(sums[rows[i]]), chosen[i, kept].tolist())
            if finished.all():
                break
            if finished.any():
                keep = np.flatnonzero(~finished)
                rows, tokens, nxt, chosen = rows[keep], tokens[keep], nxt[keep], chosen[keep]
                cache = self.backend.reorder(cache, keep)
            logits, cache = self.backend.step(nxt[:, None], cache)
            logits = logits.astype(np.float32)
        return [done[i] for i in range(batch)]

    def _beam(self, logits, cache, tokens, rules, max_len, beam):
        """Beam search per request, rows laid out request-major: row = b * beam + k."""
        eot = self.special.eot
        batch, begin = tokens.shape[0], tokens.shape[1]
        expand = np.repeat(np.arange(batch), beam)
        cache = self.backend.reorder(cache, expand)
        tokens, logits = tokens[expand], logits[expand]
        scores = np.tile(np.r_[0.0, np.full(beam - 1, -np.inf)], batch)  # only beam 0 is real at first
        chosen = np.zeros((len(tokens), 0))  # each row's tokens' log-probabilities
        finished: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in range(batch)]
        while True:
            rules.apply(logits, tokens)
            logprobs = _log_softmax(logits)
            cand = (scores[:, None] + logprobs).reshape(batch, -1)  # [B, beam*V]
            vocab = logits.shape[-1]
            new_rows, new_tokens, new_scores = [], [], []
            for b in range(batch):
                order = np.argsort(-cand[b])[: 2 * beam + 1]
                picked = 0
                for flat in order:
                    k, tok = divmod(int(flat), vocab)
                    score, row = float(cand[b, flat]), b * beam + k
                    if not np.isfinite(score):
                        break
                    if tok == eot or tokens.shape[1] + 1 >= max_len:
                        if len(finished[b]) < beam:
                            last = [] if tok == eot else [tok]
                            finished[b].append((score, tokens[row, begin:].tolist() + last,
                                                chosen[row].tolist() + [float(logprobs[row, t]) for t in last]))
                        continue
                    if picked < beam:
                        new_rows.append(row)
                        new_tokens.append(tok)
                        new_scores.append(score)
                        picked += 1
                while picked < beam:  # keep the layout: pad with a dead row
                    new_rows.append(b * beam)
                    new_tokens.append(eot)
                    new_scores.append(-np.inf)
                    picked += 1
            if all(len(f) >= beam for f in finished) or tokens.shape[1] + 1 >= max_len:
                break
            index = np.asarray(new_rows)
            cache = self.backend.reorder(cache, index)
            nxt = np.asarray(new_tokens, dtype=np.int64)
            tokens = np.concatenate([tokens[index], nxt[:, None]], axis=1)
            chosen = np.concatenate([chosen[index], logprobs[index, nxt][:, None]], axis=1)
            scores = np.asarray(new_scores)
            logits, cache = self.backend.step(nxt[:, None], cache)
            logits = logits.astype(np.float32)
        results = []
        for b in range(batch):
            if not finished[b]:  # nothing ended: take the best live beam
                row = b * beam + int(np.argmax(scores[b * beam : (b + 1) * beam]))
                finished[b].append((float(scores[row]), tokens[row, begin:].tolist(), chosen[row].tolist()))
            score, seq, lps = max(finished[b], key=lambda item: item[0] / (len(item[1]) + 1))
            kept = [k for k, t in enumerate(seq) if t != eot]
            results.append(([seq[k] for k in kept], score, [lps[k] for k in kept]))
        return results


def _sampling_seeds(mel: np.ndarray) -> list[int]:
    """One seed per window, from its own features: sampling is reproducible and independent of
    the other windows decoded beside it."""
    return [zlib.crc32(np.ascontiguousarray(window).tobytes()) for window in mel]


def split_segments(
    window: DecodedWindow, offset_s: float, window_s: float, special: SpecialTokens
) -> tuple[list[tuple[float, float, list[int]]], float]:
    """Cut a window's tokens at timestamp pairs → (segments as (start, end, positions of their
    text tokens in `window.tokens`), seconds consumed, i.e. where the next window should start
    relative to this one)."""
    ts_begin = special.timestamp_begin
    toks = window.tokens
    is_ts = [t >= ts_begin for t in toks]
    single_ending = len(toks) >= 2 and is_ts[-1] and not is_ts[-2]
    cuts = [i for i in range(1, len(toks)) if is_ts[i] and is_ts[i - 1]]
    if single_ending:
        cuts.append(len(toks))
    segments: list[tuple[float, float, list[int]]] = []
    if cuts:
        last = 0
        for cut in cuts:
            piece = toks[last:cut]
            stamps = [t for t in piece if t >= ts_begin]
            if len(stamps) >= 1 and any(t < ts_begin for t in piece):
                start = (stamps[0] - ts_begin) * TIME_PRECISION
                end = (stamps[-1] - ts_begin) * TIME_PRECISION
                segments.append((offset_s + start, offset_s + end,
                                 [i for i in range(last, cut) if toks[i] < ts_begin]))
            last = cut
        if single_ending:
            consumed = window_s
        else:  # the window ends mid-segment: resume at the last complete timestamp
            consumed = (toks[cuts[-1] - 1] - ts_begin) * TIME_PRECISION
    else:
        stamps = [t for t in toks if t >= ts_begin]
        end = window_s
        if stamps and stamps[-1] != ts_begin:
            end = (stamps[-1] - ts_begin) * TIME_PRECISION
        text = [i for i, t in enumerate(toks) if t < ts_begin]
        if text:
            segments.append((offset_s, offset_s + min(end, window_s), text))
        consumed = window_s
    if consumed <= 0:  # never loop on the same window
        consumed = window_s
    return segments, consumed
