"""Response formats of the OpenAI transcription API, as a small registry of writers; and the
`Server-Timing` header an answer carries (written by the API, read by clients and benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Callable

from asrops.engines.types import Transcription


def usage(t: Transcription) -> dict:
    """OpenAI's usage for audio models billed by duration: whole seconds, rounded up."""
    return {"type": "duration", "seconds": math.ceil(t.duration_s)}


SERVER_TIMING_ENGINE = "engine"
"""The `Server-Timing` metric a transcription's answer carries: the model's own time on it."""


def server_timing(engine_s: float) -> str:
    """The `Server-Timing` header value for a transcription the model took `engine_s` on."""
    return f"{SERVER_TIMING_ENGINE};dur={engine_s * 1000:.1f}"


def engine_time(header: str) -> float | None:
    """Seconds of the engine metric in a `Server-Timing` header value, if it holds one (a
    client's side of `server_timing`; other metrics and malformed durations read as none)."""
    for metric in header.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        if name == SERVER_TIMING_ENGINE:
            for param in params:
                key, _, value = param.partition("=")
                if key == "dur":
                    try:
                        return float(value) / 1000
                    except ValueError:
                        return None
    return None


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
