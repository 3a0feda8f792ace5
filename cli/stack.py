"""What `asrops serve` starts, and how the processes are wired together.

On one machine: Ray and Serve (the ingress and one model application per version the rollout
references) and beside them, started first, the drift monitor (`asrops monitor`, whose verdicts go to the
retrain trigger), the promotion controller (`asrops controller`) and a local Prometheus that
scrapes Ray's nodes, the monitor and the controller. All of it stops with `asrops serve`.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import typer

from asrops.monitoring.dashboards import DASHBOARD_FILE
from asrops.monitoring.monitor import DriftMonitor, MonitorMetrics
from asrops.monitoring.prometheus import ALERT_RULES_FILE, PrometheusServer
from asrops.prodlog import store_for
from asrops.registry import ModelRegistry
from asrops.settings import Settings, env_var

log = logging.getLogger(__name__)

SIDE_PROCESS = [sys.executable, "-m", "asrops.cli"]
"""How a side process is started: the `asrops` command of this same interpreter."""


@dataclass
class MonitoringStack:
    prometheus: PrometheusServer | None = None
    monitor: subprocess.Popen | None = None
    controller: subprocess.Popen | None = None
    notes: list[str] = field(default_factory=list)
    """What to tell the operator: where each part is."""

    def stop(self) -> None:
        for process in (self.controller, self.monitor):
            if process and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
        if self.prometheus:
            self.prometheus.stop()


def start_monitoring(settings: Settings, say: Callable[[str], None] = log.info) -> MonitoringStack:
    """Start the drift monitor (a process of its own: `asrops monitor`), the promotion controller
    (`asrops controller`) and, when enabled and installed, a local Prometheus scraping Ray's
    nodes, the monitor and the controller."""
    m = settings.monitoring
    stack = MonitoringStack()
    background = functools.partial(os.nice, m.background_niceness)  # serving comes first
    bootstrap = ["--bootstrap-reference"] if m.drift.bootstrap_reference else []
    stack.monitor = subprocess.Popen([*SIDE_PROCESS, "monitor", *bootstrap], preexec_fn=background)
    stack.notes.append(f"drift monitor: metrics at http://127.0.0.1:{m.monitor_port}/metrics, reports under "
                       f"{settings.production_log_uri}/drift-reports/ (open the .html in a browser)")
    if settings.promotion.enabled:
        stack.controller = subprocess.Popen([*SIDE_PROCESS, "controller"], preexec_fn=background)
        stack.notes.append(f"promotion controller: steps canaries up on Prometheus checks ({settings.prometheus_url}); "
                           "`asrops rollout status` shows its phase and checks")
    if not m.prometheus_enabled:
        stack.notes.append("prometheus: disabled (ASROPS_MONITORING__PROMETHEUS_ENABLED=false)")
    elif shutil.which(m.prometheus_binary) is None:
        stack.notes.append(f"prometheus: '{m.prometheus_binary}' not found; apt-get install prometheus")
    else:
        say("starting Prometheus")
        stack.prometheus = PrometheusServer(settings, settings.data_dir / "prometheus").start()
        stack.notes.append(f"prometheus: {stack.prometheus.url} (alert rules {ALERT_RULES_FILE}; "
                           f"Grafana dashboard to import: {DASHBOARD_FILE})")
    return stack


def make_first_reference(settings: Settings, say: Callable[[str], None] = log.info) -> None:
    """A fresh install has no drift reference: make it before Ray starts, from clean synthetic
    speech through the stable version (importing the embedded default first), at full speed
    and never beside clients. Made in the monitor while clients were served, it slowed the
    first benchmark after an install (c=1 p95 1.26 s against p50 0.55 s). Stopped half way,
    the next start resumes it (monitoring/reference.py)."""
    from asrops.models.importer import import_embedded_default
    from asrops.monitoring.reference import load_reference, synthetic_reference

    registry = ModelRegistry.from_settings(settings)
    import_embedded_default(registry, progress=say)
    store = store_for(settings)
    if load_reference(store) is None:
        started = time.monotonic()
        synthetic_reference(store, registry, settings, say)
        say(f"drift reference made in {time.monotonic() - started:.0f} s, before serving")


def ports_to_bind(settings: Settings) -> dict[str, int]:
    """What `run_service` will listen on, each named with the setting that moves it."""
    from asrops.raycluster import joining_a_cluster

    s, m = settings.serve, settings.monitoring
    ports = {f"the API ({env_var('serve', 'port')}, or --port)": s.port,
             f"the drift monitor's /metrics ({env_var('monitoring', 'monitor_port')})": m.monitor_port}
    if s.admin_port:
        ports[f"the admin API ({env_var('serve', 'admin_port')})"] = s.admin_port
    if settings.promotion.enabled:
        ports[f"the promotion controller's /metrics ({env_var('promotion', 'metrics_port')})"] = \
            settings.promotion.metrics_port
    if m.prometheus_enabled and shutil.which(m.prometheus_binary):
        ports[f"Prometheus ({env_var('monitoring', 'prometheus_port')})"] = m.prometheus_port
    if not joining_a_cluster():  # the local Ray cluster this starts
        ports[f"Ray's metrics endpoint ({env_var('monitoring', 'ray_metrics_port')})"] = m.ray_metrics_port
        if s.proxy_port:
            ports[f"Serve's proxy ({env_var('serve', 'proxy_port')})"] = s.proxy_port
    return ports


def refuse_busy_ports(settings: Settings) -> None:
    """Stop at once, naming each taken port and its setting, before minutes of set-up end in an
    error that names neither (asrops/ports.py)."""
    from ray._private.ray_constants import DEFAULT_DASHBOARD_PORT

    from asrops.ports import port_in_use, ports_in_use
    from asrops.raycluster import joining_a_cluster

    if not joining_a_cluster() and port_in_use(DEFAULT_DASHBOARD_PORT):  # Ray moves on by itself
        log.warning("port %d is in use (another Ray?): our Ray's dashboard takes the next free one, and "
                    "retrains go to the Jobs API at %s, whichever Ray that is", DEFAULT_DASHBOARD_PORT,
                    settings.retrain.trigger.jobs_address)
    busy = ports_in_use(ports_to_bind(settings))
    if busy:
        lines = "\n".join(f"  {port:>5}  {what}" for what, port in busy.items())
        typer.echo(f"asrops serve cannot start: these ports on 127.0.0.1 are in use (another asrops serve, "
                   f"another Ray, another program):\n{lines}\nStop what holds them (`ss -ltnp` names it) or "
                   "move ours with the setting named.", err=True)
        raise typer.Exit(1)


def run_service(settings: Settings, config: Path | None = None, say: Callable[[str], None] = typer.echo) -> None:
    """The service and everything beside it, until Ctrl-C or SIGTERM."""
    import ray
    from ray import serve

    from asrops.raycluster import lower_ray_background_priority
    from asrops.serve.launcher import VersionReconciler, curl_example, run_config, run_local

    refuse_busy_ports(settings)
    if not config and settings.monitoring.drift.bootstrap_reference:
        make_first_reference(settings, say)
    # The side processes start first: their start-up (a few CPU-seconds of imports each) then
    # overlaps Ray's, not the first clients' requests (it took 0.4 of a core during the first
    # benchmark loop when they started after the service was ready).
    stack = start_monitoring(settings, say)
    try:
        url = run_config(settings, config, say) if config else run_local(settings, say)
        lower_ray_background_priority(settings.monitoring.background_niceness)  # and this driver's
        typer.echo(f"asrops is serving at {url}  (OpenAI API at {url}/v1, docs at {url}/docs)")
        typer.echo(f"try:  {curl_example(url, settings)}")
        for note in stack.notes:
            typer.echo(note)
        typer.echo("Ctrl-C stops it.")
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as Ctrl-C does
        if config:  # the config file says which applications run
            while True:
                time.sleep(3600)
        # Deploys versions the rollout starts referencing (a new canary) and removes old ones.
        VersionReconciler(settings, ModelRegistry.from_settings(settings)).run_forever(say=say)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        if ray.is_initialized():  # not when Ray failed to start (shutdown would start one)
            serve.shutdown()


def drift_monitor(settings: Settings, with_trigger: bool = False,
                  say: Callable[[str], None] = log.info) -> DriftMonitor:
    """The drift monitor over the production log; with the trigger, each verdict goes on to the
    retrain trigger (which decides, logs why, and submits a Ray job)."""
    store, metrics = store_for(settings), MonitorMetrics()
    on_verdict = None
    if with_trigger:
        from asrops.retrain.trigger import RetrainTrigger

        trigger = RetrainTrigger(settings, store, ModelRegistry.from_settings(settings), metrics.retrain_jobs)

        def on_verdict(state: str, now: datetime) -> None:
            try:
                trigger.step(state, now)
            except Exception as exc:  # no Ray dashboard to submit to (a bare monitor): say so, go on
                say(f"retrain trigger skipped: {type(exc).__name__}: {exc}")
    return DriftMonitor(store, settings.monitoring, metrics, on_verdict=on_verdict)
