"""Runs ONE engine over a manifest in its own process, so its peak memory is its own.
Reads the job as JSON on stdin; prints one JSON line on stdout; progress goes to stderr.

    echo '{"engine": ..., "items": [...], ...}' | python -m asrops.benchmarks.engine_worker
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from asrops.audio_format import SAMPLE_RATE
from asrops.evaluation import EvalItem, evaluate


def _faster_whisper(ct2_dir: str, compute_type: str, threads: int):
    from faster_whisper import WhisperModel

    model = WhisperModel(ct2_dir, device="cpu", compute_type=compute_type, cpu_threads=threads)

    def run(audios: list[np.ndarray]) -> list[str]:
        texts = []
        for audio in audios:
            segments, _ = model.transcribe(
                audio, beam_size=1, temperature=0.0, language="en", condition_on_previous_text=False
            )
            texts.append("".join(s.text for s in segments).strip())
        return texts

    return run


def _hf_pipeline(model_dir: str, threads: int):
    import torch
    from transformers import pipeline

    torch.set_num_threads(threads)
    pipe = pipeline("automatic-speech-recognition", model=model_dir, device="cpu")

    def run(audios: list[np.ndarray]) -> list[str]:
        return [pipe({"raw": a, "sampling_rate": SAMPLE_RATE}, generate_kwargs={"num_beams": 1})["text"].strip()
                for a in audios]

    return run


def _ours(model_dir: str, kind: str, threads: int, flag: str):
    from asrops.engines import DecodeOptions, load_engine

    pack = flag == "pack"
    engine = load_engine(Path(model_dir), kind, "cpu", threads, short_windows=flag != "full")
    options = DecodeOptions(temperature_increment=None)  # like the peers here: temperature 0 only
    return lambda audios: [t.text for t in engine.transcribe(audios, options, pack=pack)]


def parse_engine(spec: str) -> tuple[str, str, int]:
    """`KIND[+FLAG][@BATCH]` → (kind, flag, batch size). Flags: `pack`, short clips of a batch
    share windows (engines/packing.py), as a replica does under load; `full`, every window is
    encoded over 30 s (short windows off, engines/engine.py). `onnx-int8+pack@8`: batches of 8."""
    spec, _, batch = spec.partition("@")
    kind, _, flag = spec.partition("+")
    if flag not in ("", "pack", "full") or (batch and not batch.isdigit()) or batch == "0":
        raise ValueError(f"engine {spec!r}: expected KIND[+pack|+full][@BATCH], e.g. onnx-int8+pack@8")
    if flag and (kind.startswith("fw-") or kind == "hf-pipeline"):
        raise ValueError(f"engine {spec!r}: only our engines take +{flag}")
    return kind, flag, int(batch or 1)


def build(job: dict, name: str, flag: str):
    threads = job["threads"]
    if name.startswith("fw-"):
        return _faster_whisper(job["ct2_dir"], name.removeprefix("fw-"), threads)
    if name == "hf-pipeline":
        return _hf_pipeline(job["model_dir"], threads)
    return _ours(job["model_dir"], name, threads, flag)


def main() -> None:
    job = json.loads(sys.stdin.read())
    items = [EvalItem.model_validate(i) for i in job["items"]]
    kind, flag, batch_size = parse_engine(job["engine"])
    started = time.perf_counter()
    transcribe = build(job, kind, flag)
    from asrops.audio import decode_audio

    transcribe([decode_audio(items[0].audio).samples])  # warm-up, not timed
    load_s = time.perf_counter() - started

    def progress(done: int, total: int) -> None:
        if done % 25 == 0 or done == total:
            print(f"  {job['engine']}: {done}/{total}", file=sys.stderr, flush=True)

    report = evaluate(transcribe, items, slice_fields=[], batch_size=batch_size, progress=progress,
                      engine=job["engine"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "engine": job["engine"],
        "rtfx": report.rtfx,
        "wer": report.overall.wer,
        "cer": report.overall.cer,
        "n": report.n,
        "audio_s": report.audio_s,
        "wall_s": report.wall_s,
        "load_s": load_s,
        "peak_rss_mb": peak_mb,
        "hypotheses": [r.hypothesis for r in report.items],
    }))


if __name__ == "__main__":
    main()
