"""`WhisperEngine`: audio in, `Transcription`s out, for any backend.

Long audio is cut into 30-s windows; the windows of every request in a batch are decoded
together, each request moving on by as much as its own timestamps say it consumed.

Short windows: Whisper pads every window to 30 s, and its encoder's cost is mostly attention
over all 1,500 frames, so a 6-s clip paid for 30. Where the encoder takes fewer frames
(engines/onnx_graphs.py), a window is encoded over its audio plus at least SHORT_WINDOW_MARGIN_S
of the padding, rounded up to SHORT_WINDOW_STEP_S, never under SHORT_WINDOW_MIN_S (`context_s`):
the decoder still sees where the speech ends. Without that margin Whisper loops (1 s: WER 26 % on
the core set; 5 s: 7.41 % without temperature fallback, one clip looping). Measured on the 245
core clips, one at a time, int8, without fallback: WER 6.55 % with 30-s windows, 6.33 % with these
(RTFx 23.7 against 30.3 with a 5-s margin); with fallback, on the 52 other English clips (speech
styles, long form): 25.8 and 24.4 %.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from asrops.audio_format import SAMPLE_RATE
from asrops.engines import packing
from asrops.engines.alignment import WordAligner, word_probabilities
from asrops.engines.decoding import (
    CHUNK_S,
    COMPRESSION_RATIO_THRESHOLD,
    N_SAMPLES,
    DecodedWindow,
    SpecialTokens,
    WhisperBackend,
    WindowDecoder,
    compression_ratio,
    needs_fallback,
    split_segments,
)
from asrops.engines.log_mel import LogMel
from asrops.engines.types import DecodeOptions, Segment, Transcription

log = logging.getLogger(__name__)

SILENCE_PEAK = 1e-3  # -60 dBFS: a window this quiet is not decoded (Whisper hallucinates "you" on it)
SHORT_WINDOW_MARGIN_S = 10
SHORT_WINDOW_STEP_S = 5
SHORT_WINDOW_MIN_S = 15


def context_s(samples: int) -> int:
    """Seconds of window the encoder sees for a chunk of `samples` (see the module's docstring)."""
    padded = SHORT_WINDOW_STEP_S * math.ceil((samples / SAMPLE_RATE + SHORT_WINDOW_MARGIN_S) / SHORT_WINDOW_STEP_S)
    return min(CHUNK_S, max(SHORT_WINDOW_MIN_S, padded))


class HFTextTokenizer:
    """Text tokens only (ids below EOT); timestamps and specials are handled by ids."""

    def __init__(self, tokenizer_json: Path, eot: int):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._eot = eot

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i < self._eot], skip_special_tokens=True)


@dataclass
class _Progress:
    """One request's position in the windowing loop."""

    audio: np.ndarray
    seek: int = 0  # samples consumed so far
    segments: list[Segment] | None = None

    def __post_init__(self):
        self.segments = []

    @property
    def done(self) -> bool:
        return self.seek >= len(self.audio) - SAMPLE_RATE // 100  # under 10 ms left


