"""The `asrops` command. Each subcommand is a thin shell over a function of the core."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from asrops import __version__
from asrops.settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Versioned speech recognition: serve, watch, retrain.")
models_app = typer.Typer(no_args_is_help=True, help="List, inspect and import model versions.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios against a peer measured in the same run.")
app.add_typer(models_app, name="models")
rollout_app = typer.Typer(no_args_is_help=True, help="Canary rollouts on a running service, through its admin API "
                          "(token from ASROPS_ADMIN_TOKEN).")
app.add_typer(bench_app, name="bench")
app.add_typer(rollout_app, name="rollout")

EngineOpt = Annotated[Optional[str], typer.Option("--engine", help="torch, onnx or onnx-int8 (default: settings).")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="Intra-op threads; 0 = settings (0 there = all cores).")]


def _setup(verbose: bool = False) -> Settings:
    settings = load_settings()
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("root", "onnxruntime", "transformers", "optimum", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return settings


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _registry(settings: Settings):
    from asrops.registry import ModelRegistry

    return ModelRegistry.from_settings(settings)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"asrops {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")] = False,
) -> None:
    """asrops: versioned speech recognition with canary routing, drift monitoring and retraining."""


# --- models ------------------------------------------------------------------------------
@models_app.command("list")
def models_list() -> None:
    """List published versions and which aliases point at them."""
    settings = _setup()
    registry = _registry(settings)
    aliases = registry.read_aliases().value.model_dump()
    versions = registry.list_versions()
    if not versions:
        _say(f"no versions in {settings.registry_uri}; run `asrops models import-default`")
        return
    typer.echo(f"{'VERSION':44} {'FAMILY':18} {'CREATED (UTC)':20} {'SIZE':>9}  ALIASES")
    for m in versions:
        names = ",".join(k for k, v in aliases.items() if v == m.id)
        size = sum(f.size for f in m.files) / 1e6
        typer.echo(f"{m.id:44} {m.family:18} {m.created_at:%Y-%m-%d %H:%M:%S}  {size:7.0f}MB  {names}")


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="Version id or alias (stable, canary, fallback).")]) -> None:
    """Print a version's manifest as JSON."""
    settings = _setup()
    typer.echo(_registry(settings).get_manifest(name).model_dump_json(indent=2))


@models_app.command("import")
def models_import(
    source: Annotated[str, typer.Argument(help="Local transformers Whisper checkpoint directory, or a hub id (needs network).")],
    family: Annotated[Optional[str], typer.Option(help="Model family name; default: the directory name.")] = None,
    alias: Annotated[Optional[str], typer.Option(help="Point this alias (stable, canary, fallback) at the new version.")] = None,
    parent: Annotated[Optional[str], typer.Option(help="Parent version id, if fine-tuned from one.")] = None,
    notes: Annotated[str, typer.Option(help="Free-text notes stored in the manifest.")] = "",
) -> None:
    """Import a Whisper checkpoint: export ONNX (fp32 and int8) and publish a new version."""
    import tempfile

    from asrops.models.importer import publish_checkpoint, resolve_checkpoint_source

    settings = _setup()
    with tempfile.TemporaryDirectory(prefix="asrops-download-") as tmp:
        checkpoint = resolve_checkpoint_source(source, Path(tmp))
        manifest = publish_checkpoint(
            _registry(settings),
            checkpoint,
            family=family or Path(source.rstrip("/")).name.replace("/", "-").lower(),
            source=source,
            parent=parent,
            alias=alias,
            notes=notes,
            progress=_say,
        )
    typer.echo(manifest.id)


@models_app.command("import-default")
def models_import_default() -> None:
    """Publish the embedded Whisper tiny.en as `stable` (does nothing if a stable exists)."""
    from asrops.models.importer import import_embedded_default

    settings = _setup()
    typer.echo(import_embedded_default(_registry(settings), progress=_say).id)


# --- transcription and evaluation ----------------------------------------------------------
def _load_engine(settings: Settings, version: str, engine: str | None, threads: int):
    from asrops.engines import load_engine

    registry = _registry(settings)
    version_id = registry.resolve(version)
    _say(f"loading {version_id} (verifying checksums)")
    model_dir = registry.fetch(version_id)
    kind = engine or settings.engine.kind
    return version_id, load_engine(model_dir, kind, settings.engine.device, threads or settings.engine.threads)


