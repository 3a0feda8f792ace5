"""Response formats of the OpenAI transcription API, as a small registry of writers."""

from __future__ import annotations

import math
from collections.abc import Callable

from asrops.engines.types import Transcription


def usage(t: Transcription) -> dict:
    """OpenAI's usage for audio models billed by duration: whole seconds, rounded up."""
    return {"type": "duration", "seconds": math.ceil(t.duration_s)}


def _clock(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def to_text(t: Transcription) -> str:
    return t.text + "\n"


def to_srt(t: Transcription) -> str:
    blocks = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(t.segments, 1)
    ]
    return "\n".join(blocks)


def to_vtt(t: Transcription) -> str:
    cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_json(t: Transcription) -> dict:
    return {"text": t.text, "usage": usage(t)}


def to_verbose_json(t: Transcription) -> dict:
    return {
        "task": "transcribe",
        "language": "english",
        "duration": t.duration_s,
        "text": t.text,
        "segments": [
            {
                "id": s.id,
                "seek": 0,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": s.tokens,
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in t.segments
        ],
        **({} if t.words is None else {"words": [w.model_dump() for w in t.words]}),
        "usage": usage(t),
    }


WRITERS: dict[str, Callable[[Transcription], str | dict]] = {
    "json": to_json,
    "text": to_text,
    "srt": to_srt,
    "verbose_json": to_verbose_json,
    "vtt": to_vtt,
}
