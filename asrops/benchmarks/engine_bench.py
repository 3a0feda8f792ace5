"""`asrops bench engine`: our engines against faster-whisper and a transformers pipeline on
the same clips and thread count, one engine at a time, each in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from asrops.benchmarks.engine_worker import parse_engine
from asrops.errors import AsropsError
from asrops.evaluation import core_english_filter, load_manifest, score
from asrops.models.ct2_import import embedded_ct2_dir
from asrops.registry import ModelRegistry
from asrops.settings import Settings

PEER = "fw-int8"


def run_engine_benchmark(
    settings: Settings,
    manifest: Path | None,
    version: str,
    engines: list[str],
    limit: int,
    threads: int,
    say: Callable[[str], None],
) -> dict:
    if manifest is None:
        manifest = settings.speech_manifest
        if manifest is None:
            raise AsropsError(f"no speech data at {settings.speech_data_dir}: pass --manifest, or set "
                              "ASROPS_SPEECH_DATA_DIR to a folder with a manifest.jsonl.")
        items = load_manifest(manifest, filter=core_english_filter)
    else:
        items = load_manifest(manifest)
    items = items[:limit] if limit else items
    registry = ModelRegistry.from_settings(settings)
    version_id = registry.resolve(version)
    job = {
        "items": [i.model_dump() for i in items],
        "threads": threads,
        "model_dir": str(registry.fetch(version_id)),
        "ct2_dir": str(embedded_ct2_dir()),
    }
    for engine in engines:
        parse_engine(engine)  # a typo fails before the first engine runs
    say(f"engine benchmark: {len(items)} clips, {threads} threads, version {version_id}")
    results: dict[str, dict] = {}
    for i, engine in enumerate(engines, 1):
        say(f"[{i}/{len(engines)}] {engine}")
        proc = subprocess.run(
            [sys.executable, "-m", "asrops.benchmarks.engine_worker"],
            input=json.dumps({**job, "engine": engine}), stdout=subprocess.PIPE, text=True, check=True,
        )
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    _add_ratios(results)
    print(format_table(results, len(items), threads))
    return {"version": version_id, "clips": len(items), "threads": threads, "engines": results}


def _add_ratios(results: dict[str, dict]) -> None:
    peer = results.get(PEER)
    for name, r in results.items():
        r["rtfx_vs_fw_int8"] = r["rtfx"] / peer["rtfx"] if peer else None
        if peer and name != PEER:  # how far each engine's words are from the peer's
            r["wer_vs_fw_int8_text"] = score(peer["hypotheses"], r["hypotheses"]).wer


def format_table(results: dict[str, dict], clips: int, threads: int) -> str:
    lines = [
        f"{'engine':18} {'RTFx':>7} {'x fw-int8':>9} {'WER %':>7} {'CER %':>7} {'peak MB':>8} {'load s':>7}",
    ]
    for name, r in results.items():
        ratio = f"{r['rtfx_vs_fw_int8']:.2f}" if r.get("rtfx_vs_fw_int8") is not None else "-"
        lines.append(
            f"{name:18} {r['rtfx']:7.2f} {ratio:>9} {r['wer']:7.2f} {r['cer']:7.2f} {r['peak_rss_mb']:8.0f} "
            f"{r['load_s']:7.1f}"
        )
    lines.append(f"({clips} clips, {threads} threads, greedy, temperature 0; RTFx = audio s / wall s)")
    return "\n".join(lines)
