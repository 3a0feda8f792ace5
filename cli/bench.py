"""`asrops bench`: benchmarks that print ratios against a peer measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from asrops.cli.common import say, setup

app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios against a peer measured in the same run.")


@app.command("engine")
def bench_engine(
    manifest: Annotated[Optional[Path], typer.Option(
        help="JSONL manifest; default: the core English subset of ASROPS_SPEECH_DATA_DIR.")] = None,
    version: Annotated[str, typer.Option(help="Version id or alias for our engines.")] = "stable",
    engines: Annotated[str, typer.Option(
        help="Comma-separated engines to run: KIND[+pack][@BATCH], e.g. onnx-int8@8,onnx-int8+pack@8 compares "
             "window packing with plain batches of 8.")] = "onnx-int8,onnx,torch,fw-int8,fw-float32,hf-pipeline",
    limit: Annotated[int, typer.Option(help="Only the first N clips (0 = all).")] = 0,
    threads: Annotated[int, typer.Option(help="Threads for every engine.")] = 2,
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """RTFx, WER and peak memory of each engine on the same clips and threads, with each
    engine's ratio to faster-whisper int8."""
    from asrops.benchmarks.engine_bench import run_engine_benchmark

    settings = setup()
    results = run_engine_benchmark(settings, manifest, version, engines.split(","), limit, threads, say)
    if out:
        out.write_text(json.dumps(results, indent=2))
        say(f"wrote {out}")