@app.command("serve")
def serve_command(
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="A Serve config file (serve deploy schema), e.g. serve/serve_config.yaml.")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default: settings, 8000).")] = None,
) -> None:
    """Run the transcription service locally: Ray, Serve, the stable model and the HTTP API,
    with the drift monitor and a local Prometheus beside it."""
    import signal
    import time

    settings = _setup()
    if port:
        settings.serve.port = port
    from asrops.registry import ModelRegistry
    from monitoring.stack import start_monitoring
    from serve.launcher import VersionReconciler, curl_example, run_config, run_local

    url = run_config(settings, config, _say) if config else run_local(settings, _say)
    stack = start_monitoring(settings, _say)
    typer.echo(f"asrops is serving at {url}  (OpenAI API at {url}/v1, docs at {url}/docs)")
    typer.echo(f"try:  {curl_example(url, settings)}")
    for note in stack.notes:
        typer.echo(note)
    typer.echo("Ctrl-C stops it.")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as Ctrl-C does
    try:
        if config:  # the config file says which applications run
            while True:
                time.sleep(3600)
        # Deploys versions the rollout starts referencing (a new canary) and removes old ones.
        VersionReconciler(settings, ModelRegistry.from_settings(settings)).run_forever(say=_say)
    except KeyboardInterrupt:
        pass
    finally:
        from ray import serve

        stack.stop()
        serve.shutdown()


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


@app.command()
def transcribe(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Audio file (wav, flac, mp3, ogg, webm, m4a).")],
    url: Annotated[Optional[str], typer.Option(help="Send to a running service (e.g. http://127.0.0.1:8000); the key comes from ASROPS_API_KEY. Without it, transcribe in this process.")] = None,
    version: Annotated[str, typer.Option(help="Version id or alias.")] = "stable",
    engine: EngineOpt = None,
    threads: ThreadsOpt = 0,
    response_format: Annotated[str, typer.Option("--format", help="text, json, verbose_json, srt or vtt.")] = "text",
    prompt: Annotated[Optional[str], typer.Option(help="Initial prompt (vocabulary, previous text).")] = None,
    beam_size: Annotated[int, typer.Option(help="1 = greedy.")] = 1,
) -> None:
    """Transcribe a file: with --url through a running service, otherwise in this process."""
    from asrops.audio import decode_audio
    from asrops.engines import DecodeOptions
    from asrops.formats import WRITERS

    settings = _setup()
    if response_format not in WRITERS:
        raise typer.BadParameter(f"choose one of {', '.join(WRITERS)}", param_hint="--format")
    if url:
        typer.echo(_transcribe_remote(url, file, version, response_format, prompt).rstrip("\n"))
        return
    audio = decode_audio(file, settings.audio)
    _, eng = _load_engine(settings, version, engine, threads)
    result = eng.transcribe([audio.samples], DecodeOptions(prompt=prompt, beam_size=beam_size))[0]
    out = WRITERS[response_format](result)
    typer.echo(json.dumps(out, indent=2) if isinstance(out, dict) else out.rstrip("\n"))


@app.command("eval")
def eval_command(
    version: Annotated[str, typer.Argument(help="Version id or alias (e.g. stable).")],
    manifest: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL with audio, text and slice fields.")],
    engine: EngineOpt = None,
    threads: ThreadsOpt = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (wer and cer in percent).")] = False,
    slice_field: Annotated[Optional[list[str]], typer.Option("--slice", help="Slice by this field (repeatable); default: every small categorical field.")] = None,
    core: Annotated[bool, typer.Option(help="Only the 'core' English subset of shared/data/speech.")] = False,
    limit: Annotated[int, typer.Option(help="Only the first N items (0 = all).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Clips per engine call.")] = 1,
) -> None:
    """Word and character error rates of a version on a manifest, overall and per slice."""
    from asrops.engines import DecodeOptions
    from asrops.evaluation import core_english_filter, evaluate, format_report, load_manifest

    settings = _setup()
    items = load_manifest(manifest, filter=core_english_filter if core else None)
    items = items[:limit] if limit else items
    version_id, eng = _load_engine(settings, version, engine, threads)
    options = DecodeOptions(beam_size=settings.engine.beam_size)
    report = evaluate(
        lambda audios: [t.text for t in eng.transcribe(audios, options)],
        items,
        slice_fields=slice_field,
        batch_size=batch_size,
        progress=lambda done, total: _say(f"  {done}/{total}") if done % 20 == 0 or done == total else None,
        version=version_id,
        engine=eng.name,
    )
    if as_json:
        payload = report.model_dump(mode="json")
        payload.update(wer=report.overall.wer, cer=report.overall.cer)
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(format_report(report))


