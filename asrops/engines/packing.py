"""Window packing: short clips waiting together share one 30-s window.

Whisper's encoder always sees 30 s, so a 6-s clip pays five times its encoder cost. Under load a
replica holds several short clips at once; laid end to end with a second of silence between them
they fill one window, which is decoded with timestamps and cut back into each clip's segments by
those timestamps. A clip's answer may only ever hold its own words (and all of them), so a packed
window is kept only when it can be cut cleanly (`split`); otherwise, and whenever the window
needs a temperature fallback, its clips are decoded one by one as usual. The engine (engine.py)
packs only when asked (`engine.pack_windows`, off by default: on 2 CPU cores with tiny.en it is
slower than plain batches, see settings.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asrops.audio_format import SAMPLE_RATE
from asrops.engines.decoding import CHUNK_S, DecodedWindow, SpecialTokens, split_segments

GAP_S = 1.0
"""Silence between two packed clips: a segment must start inside its clip's audio or the half
gap before it, so Whisper's starts may be half a second early and still name the right clip."""
QUIET_RMS_RATIO = 0.25
"""Whisper, which hears no pause in the gap, often ends a segment where the next one starts,
past the next clip's start when that clip opens with silence. Such an overrun is allowed only
while the next clip is still quiet there: below a quarter of that clip's RMS (-12 dB; the
leading silence of the core set's clips is under 0.1 of it, their first words above 0.3). A
segment that also holds the next clip's first word runs into that word, and is refused."""
END_SLACK_S = 1.0
"""A clip's last segment must end within this of the clip's last audible frame (louder than
QUIET_RMS_RATIO of its RMS): a packed decoding that leaves a clip's last words out and goes on
with the next clip is refused."""
FRAME_S = 0.02
WINDOW_S = CHUNK_S - 2.0
"""How much audio one packed window holds: 2 s short of Whisper's 30, so that the last clip's
closing timestamp is never at the window's very end (where Whisper ends mid-segment)."""
MAX_CLIP_S = WINDOW_S / 2
"""Longer clips gain little (at most one more shares their window) and are decoded on their own."""


