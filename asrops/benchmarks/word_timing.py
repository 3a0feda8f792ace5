"""How accurate word timestamps are, against faster-whisper's `word_timestamps=True`, on speech
whose word boundaries are known: every word synthesised on its own, trimmed to its sound, and
laid end to end with silences of known length between them.

    python -m asrops.benchmarks.word_timing [--clips 30] [--version stable] [--out results.json]

Both engines run the same weights (the embedded default; faster-whisper on its CTranslate2 int8
copy) on the same clips. A word is scored when it is matched to the reference word at its place
(the transcripts aligned word by word; a misheard word is not timed). Prints the median and 90th
percentile of |start error| and |end error| per engine, and exits 1 when ours misses the goal
(median |start error| <= 100 ms, 90th percentile <= 250 ms).
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from asrops.audio_format import SAMPLE_RATE

GOAL_MEDIAN_S, GOAL_P90_S = 0.100, 0.250
TRIM_BELOW_PEAK_DB = -35.0
"""A synthesised word's sound starts and ends where its 10-ms frames rise above this level
(relative to the word's loudest frame)."""


class TimedWord(BaseModel):
    word: str
    start: float
    end: float


class Clip(BaseModel):
    voice: str
    words: list[TimedWord]


def _trim(samples: np.ndarray) -> np.ndarray:
    """The word's sound without the silence the synthesiser puts around it."""
    frame = SAMPLE_RATE // 100
    frames = samples[: len(samples) // frame * frame].reshape(-1, frame)
    level = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    loud = np.flatnonzero(level > level.max() + TRIM_BELOW_PEAK_DB)
    return samples[loud[0] * frame : (loud[-1] + 1) * frame] if len(loud) else samples


def make_clips(n: int, seed: int) -> list[tuple[np.ndarray, Clip]]:
    """`n` clips of 6-14 words of everyday sentences, one voice each, with 0.05-0.6 s silences
    between words and 0.2-1.0 s before the first."""
    from asrops.synth.text import BROAD
    from asrops.synth.voices import CATALOGUE, installed_voices, synthesize

    rng = random.Random(seed)
    voices = [v for v in installed_voices() if CATALOGUE[v].engine == "espeak-ng"] or list(installed_voices())
    if not voices:
        raise SystemExit("no speech synthesiser found: install espeak-ng (scripts/setup.sh does)")
    sentences = [t.pattern for t in BROAD.values() if 6 <= len(t.pattern.split()) <= 14 and "{" not in t.pattern]
    clips = []
    for i in range(n):
        voice = CATALOGUE[voices[i % len(voices)]]
        words = rng.choice(sentences).split()
        pieces, timed, at = [], [], rng.uniform(0.2, 1.0)
        pieces.append(np.zeros(round(at * SAMPLE_RATE), np.float32))
        for word in words:
            sound = _trim(synthesize(voice, word, rng.randint(160, 190)))
            timed.append(TimedWord(word=word, start=round(at, 3), end=round(at + len(sound) / SAMPLE_RATE, 3)))
            gap = rng.uniform(0.05, 0.6)
            pieces += [sound, np.zeros(round(gap * SAMPLE_RATE), np.float32)]
            at += len(sound) / SAMPLE_RATE + gap
        audio = np.concatenate(pieces).astype(np.float32)
        clips.append((audio / max(1e-6, float(np.abs(audio).max())) * 0.8, Clip(voice=voice.name, words=timed)))
        print(f"  synthesised clip {i + 1}/{n}", file=sys.stderr, flush=True)
    return clips


def _norm(word: str) -> str:
    return re.sub(r"[^a-z0-9']", "", word.lower())


def errors(reference: list[TimedWord], hypothesis: list[TimedWord]) -> list[tuple[float, float]]:
    """(|start error|, |end error|) of each hypothesis word matched to the reference word at its
    place (transcripts aligned word by word on normalised spelling)."""
    ref, hyp = [_norm(w.word) for w in reference], [_norm(w.word) for w in hypothesis]
    out = []
    for block in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            r, h = reference[block.a + k], hypothesis[block.b + k]
            out.append((abs(h.start - r.start), abs(h.end - r.end)))
    return out


def ours(model_dir: Path, kind: str, threads: int):
    from asrops.engines import DecodeOptions, load_engine

    engine = load_engine(model_dir, kind, "cpu", threads)
    options = DecodeOptions(word_timestamps=True)

    def run(audio: np.ndarray) -> list[TimedWord]:
        words = engine.transcribe([audio], options)[0].words or []
        return [TimedWord(word=w.word, start=w.start, end=w.end) for w in words]

    return run


def faster_whisper(ct2_dir: Path, threads: int):
    from faster_whisper import WhisperModel

    model = WhisperModel(str(ct2_dir), device="cpu", compute_type="int8", cpu_threads=threads)

    def run(audio: np.ndarray) -> list[TimedWord]:
        segments, _ = model.transcribe(audio, beam_size=1, language="en", word_timestamps=True,
                                       condition_on_previous_text=False)
        return [TimedWord(word=w.word.strip(), start=w.start, end=w.end) for s in segments for w in s.words or []]

    return run


def summarise(name: str, errs: list[tuple[float, float]], words: int, seconds: float) -> dict:
    starts, ends = np.array([e[0] for e in errs]), np.array([e[1] for e in errs])
    return {"engine": name, "matched_words": len(errs), "reference_words": words, "seconds": round(seconds, 1),
            "start_median_ms": round(1000 * float(np.median(starts)), 1) if len(errs) else None,
            "start_p90_ms": round(1000 * float(np.percentile(starts, 90)), 1) if len(errs) else None,
            "end_median_ms": round(1000 * float(np.median(ends)), 1) if len(errs) else None,
            "end_p90_ms": round(1000 * float(np.percentile(ends, 90)), 1) if len(errs) else None}


def main(argv: list[str] | None = None) -> int:
    from asrops.models.ct2_import import embedded_ct2_dir
    from asrops.registry import ModelRegistry
    from asrops.settings import load_settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--version", default="stable", help="our engine's version (the registry's)")
    parser.add_argument("--engine", default="onnx-int8", help="our engine kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    settings = load_settings()
    registry = ModelRegistry.from_settings(settings)
    model_dir = registry.fetch(registry.resolve(args.version))
    clips = make_clips(args.clips, args.seed)
    total = sum(len(c.words) for _, c in clips)
    results = []
    for name, run in ((f"asrops {args.engine}", ours(model_dir, args.engine, args.threads)),
                      ("faster-whisper int8", faster_whisper(embedded_ct2_dir(), args.threads))):
        run(clips[0][0])  # warm: the first call loads what it loads
        started, errs = time.monotonic(), []
        for i, (audio, clip) in enumerate(clips, 1):
            errs += errors(clip.words, run(audio))
            print(f"  {name}: {i}/{len(clips)} clips", file=sys.stderr, flush=True)
        results.append(summarise(name, errs, total, time.monotonic() - started))
    print(f"Word timing on {len(clips)} clips of separately synthesised words ({total} words; silences 0.05-0.6 s)")
    print("| engine | matched words | start error median | p90 | end error median | p90 | seconds |")
    print("| --- | --: | --: | --: | --: | --: | --: |")
    for r in results:
        print(f"| {r['engine']} | {r['matched_words']}/{r['reference_words']} | {r['start_median_ms']} ms | "
              f"{r['start_p90_ms']} ms | {r['end_median_ms']} ms | {r['end_p90_ms']} ms | {r['seconds']} |")
    mine, peer = results
    if mine["start_median_ms"] and peer["start_median_ms"]:
        print(f"ours / faster-whisper: start error median {mine['start_median_ms'] / peer['start_median_ms']:.2f}x, "
              f"p90 {mine['start_p90_ms'] / peer['start_p90_ms']:.2f}x; end error median "
              f"{mine['end_median_ms'] / peer['end_median_ms']:.2f}x (below 1: ours closer)")
    met = mine["start_median_ms"] is not None and mine["start_median_ms"] <= 1000 * GOAL_MEDIAN_S \
        and mine["start_p90_ms"] <= 1000 * GOAL_P90_S
    print(f"goal (ours): median |start error| <= {1000 * GOAL_MEDIAN_S:.0f} ms, 90th percentile <= "
          f"{1000 * GOAL_P90_S:.0f} ms: {'met' if met else 'MISSED'}")
    if args.out:
        args.out.write_text(json.dumps({"clips": len(clips), "words": total, "results": results}, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