class WhisperEngine:
    """Transcribes batches of 16-kHz mono float32 audio."""

    def __init__(
        self,
        name: str,
        backend: WhisperBackend,
        model_dir: Path,
        suppress_tokens: list[int],
        begin_suppress_tokens: list[int],
        special: SpecialTokens | None = None,
        short_windows: bool = False,
    ):
        self.name = name
        self.short_windows = short_windows
        """Whether the backend's encoder takes windows shorter than 30 s (see `context_s`)."""
        self.backend = backend
        self.model_dir = model_dir
        special = special or SpecialTokens.from_tokenizer_file(model_dir / "tokenizer.json")
        self.special = special
        self.tokenizer = HFTextTokenizer(model_dir / "tokenizer.json", special.eot)
        self.log_mel = LogMel(model_dir)
        self.decoder = WindowDecoder(
            backend,
            special,
            np.asarray(suppress_tokens, dtype=np.int64),
            np.asarray(begin_suppress_tokens, dtype=np.int64),
        )

    def transcribe(self, audios: list[np.ndarray], options: DecodeOptions | None = None,
                   on_segments: Callable[[int, list[Segment]], None] | None = None,
                   pack: bool = False,
                   on_done: Callable[[int, Transcription], None] | None = None) -> list[Transcription]:
        """`on_segments(i, segments)`, when given, is called with each window's new segments of
        audio `i` as soon as that window is decoded (what a streamed answer sends); `on_done(i,
        transcription)` once audio `i` is finished, which may be long before its batch-mates are (a
        server answers it then, rather than after another clip's temperature fallback). `pack`:
        short clips share windows (packing.py) where the options allow it; what cannot be packed or
        cut back cleanly is decoded on its own."""
        options = options or DecodeOptions()
        prompt = self.tokenizer.encode(" " + options.prompt.strip()) if options.prompt else []
        initial = self.decoder.initial_tokens(prompt, options.timestamps)
        audios = [np.asarray(a, dtype=np.float32) for a in audios]
        done: dict[int, Transcription] = {}
        if pack and options.timestamps and not options.word_timestamps and options.temperature == 0:
            done = self._transcribe_packed(audios, initial, options, on_segments)
            if on_done is not None:
                for i, transcription in done.items():
                    on_done(i, transcription)
        rest = [i for i in range(len(audios)) if i not in done]
        if rest:
            def rest_segments(j: int, segments: list[Segment]) -> None:
                if on_segments is not None:
                    on_segments(rest[j], segments)

            def rest_done(j: int, transcription: Transcription) -> None:
                if on_done is not None:
                    on_done(rest[j], transcription)

            done.update(zip(rest, self._transcribe_windows([audios[i] for i in rest], initial, options,
                                                            rest_segments, rest_done), strict=True))
        return [done[i] for i in range(len(audios))]

    def _transcribe_packed(self, audios: list[np.ndarray], initial: list[int], options: DecodeOptions,
                           on_segments: Callable[[int, list[Segment]], None] | None) -> dict[int, Transcription]:
        """The clips whose packed window decoded confidently and cut cleanly (packing.split); a
        window that would need a temperature fallback is not kept: its clips go on alone."""
        audible = [bool(len(a)) and float(np.abs(a).max()) >= SILENCE_PEAK for a in audios]
        bins = packing.plan([len(a) for a in audios], audible)
        if not bins:
            return {}
        packed = [packing.pack(members, audios) for members in bins]
        windows = self.decoder.decode(self.log_mel([p.audio for p in packed]), initial, options)
        done: dict[int, Transcription] = {}
        for window, window_audio in zip(windows, packed, strict=True):
            pieces = None
            if not window.is_silence and not needs_fallback(window, self._text(window)):
                pieces = packing.split(window, window_audio, self.special)
            if pieces is None:
                log.debug("packed window of %d clips not kept; decoding them one by one", len(window_audio.members))
                continue
            kept = {i: self._packed_result(window, clip_pieces, len(audios[i]))
                    for i, clip_pieces in zip(window_audio.members, pieces, strict=True)}
            if all(t.text for t in kept.values()):  # a clip left blank: its words may sit in a neighbour's
                done.update(kept)
        if on_segments is not None:
            for i, t in done.items():
                on_segments(i, t.segments)
        return done

    def _packed_result(self, window: DecodedWindow, pieces: list[packing.ClipPiece], samples: int) -> Transcription:
        duration_s = samples / SAMPLE_RATE
        segments = self._segments(window, [(p.start, p.end, p.positions) for p in pieces],
                                  packing.clip_avg_logprob(window, pieces), 0, duration_s)
        return Transcription(text="".join(s.text for s in segments).strip(), segments=segments,
                             duration_s=duration_s)

    def _transcribe_windows(self, audios: list[np.ndarray], initial: list[int], options: DecodeOptions,
                            on_segments: Callable[[int, list[Segment]], None],
                            on_done: Callable[[int, Transcription], None]) -> list[Transcription]:
        """Each audio in 30-s windows, every audio's next window decoded in one batch; an audio's
        segments and result are handed over as soon as its windows are final."""
        states = [_Progress(a) for a in audios]
        handed_over: set[int] = set()

        def hand_over_finished() -> None:
            for i, state in enumerate(states):
                if state.done and i not in handed_over:
                    handed_over.add(i)
                    on_done(i, self._result(state))

        while live := [i for i, s in enumerate(states) if not s.done]:
            chunks = {i: states[i].audio[states[i].seek : states[i].seek + N_SAMPLES] for i in live}
            heard = [i for i in live if np.abs(chunks[i]).max() >= SILENCE_PEAK]
            for i in set(live) - set(heard):
                states[i].seek += len(chunks[i])
            hand_over_finished()
            if not heard:
                continue
            audio = [chunks[i] for i in heard]
            offsets = [states[i].seek / SAMPLE_RATE for i in heard]
            mel = self.log_mel(audio) if options.word_timestamps or not self.short_windows else None
            for group in self._decode_in_context(audio, mel, initial, options):
                new = []
                for j, window in group:
                    state = states[heard[j]]
                    before = len(state.segments)
                    self._advance(state, len(audio[j]), window)
                    new.append(state.segments[before:])
                if options.word_timestamps:
                    rows = [j for j, _ in group]
                    self.aligner.align(mel[rows], new, [offsets[j] for j in rows], [audio[j] for j in rows])
                for (j, _), segments in zip(group, new, strict=True):
                    if segments:
                        on_segments(heard[j], segments)
                hand_over_finished()
        hand_over_finished()
        return [self._result(s) for s in states]

    @cached_property
    def aligner(self) -> WordAligner:
        """Word timing for this engine's version (its torch weights load on first use)."""
        return WordAligner(self.model_dir, self.special, self.tokenizer.decode)

    def _decode_in_context(self, chunks: list[np.ndarray], mel: np.ndarray | None, initial: list[int],
                           options: DecodeOptions) -> Iterator[list[tuple[int, DecodedWindow]]]:
        """`_decode` of the chunks, each window encoded over its `context_s` (the windows of one
        context length decoded in one batch, their features computed over that length only), or all over
        30 s where the encoder needs it. `mel`: the chunks' 30-s features where the caller has
        them (required without short windows). A short window whose decoding is doubtful (it loops
        or is improbable: `needs_fallback`) is decoded again over 30 s, temperature fallback
        included: on noisy speech that loops, short windows loop at every temperature where 30-s
        windows recover (tests/test_service.py). Yields (chunk index, window) groups as they are
        final, so the windows decoded well at once need not wait for the others' retries."""
        if not self.short_windows:
            yield from self._decode(mel, initial, options)
            return
        seconds = [context_s(len(c)) for c in chunks]
        full = [i for i, s in enumerate(seconds) if s == CHUNK_S]
        for context in sorted(set(seconds) - {CHUNK_S}):
            rows = [i for i, s in enumerate(seconds) if s == context]
            decoded = self.decoder.decode(self.log_mel([chunks[i] for i in rows], context), initial, options)
            doubtful = [needs_fallback(w, self._text(w)) for w in decoded]  # no fallback over a short window
            if kept := [(i, w) for i, w, d in zip(rows, decoded, doubtful, strict=True) if not d]:
                yield kept
            full += [i for i, d in zip(rows, doubtful, strict=True) if d]
        if len(full) > seconds.count(CHUNK_S):
            log.debug("%d short windows decoded again over 30 s", len(full) - seconds.count(CHUNK_S))
        if full:
            full_mel = mel[full] if mel is not None else self.log_mel([chunks[i] for i in full])
            for group in self._decode(full_mel, initial, options):
                yield [(full[k], w) for k, w in group]

    def _decode(self, mel: np.ndarray, initial: list[int], options: DecodeOptions
                ) -> Iterator[list[tuple[int, DecodedWindow]]]:
        """The windows decoded at the request's temperature, and those that need it decoded again
        at rising temperatures (only they: the rest of the batch keeps its first decoding). A
        window that fails at every temperature keeps its best try: the most probable one that does
        not loop, else the most probable (faster-whisper's choice; openai/whisper keeps the last,
        which at 1.0 is often noise). Yields (row, window) groups as they are final: first every
        window that needs no retry, then those settled at each higher temperature."""
        encoded = self.decoder.backend.encode(mel)  # once: every temperature's try reads the same encoding
        windows = self.decoder.decode(mel, initial, options, encoded)
        step, temperature = options.temperature_increment, options.temperature
        tries: dict[int, list[DecodedWindow]] = {}
        retry = [i for i, w in enumerate(windows) if needs_fallback(w, self._text(w))] if step else []
        if first := [(i, w) for i, w in enumerate(windows) if i not in retry]:
            yield first
        while retry and temperature + step <= 1.0 + 1e-6:
            temperature = round(temperature + step, 6)
            log.debug("temperature fallback: %d of %d windows again at %.1f", len(retry), len(windows), temperature)
            again = self.decoder.decode(mel[retry], initial, options.model_copy(update={"temperature": temperature}),
                                        encoded[retry])
            for i, window in zip(retry, again, strict=True):
                tries.setdefault(i, [windows[i]]).append(window)
                windows[i] = window
            doubtful = [i for i in retry if needs_fallback(windows[i], self._text(windows[i]))]
            if settled := [(i, windows[i]) for i in retry if i not in doubtful]:
                yield settled
            retry = doubtful
        for i in retry:  # failed at every temperature
            tried = tries.get(i, [windows[i]])
            calm = [w for w in tried if compression_ratio(self._text(w)) <= COMPRESSION_RATIO_THRESHOLD]
            windows[i] = max(calm or tried, key=lambda w: w.avg_logprob)
        if retry:
            yield [(i, windows[i]) for i in retry]

    def _text(self, window: DecodedWindow) -> str:
        return self.tokenizer.decode([t for t in window.tokens if t < self.special.timestamp_begin])

    def _advance(self, state: _Progress, chunk_len: int, window: DecodedWindow) -> None:
        offset_s, window_s = state.seek / SAMPLE_RATE, chunk_len / SAMPLE_RATE
        if window.is_silence:
            state.seek += chunk_len  # silence: skip the window, as openai/whisper does
            return
        pieces, consumed_s = split_segments(window, offset_s, window_s, self.special)
        state.segments += self._segments(window, pieces, window.avg_logprob, len(state.segments),
                                         len(state.audio) / SAMPLE_RATE)
        state.seek += max(1, min(chunk_len, round(consumed_s * SAMPLE_RATE)))

    def _segments(self, window: DecodedWindow, pieces: list[tuple[float, float, list[int]]], avg_logprob: float,
                  first_id: int, duration_s: float) -> list[Segment]:
        """A segment per (start s, end s, positions in `window.tokens`) piece whose text is not
        blank, numbered from `first_id`; times end at the audio's end (Whisper may stamp later)."""
        segments: list[Segment] = []
        for start, end, positions in pieces:
            tokens = [window.tokens[i] for i in positions]
            text = self.tokenizer.decode(tokens)
            if text.strip():
                segments.append(self._segment(window, tokens, text, positions, avg_logprob, first_id + len(segments),
                                              min(round(start, 3), duration_s),
                                              min(round(max(end, start), 3), duration_s)))
        return segments

    def _segment(self, window: DecodedWindow, tokens: list[int], text: str, positions: list[int],
                 avg_logprob: float, index: int, start: float, end: float) -> Segment:
        probs = [math.exp(window.token_logprobs[i]) for i in positions] if window.token_logprobs else None
        return Segment(
            id=index,
            start=start,
            end=end,
            text=text,
            tokens=tokens,
            avg_logprob=avg_logprob,
            no_speech_prob=window.no_speech_prob,
            compression_ratio=compression_ratio(text),
            temperature=window.temperature,
            token_probs=probs,
            word_probs=None if probs is None else word_probabilities(tokens, probs, self.tokenizer.decode,
                                                                     self.special.eot),
        )

    def _result(self, state: _Progress) -> Transcription:
        return Transcription(
            text="".join(s.text for s in state.segments).strip(),
            segments=state.segments,
            duration_s=len(state.audio) / SAMPLE_RATE,
        )