@bench_app.command("engine")
def bench_engine(
    manifest: Annotated[Optional[Path], typer.Option(help="JSONL manifest; default: the core English subset of ../shared/data/speech.")] = None,
    version: Annotated[str, typer.Option(help="Version id or alias for our engines.")] = "stable",
    engines: Annotated[str, typer.Option(help="Comma-separated engines to run.")] = "onnx-int8,onnx,torch,fw-int8,fw-float32,hf-pipeline",
    limit: Annotated[int, typer.Option(help="Only the first N clips (0 = all).")] = 0,
    threads: Annotated[int, typer.Option(help="Threads for every engine.")] = 2,
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """RTFx, WER and peak memory of each engine on the same clips and threads, with each
    engine's ratio to faster-whisper int8."""
    from asrops.benchmarks.engine_bench import run_engine_benchmark

    settings = _setup()
    results = run_engine_benchmark(settings, manifest, version, engines.split(","), limit, threads, _say)
    if out:
        out.write_text(json.dumps(results, indent=2))
        _say(f"wrote {out}")


# --- synthetic speech --------------------------------------------------------------------
def _csv(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(file_okay=False, help="Folder to write audio/<id>.wav, manifest.jsonl and spec.json into.")],
    preset: Annotated[Optional[str], typer.Option(help="Start from a named spec: clean, drift-accent-noise or telephone; other options override it.")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Number of clips (default 100).")] = None,
    voices: Annotated[Optional[str], typer.Option(help="Comma-separated voices (espeak-ng: en-us, en-gb-scotland, en-029, ...; flite: kal, kal16, awb, rms, slt), or 'all' (default en-us).")] = None,
    accents: Annotated[Optional[str], typer.Option(help="Comma-separated accents; keeps only the chosen voices with one of them.")] = None,
    rate: Annotated[Optional[str], typer.Option(help="Speaking rate in words per minute, LOW-HIGH or one value (default 160-190).")] = None,
    snr_db: Annotated[Optional[str], typer.Option("--snr-db", help="Noise at this speech-to-noise ratio in dB, or 'clean' (default clean).")] = None,
    noise: Annotated[Optional[str], typer.Option(help="Noise kind: white or babble (default white).")] = None,
    reverb_rt60: Annotated[Optional[float], typer.Option("--reverb-rt60", help="Room reverberation time in seconds; 0 = dry (default dry).")] = None,
    telephone: Annotated[Optional[bool], typer.Option("--telephone/--no-telephone", help="Pass through a 300-3400 Hz, 8 kHz phone channel (default off).")] = None,
    mulaw: Annotated[Optional[bool], typer.Option("--mulaw/--no-mulaw", help="With --telephone: add mu-law codec quantisation (default on).")] = None,
    domains: Annotated[Optional[str], typer.Option(help="Comma-separated vocabulary domains: commands, medical, finance, numbers, general (default all).")] = None,
    templates: Annotated[Optional[str], typer.Option(help="Comma-separated template ids (e.g. medical-01) to draw from; default all of the domains'.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed; the same spec and seed give the same clips (default 0).")] = None,
) -> None:
    """Generate labelled synthetic speech (espeak-ng/flite) and a manifest for `asrops eval`."""
    from asrops.synth import PRESETS, SynthSpec, generate

    _setup()
    if preset is not None and preset not in PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(PRESETS)}", param_hint="--preset")
    given = {
        "n": n, "voices": "all" if voices == "all" else _csv(voices), "accents": _csv(accents),
        "noise": noise, "telephone": telephone, "mulaw": mulaw, "domains": _csv(domains),
        "template_ids": _csv(templates), "seed": seed,
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
    manifest = generate(spec, out_dir, progress=_say)
    typer.echo(manifest)


# --- rollout: the admin API's client ---------------------------------------------------
UrlOption = Annotated[str, typer.Option(help="Base URL of the running service.")]
ReasonOption = Annotated[str, typer.Option(help="Why: kept in the audit log.")]


def _admin(method: str, url: str, path: str, body: dict | None = None) -> dict | list:
    import os

    import httpx

    token = os.environ.get("ASROPS_ADMIN_TOKEN", "")
    if not token:
        raise typer.BadParameter("set ASROPS_ADMIN_TOKEN to one of the service's admin tokens")
    headers = {"Authorization": f"Bearer {token}", "X-Actor": os.environ.get("USER", "cli")}
    try:
        r = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise typer.BadParameter(f"cannot reach {url}: {exc}") from None
    if r.status_code != 200:
        message = r.json().get("error", {}).get("message", r.text) if r.headers.get(
            "content-type", "").startswith("application/json") else r.text
        typer.echo(f"error {r.status_code}: {message}", err=True)
        raise typer.Exit(1)
    return r.json()


def _show(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@rollout_app.command("status")
def rollout_status(
    url: UrlOption = "http://127.0.0.1:8000",
    as_json: Annotated[bool, typer.Option("--json", help="The whole status as JSON.")] = False,
) -> None:
    """Aliases, traffic, and the promotion controller's phase, weight and last check values
    against their ranges (--json adds running versions, breakers and route counts)."""
    from asrops.analysis import AnalysisState, status_lines

    status = _admin("GET", url, "/admin/rollout")
    if as_json:
        _show(status)
        return
    view = status["view"]
    typer.echo(f"aliases: {view['aliases']}")
    typer.echo(f"traffic: canary {view['rollout']['canary_version']} at {view['rollout']['canary_weight']} %, "
               f"shadow {view['rollout']['shadow_share']}")
    if status.get("analysis"):
        typer.echo("\n".join(status_lines(AnalysisState.model_validate(status["analysis"]))))
    else:
        typer.echo("no rollout analysed yet")


def _analysis_action(action: str, reason: str, url: str) -> None:
    from asrops.analysis import AnalysisState, status_lines

    typer.echo("\n".join(status_lines(AnalysisState.model_validate(
        _admin("POST", url, f"/admin/rollout/{action}", {"reason": reason})))))


@rollout_app.command("pause")
def rollout_pause(reason: ReasonOption = "", url: UrlOption = "http://127.0.0.1:8000") -> None:
    """The promotion controller stops stepping the canary (its weight stays) until resumed."""
    _analysis_action("pause", reason, url)


@rollout_app.command("resume")
def rollout_resume(reason: ReasonOption = "", url: UrlOption = "http://127.0.0.1:8000") -> None:
    """The controller goes on; its next check is one interval later."""
    _analysis_action("resume", reason, url)


@rollout_app.command("abort")
def rollout_abort(reason: ReasonOption = "", url: UrlOption = "http://127.0.0.1:8000") -> None:
    """End the rollout as failed and roll the canary back now."""
    _analysis_action("abort", reason, url)


@rollout_app.command("canary")
def rollout_canary(
    version: Annotated[str, typer.Argument(help="Version id (or alias) to put in front of traffic.")],
    weight: Annotated[int, typer.Option(min=0, max=100, help="Percent of traffic.")] = 0,
    shadow: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of stable traffic copied to it.")] = 0.0,
    reason: ReasonOption = "",
    url: UrlOption = "http://127.0.0.1:8000",
) -> None:
    """Deploy a version as canary (it gets traffic once it is warm)."""
    _show(_admin("POST", url, "/admin/rollout/canary",
                 {"version": version, "weight": weight, "shadow_share": shadow, "reason": reason}))


@rollout_app.command("traffic")
def rollout_traffic(
    weight: Annotated[Optional[int], typer.Option(min=0, max=100, help="Percent of traffic.")] = None,
    shadow: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Shadow share.")] = None,
    reason: ReasonOption = "",
    url: UrlOption = "http://127.0.0.1:8000",
) -> None:
    """Set the canary's weight and/or shadow share."""
    _show(_admin("POST", url, "/admin/rollout/traffic", {"weight": weight, "shadow_share": shadow, "reason": reason}))


@rollout_app.command("promote")
def rollout_promote(reason: ReasonOption = "", url: UrlOption = "http://127.0.0.1:8000") -> None:
    """Canary becomes stable; the old stable becomes fallback."""
    _show(_admin("POST", url, "/admin/rollout/promote", {"reason": reason}))


@rollout_app.command("rollback")
def rollout_rollback(reason: ReasonOption = "", url: UrlOption = "http://127.0.0.1:8000") -> None:
    """Canary traffic to 0 and its alias dropped; right after a promotion, undo it."""
    _show(_admin("POST", url, "/admin/rollout/rollback", {"reason": reason}))


@rollout_app.command("audit")
def rollout_audit(limit: int = 20, url: UrlOption = "http://127.0.0.1:8000") -> None:
    """The latest rollout changes: when, who, why, before and after."""
    _show(_admin("GET", url, f"/admin/audit?limit={limit}"))


# --- monitoring: drift and traffic --------------------------------------------------------
drift_app = typer.Typer(no_args_is_help=True, help="Drift reports on the production log, and their reference.")
app.add_typer(drift_app, name="drift")


def _monitor(settings: Settings, with_trigger: bool = False):
    from asrops.prodlog import store_for
    from monitoring.monitor import DriftMonitor, MonitorMetrics

    store, metrics = store_for(settings), MonitorMetrics()
    on_verdict = None
    if with_trigger:
        from retrain.trigger import RetrainTrigger

        trigger = RetrainTrigger(settings, store, _registry(settings), metrics.retrain_jobs)

        def on_verdict(state, now):
            try:
                trigger.step(state, now)
            except Exception as exc:  # no Ray dashboard to submit to (a bare monitor): say so, go on
                _say(f"retrain trigger skipped: {type(exc).__name__}: {exc}")
    return DriftMonitor(store, settings.monitoring, metrics, on_verdict=on_verdict)


@app.command()
def monitor(
    bootstrap_reference: Annotated[bool, typer.Option(help="With no reference yet, make one from clean synthetic speech through the stable version.")] = False,
) -> None:
    """Run the drift monitor: one Evidently report per window, verdicts, metrics on monitor_port."""
    settings = _setup()
    drift_monitor = _monitor(settings, with_trigger=True)
    if bootstrap_reference:
        from monitoring.reference import load_reference, synthetic_reference

        if load_reference(drift_monitor.store) is None:
            synthetic_reference(drift_monitor.store, _registry(settings), settings, _say)
    drift_monitor.run_forever(say=_say)


@app.command()
def controller() -> None:
    """Run the promotion controller: steps canaries up on Prometheus checks, promotes or rolls back."""
    from prometheus_client import start_http_server

    from monitoring.prometheus import PrometheusClient
    from serve.controller import ControllerMetrics, PromotionController, prometheus_query

    settings = _setup()
    metrics = ControllerMetrics()
    start_http_server(settings.promotion.metrics_port, addr="127.0.0.1", registry=metrics.registry)
    _say(f"promotion controller: Prometheus {settings.prometheus_url}, metrics on "
         f"http://127.0.0.1:{settings.promotion.metrics_port}/metrics")
    PromotionController(_registry(settings), settings.promotion.spec(),
                        prometheus_query(PrometheusClient(settings.prometheus_url)), metrics
                        ).run_forever(settings.promotion.poll_s)


@drift_app.command("report")
def drift_report(
    window_s: Annotated[Optional[float], typer.Option(help="Window length in seconds (default: settings, 300).")] = None,
    end: Annotated[Optional[str], typer.Option(help="Window end, ISO 8601 UTC (default now).")] = None,
) -> None:
    """One drift report now: the last window of the production log against the reference.
    Prints the result as JSON (and where the HTML report is) on stdout."""
    from datetime import datetime

    settings = _setup()
    if window_s:
        settings.monitoring.drift.window_s = window_s
    try:
        outcome = _monitor(settings).run_window(datetime.fromisoformat(end) if end else None)
    except LookupError as exc:
        _say(str(exc))
        raise typer.Exit(1) from None
    if outcome.result is None:
        _say(f"only {outcome.samples} answered requests in the window (min {settings.monitoring.drift.min_samples}): "
             "no report")
    else:
        _say(f"drift report: {outcome.report_html}")
    typer.echo(outcome.model_dump_json(indent=1))


@drift_app.command("reference")
def drift_reference(
    manifest: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="A validation set (jsonl with audio) to transcribe with the stable version.")] = None,
    start: Annotated[Optional[str], typer.Option("--from", help="Pin the production window from this time (ISO 8601 UTC)...")] = None,
    stop: Annotated[Optional[str], typer.Option("--to", help="...to this time.")] = None,
    synthetic: Annotated[int, typer.Option(help="With neither: this many clean synthetic clips through the stable version.")] = 100,
) -> None:
    """Set the drift reference (stored beside the production log)."""
    from datetime import datetime

    from asrops.prodlog import store_for
    from monitoring import reference

    settings = _setup()
    store = store_for(settings)
    if start and stop:
        frame = reference.pin_window(store, datetime.fromisoformat(start), datetime.fromisoformat(stop))
    elif manifest:
        version, engine = _load_engine(settings, "stable", None, 0)
        frame = reference.from_manifest(store, manifest, engine, version, _say)
    else:
        frame = reference.synthetic_reference(store, _registry(settings), settings, _say, n=synthetic)
    typer.echo(f"reference: {len(frame)} rows")


