"""`asrops synth`: labelled synthetic speech for load tests, drift scenarios and retraining."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from asrops.cli.common import say, setup


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def synth(
    out_dir: Annotated[Path, typer.Argument(
        file_okay=False, help="Folder to write audio/<id>.wav, manifest.jsonl and spec.json into.")],
    preset: Annotated[Optional[str], typer.Option(
        help="Start from a named spec: clean, drift-accent-noise or telephone; other options override it.")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Number of clips (default 100).")] = None,
    voices: Annotated[Optional[str], typer.Option(
        help="Comma-separated voices (espeak-ng: en-us, en-gb-scotland, en-029, ...; flite: kal, kal16, awb, rms, "
             "slt), or 'all' (default en-us).")] = None,
    accents: Annotated[Optional[str], typer.Option(
        help="Comma-separated accents; keeps only the chosen voices with one of them.")] = None,
    rate: Annotated[Optional[str], typer.Option(
        help="Speaking rate in words per minute, LOW-HIGH or one value (default 160-190).")] = None,
    snr_db: Annotated[Optional[str], typer.Option(
        "--snr-db", help="Noise at this speech-to-noise ratio in dB, or 'clean' (default clean).")] = None,
    noise: Annotated[Optional[str], typer.Option(help="Noise kind: white or babble (default white).")] = None,
    reverb_rt60: Annotated[Optional[float], typer.Option(
        "--reverb-rt60", help="Room reverberation time in seconds; 0 = dry (default dry).")] = None,
    telephone: Annotated[Optional[bool], typer.Option(
        "--telephone/--no-telephone", help="Pass through a 300-3400 Hz, 8 kHz phone channel (default off).")] = None,
    mulaw: Annotated[Optional[bool], typer.Option(
        "--mulaw/--no-mulaw", help="With --telephone: add mu-law codec quantisation (default on).")] = None,
    domains: Annotated[Optional[str], typer.Option(
        help="Comma-separated vocabulary domains: commands, medical, finance, numbers, general (default all).")] = None,
    templates: Annotated[Optional[str], typer.Option(
        help="Comma-separated template ids (e.g. medical-01) to draw from; default all of the domains'.")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Random seed; the same spec and seed give the same clips (default 0).")] = None,
    text: Annotated[Optional[str], typer.Option(
        help="What is spoken: templates (default); unseen, the sentences kept for judging generalisation (in "
        "no template): with a drift's preset, a generalisation set (retrain.generalisation_manifests); broad, "
        "everyday sentences in neither, of every domain unless --domains is given, to train on some acoustics "
        "(retrain.acoustic_manifests).")] = None,
) -> None:
    """Generate labelled synthetic speech (espeak-ng/flite) and a manifest for `asrops eval`."""
    from asrops.synth import PRESETS, SynthSpec, generate, speaking

    setup()
    if preset is not None and preset not in PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(PRESETS)}", param_hint="--preset")
    given = {
        "n": n, "voices": "all" if voices == "all" else _csv(voices), "accents": _csv(accents),
        "noise": noise, "telephone": telephone, "mulaw": mulaw, "domains": _csv(domains),
        "template_ids": _csv(templates), "seed": seed, "text": text,
    }  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}  # unset: keep the preset's
    if rate is not None:
        low, _, high = rate.partition("-")
        given["rate"] = (low, high or low)
    if snr_db is not None:
        given["snr_db"] = None if snr_db.lower() in ("clean", "none") else snr_db
    if reverb_rt60 is not None:
        given["reverb_rt60_s"] = reverb_rt60 or None
    try:
        spec = SynthSpec.model_validate((PRESETS[preset].model_dump() if preset else {}) | given)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if text is not None and domains is None:  # a preset's acoustics speaking that text (broad: every domain)
        spec = speaking(spec, spec.text, spec.n, spec.seed)
    manifest = generate(spec, out_dir, progress=say)
    typer.echo(manifest)
