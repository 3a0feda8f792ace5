"""`asrops monitor`, `asrops drift` and `asrops simulate`: the drift monitor, its reports and
reference, and synthetic traffic to watch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from asrops.cli.common import UrlOpt, load_engine_for, registry_of, say, service_url, setup

drift_app = typer.Typer(no_args_is_help=True, help="Drift reports on the production log, and their reference.")


def monitor(
    bootstrap_reference: Annotated[bool, typer.Option(
        help="With no reference yet, make one from clean synthetic speech through the stable version.")] = False,
) -> None:
    """Run the drift monitor: one Evidently report per window, verdicts, metrics on monitor_port."""
    from asrops.cli.stack import drift_monitor

    settings = setup()
    watcher = drift_monitor(settings, with_trigger=True, say=say)
    if bootstrap_reference:
        from asrops.monitoring.reference import load_reference, synthetic_reference

        if load_reference(watcher.store) is None:
            synthetic_reference(watcher.store, registry_of(settings), settings, say)
    watcher.run_forever(say=say)


@drift_app.command("report")
def drift_report(
    window_s: Annotated[Optional[float], typer.Option(
        help="Window length in seconds (default: settings, 300).")] = None,
    end: Annotated[Optional[str], typer.Option(help="Window end, ISO 8601 UTC (default now).")] = None,
) -> None:
    """One drift report now: the last window of the production log against the reference.
    Prints the result as JSON (and where the HTML report is) on stdout."""
    from datetime import datetime

    from asrops.cli.stack import drift_monitor

    settings = setup()
    if window_s:
        settings.monitoring.drift.window_s = window_s
    try:
        outcome = drift_monitor(settings).run_window(datetime.fromisoformat(end) if end else None)
    except LookupError as exc:
        say(str(exc))
        raise typer.Exit(1) from None
    if outcome.result is None:
        say(f"only {outcome.samples} answered requests in the window (min {settings.monitoring.drift.min_samples}): "
             "no report")
    else:
        say(f"drift report: {outcome.report_html}")
    typer.echo(outcome.model_dump_json(indent=1))


@drift_app.command("reference")
def drift_reference(
    manifest: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False,
        help="A validation set (jsonl with audio) to transcribe with the stable version.")] = None,
    start: Annotated[Optional[str], typer.Option(
        "--from", help="Pin the production window from this time (ISO 8601 UTC)...")] = None,
    stop: Annotated[Optional[str], typer.Option("--to", help="...to this time.")] = None,
    synthetic: Annotated[int, typer.Option(
        help="With neither: this many clean synthetic clips through the stable version.")] = 100,
) -> None:
    """Set the drift reference (stored beside the production log)."""
    from datetime import datetime

    from asrops.monitoring import reference
    from asrops.prodlog import store_for

    settings = setup()
    store = store_for(settings)
    if start and stop:
        frame = reference.pin_window(store, datetime.fromisoformat(start), datetime.fromisoformat(stop))
    elif manifest:
        version, engine = load_engine_for(settings, "stable", None, 0)
        frame = reference.from_manifest(store, manifest, engine, version, settings.engine.offline_batch_size, say)
    else:
        frame = reference.synthetic_reference(store, registry_of(settings), settings, say, n=synthetic)
    typer.echo(f"reference: {len(frame)} rows")


def simulate(
    mix: Annotated[str, typer.Argument(
        help="Manifests from `asrops synth` with weights: clean/manifest.jsonl:0.8,accent/manifest.jsonl:0.2")],
    url: UrlOpt = None,
    rate: Annotated[float, typer.Option(help="Requests per second.")] = 2.0,
    count: Annotated[int, typer.Option(help="Requests to send.")] = 100,
    concurrency: Annotated[int, typer.Option(help="Most requests in flight.")] = 8,
    seed: int = 0,
    correct: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of answers corrected with the manifest's text through POST /v1/feedback.")] = 0.0,
) -> None:
    """Send synthetic speech to the service at a chosen rate and mix (stationary or drifted traffic).
    ASROPS_API_KEY may list several keys, comma-separated: the simulated clients take turns."""
    import os

    from asrops.monitoring.simulate import parse_mix
    from asrops.monitoring.simulate import simulate as run_simulation

    setup()
    result = run_simulation(service_url(url), parse_mix(mix), rate, count, concurrency,
                            [k for k in os.environ.get("ASROPS_API_KEY", "").split(",") if k], seed,
                            progress=say, correct_share=correct)
    typer.echo(result.model_dump_json(indent=1))