@dataclass(frozen=True)
class PackedWindow:
    """Clips laid end to end: `members` index the caller's list; `spans` are each member's
    (start, end) in seconds within `audio`."""

    members: tuple[int, ...]
    audio: np.ndarray
    spans: tuple[tuple[float, float], ...]

    def clip(self, member: int) -> np.ndarray:
        start, end = self.spans[member]
        return self.audio[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)]

    def is_quiet(self, member: int, until_s: float) -> bool:
        """Whether `member`'s audio is silence from its start until `until_s` (window seconds)."""
        clip = self.clip(member)
        head = clip[: max(1, round((until_s - self.spans[member][0]) * SAMPLE_RATE))]
        return _rms(head) <= QUIET_RMS_RATIO * _rms(clip)

    def speech_end(self, member: int) -> float:
        """Seconds from `member`'s start to the end of its last audible frame."""
        clip = self.clip(member)
        frame = round(FRAME_S * SAMPLE_RATE)
        frames = clip[: len(clip) // frame * frame].reshape(-1, frame)
        frame_rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
        loud = np.flatnonzero(frame_rms > QUIET_RMS_RATIO * _rms(clip))
        return (loud[-1] + 1) * FRAME_S if len(loud) else 0.0

    def regions(self) -> list[tuple[float, float]]:
        """Where each member's segments may start: from the middle of the gap before it to the
        middle of the gap after it (the window's ends for the first and the last)."""
        cuts = [0.0] + [(a[1] + b[0]) / 2 for a, b in zip(self.spans, self.spans[1:])] + [CHUNK_S]
        return list(zip(cuts, cuts[1:]))


@dataclass(frozen=True)
class ClipPiece:
    """One segment of a packed window that belongs to one clip: times relative to the clip,
    `positions` index the window's tokens (its text tokens), `stamps` its timestamp tokens."""

    start: float
    end: float
    positions: list[int]
    stamps: list[int]


def plan(lengths: list[int], packable: list[bool]) -> list[list[int]]:
    """Bins of at least two clips (indices into `lengths`, in samples) whose audio and gaps fit in
    one window: first-fit over the clips longest first. Clips not packable, too long, or left
    alone in a bin are in no bin."""
    limit = round(WINDOW_S * SAMPLE_RATE)
    gap = round(GAP_S * SAMPLE_RATE)
    candidates = [i for i, n in enumerate(lengths) if packable[i] and 0 < n <= MAX_CLIP_S * SAMPLE_RATE]
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(candidates, key=lambda i: -lengths[i]):
        for b, members in enumerate(bins):
            if used[b] + gap + lengths[i] <= limit:
                members.append(i)
                used[b] += gap + lengths[i]
                break
        else:
            bins.append([i])
            used.append(lengths[i])
    return [sorted(members) for members in bins if len(members) >= 2]


def pack(members: list[int], audios: list[np.ndarray]) -> PackedWindow:
    """The members' audio with GAP_S of silence between each two."""
    gap = np.zeros(round(GAP_S * SAMPLE_RATE), dtype=np.float32)
    parts, spans, at = [], [], 0
    for k, i in enumerate(members):
        if k:
            parts.append(gap)
            at += len(gap)
        parts.append(np.asarray(audios[i], dtype=np.float32))
        spans.append((at / SAMPLE_RATE, (at + len(audios[i])) / SAMPLE_RATE))
        at += len(audios[i])
    return PackedWindow(tuple(members), np.concatenate(parts), tuple(spans))


def split(window: DecodedWindow, packed: PackedWindow, special: SpecialTokens) -> list[list[ClipPiece]] | None:
    """Each member's pieces of the decoded window, or None when the window cannot be cut cleanly:
    it ended mid-segment, a segment starts in the silence after its clip or runs into the next
    clip, or a member got no segment at all. A segment belongs to the clip its start is in."""
    window_s = len(packed.audio) / SAMPLE_RATE
    segments, consumed_s = split_segments(window, 0.0, window_s, special)
    if consumed_s < packed.spans[-1][0]:  # stopped before the last clip
        return None
    regions = packed.regions()
    pieces: list[list[ClipPiece]] = [[] for _ in packed.members]
    for start, end, positions in segments:
        if not positions:
            continue
        k = max(k for k, (lo, _) in enumerate(regions) if lo <= start)
        clip_start, clip_end = packed.spans[k]
        if start > clip_end:  # begins in the silence after its clip: its words are the next clip's
            return None
        if k + 1 < len(packed.spans) and end > packed.spans[k + 1][0] and not packed.is_quiet(k + 1, end):
            return None  # runs into the next clip's speech
        lo, hi = max(0, positions[0] - 1), min(len(window.tokens), positions[-1] + 2)
        stamps = [p for p in range(lo, hi) if window.tokens[p] >= special.timestamp_begin]
        pieces[k].append(ClipPiece(
            start=min(max(start - clip_start, 0.0), clip_end - clip_start),
            end=min(max(end - clip_start, 0.0), clip_end - clip_start),
            positions=positions,
            stamps=stamps,
        ))
    if any(not p for p in pieces):
        return None
    for k, member_pieces in enumerate(pieces):  # Whisper may jump to the next clip before this one ended
        if member_pieces[-1].end < packed.speech_end(k) - END_SLACK_S:
            return None
    return pieces


def clip_avg_logprob(window: DecodedWindow, pieces: list[ClipPiece]) -> float:
    """A member's own average log-probability: over its text and timestamp tokens, +1 for the end
    of text as a window's average counts it (the quality signal the production log keeps)."""
    positions = [p for piece in pieces for p in (*piece.positions, *piece.stamps)]
    if not window.token_logprobs:
        return window.avg_logprob
    return float(sum(window.token_logprobs[p] for p in positions)) / (len(positions) + 1)


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
