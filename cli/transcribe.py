"""`asrops transcribe` and `asrops eval`: one file, or a whole manifest's error rates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from asrops.cli.common import EngineOpt, ThreadsOpt, load_engine_for, say, setup


def _transcribe_remote(url: str, file: Path, version: str, response_format: str, prompt: str | None) -> str:
    """Through the official openai SDK, as any client would."""
    import os

    from openai import OpenAI

    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=os.environ.get("ASROPS_API_KEY", "none"))
    with file.open("rb") as f:
        out = client.audio.transcriptions.create(
            model=version, file=f, response_format=response_format, **({"prompt": prompt} if prompt else {})
        )
    if isinstance(out, str):
        return out
    return out.model_dump_json(indent=2) if response_format != "json" else out.text


def transcribe(
    file: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, help="Audio file (wav, flac, mp3, ogg, webm, m4a).")],
    url: Annotated[Optional[str], typer.Option(
        help="Send to the running service at this base URL (the key comes from ASROPS_API_KEY); without it, "
             "transcribe in this process.")] = None,
    version: Annotated[str, typer.Option(help="Version id or alias.")] = "stable",
    engine: EngineOpt = None,
    threads: ThreadsOpt = 0,
    response_format: Annotated[str, typer.Option("--format", help="text, json, verbose_json, srt or vtt.")] = "text",
    prompt: Annotated[Optional[str], typer.Option(help="Initial prompt (vocabulary, previous text).")] = None,
    beam_size: Annotated[int, typer.Option(help="1 = greedy.")] = 1,
) -> None:
    """Transcribe a file: with --url through a running service, otherwise in this process."""
    from asrops.audio import decode_audio
    from asrops.formats import WRITERS

    settings = setup()
    if response_format not in WRITERS:
        raise typer.BadParameter(f"choose one of {', '.join(WRITERS)}", param_hint="--format")
    if url:
        typer.echo(_transcribe_remote(url, file, version, response_format, prompt).rstrip("\n"))
        return
    audio = decode_audio(file, settings.audio)
    _, eng = load_engine_for(settings, version, engine, threads)
    options = settings.engine.decode_options().model_copy(update={"prompt": prompt, "beam_size": beam_size})
    result = eng.transcribe([audio.samples], options)[0]
    out = WRITERS[response_format](result)
    typer.echo(json.dumps(out, indent=2) if isinstance(out, dict) else out.rstrip("\n"))


def eval_command(
    version: Annotated[str, typer.Argument(help="Version id or alias (e.g. stable).")],
    manifest: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, help="JSONL with audio, text and slice fields.")],
    engine: EngineOpt = None,
    threads: ThreadsOpt = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (wer and cer in percent).")] = False,
    slice_field: Annotated[Optional[list[str]], typer.Option(
        "--slice", help="Slice by this field (repeatable); default: every small categorical field.")] = None,
    core: Annotated[bool, typer.Option(
        help="Only the 'core' English subset of the shared speech data (gold English, 1-30 s).")] = False,
    limit: Annotated[int, typer.Option(help="Only the first N items (0 = all).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Clips per engine call.")] = 1,
) -> None:
    """Word and character error rates of a version on a manifest, overall and per slice."""
    from asrops.evaluation import core_english_filter, evaluate, format_report, load_manifest

    settings = setup()
    items = load_manifest(manifest, filter=core_english_filter if core else None)
    items = items[:limit] if limit else items
    version_id, eng = load_engine_for(settings, version, engine, threads)
    options = settings.engine.decode_options()
    report = evaluate(
        lambda audios: [t.text for t in eng.transcribe(audios, options)],
        items,
        slice_fields=slice_field,
        batch_size=batch_size,
        progress=lambda done, total: say(f"  {done}/{total}") if done % 20 == 0 or done == total else None,
        version=version_id,
        engine=eng.name,
    )
    if as_json:
        payload = report.model_dump(mode="json")
        payload.update(wer=report.overall.wer, cer=report.overall.cer)
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(format_report(report))