@app.command()
def simulate(
    mix: Annotated[str, typer.Argument(help="Manifests from `asrops synth` with weights: clean/manifest.jsonl:0.8,accent/manifest.jsonl:0.2")],
    url: Annotated[str, typer.Option(help="Base URL of the running service.")] = "http://127.0.0.1:8000",
    rate: Annotated[float, typer.Option(help="Requests per second.")] = 2.0,
    count: Annotated[int, typer.Option(help="Requests to send.")] = 100,
    concurrency: Annotated[int, typer.Option(help="Most requests in flight.")] = 8,
    seed: int = 0,
    correct: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of answers corrected with the manifest's text through POST /v1/feedback.")] = 0.0,
) -> None:
    """Send synthetic speech to the service at a chosen rate and mix (stationary or drifted traffic)."""
    import os

    from monitoring.simulate import parse_mix
    from monitoring.simulate import simulate as run_simulation

    _setup()
    result = run_simulation(url, parse_mix(mix), rate, count, concurrency, os.environ.get("ASROPS_API_KEY"), seed,
                            progress=_say, correct_share=correct)
    typer.echo(result.model_dump_json(indent=1))



# --- retraining -----------------------------------------------------------------------------
retrain_app = typer.Typer(no_args_is_help=True, help="Retrain the stable version on new labelled data (Ray Train).")
app.add_typer(retrain_app, name="retrain")


@retrain_app.command("start")
def retrain_start(
    reason: Annotated[str, typer.Option(help="Why: kept with the job and the version it publishes.")] = "by hand",
    address: Annotated[Optional[str], typer.Option(help="Ray dashboard address (default RAY_ADDRESS or the local one).")] = None,
) -> None:
    """Start a retrain by hand: submitted as a Ray job to the running cluster (one at a time)."""
    from datetime import UTC, datetime

    from retrain.trigger import TriggerInputs, decide, retrain_jobs, submit_retrain

    settings = _setup()
    running = any(j.status in ("PENDING", "RUNNING") for j in retrain_jobs(address))
    decision = decide(TriggerInputs(now=datetime.now(UTC), manual=True, job_running=running), settings.retrain.trigger)
    _say(decision.log_message())
    if not decision.start:
        raise typer.Exit(1)
    typer.echo(submit_retrain(decision.cause, reason, address))


@retrain_app.command("run")
def retrain_run(
    cause: Annotated[str, typer.Option(help="What started it: manual, drift, feedback_wer or schedule.")] = "manual",
    reason: Annotated[str, typer.Option(help="Why, in words.")] = "by hand",
) -> None:
    """Run one retrain in this process (what a retrain Ray job runs): data, fine-tuning,
    evaluation gate, and publish + canary when it passes."""
    import ray

    from retrain.job import run_retrain
    from serve.launcher import init_ray

    settings = _setup()
    init_ray(settings)  # inside a Ray job: joins its cluster
    outcome = run_retrain(settings, cause, reason, _say, gpus_available=ray.cluster_resources().get("GPU", 0) > 0)
    typer.echo(outcome.model_dump_json(indent=1))
    if not outcome.passed:
        raise typer.Exit(2)


@retrain_app.command("status")
def retrain_status(address: Annotated[Optional[str], typer.Option(help="Ray dashboard address.")] = None) -> None:
    """Retrain jobs the cluster knows, with their states."""
    from retrain.trigger import retrain_jobs

    _setup()
    for job in retrain_jobs(address):
        typer.echo(job.model_dump_json())


if __name__ == "__main__":
    app()
