"""Start the whole service locally: Ray, Serve's HTTP proxy, the stable version's model
application, and the ingress. `asrops serve` and the README's run command use this."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from ray import serve

from asrops.models.importer import import_embedded_default
from asrops.raycluster import init_ray, serves_clients_directly
from asrops.registry import ModelRegistry, referenced_versions
from asrops.serve.ingress import StatusSchedule, ingress_deployment
from asrops.serve.model_server import model_app_name, model_deployment
from asrops.serve.ray_shims import WORKER_SETUP_HOOK
from asrops.settings import Settings

log = logging.getLogger(__name__)

INGRESS_APP = "asrops"


def start_ray(settings: Settings) -> None:
    """Ray, and Serve's HTTP proxy on the configured host (`proxy_http_options`)."""
    init_ray(settings, WORKER_SETUP_HOOK)
    serve.start(http_options=proxy_http_options(settings, {"host": settings.serve.host, "port": settings.serve.port}))


def proxy_http_options(settings: Settings, http_options: dict) -> dict:
    """Serve's proxy on the service's port, or, when the ingress replica answers clients there
    itself (direct ingress, a local cluster), on `serve.proxy_port` (a free one when unset).
    Both ways of starting the service (`run_local`, `run_config`) go through here, so here is
    where more than one ingress replica, which could not share that port, is refused."""
    if not serves_clients_directly():
        return http_options
    if settings.serve.ingress_replicas > 1:
        raise ValueError(f"ASROPS_SERVE__INGRESS_REPLICAS={settings.serve.ingress_replicas} on a local cluster: one "
                         f"ingress replica answers on port {settings.serve.port} itself (direct ingress). Run one, or "
                         "set RAY_SERVE_ENABLE_DIRECT_INGRESS=0 to run several behind Serve's proxy.")
    return {**http_options, "port": settings.serve.proxy_port or 0}


def deploy_version(settings: Settings, version_id: str, app_name: str | None = None) -> str:
    """Deploy (or update) the model application of one version and wait until it is warm."""
    name = app_name or model_app_name(version_id)
    serve.run(model_deployment(version_id, settings), name=name, route_prefix=None)
    return name


class VersionReconciler:
    """Keeps one model application running per version the rollout references (stable,
    canary, fallback): a new one is deployed and warm (Serve waits for its health check)
    before the ingress sees it RUNNING and routes to it; one no longer referenced is deleted
    after `serve.drain_s`, by which time the ingress has long stopped sending it requests, and Serve's
    graceful shutdown lets its in-flight requests finish."""

    def __init__(self, settings: Settings, registry: ModelRegistry):
        self.settings, self.registry, self.drain_s = settings, registry, settings.serve.drain_s
        self._unreferenced_since: dict[str, float] = {}
        self._deployed: set[str] | None = None  # what Serve's last status read showed, when settled
        self._statuses = StatusSchedule(settings.serve.status_resync_s)

    def wanted(self) -> set[str]:
        return referenced_versions(self.registry.read_aliases().value, self.registry.read_rollout().value)

    def step(self, say: Callable[[str], None] = log.info) -> None:
        wanted = self.wanted()
        if not self._statuses.due(self._deployed, wanted):
            return  # nothing to deploy or remove, as of Serve's last status
        deployed = {name.removeprefix("model-"): name for name in serve.status().applications
                    if name.startswith("model-")}
        # Settled only when this read found nothing to deploy or remove: after a deploy, or while
        # an unreferenced version drains, the next pass reads Serve's status again.
        self._deployed = wanted if set(deployed) == wanted else None
        for version in sorted(wanted - set(deployed)):
            say(f"deploying model {version} (referenced by the rollout)")
            deploy_version(self.settings, version)
            say(f"model {version} is warm and serving")
        now = time.monotonic()
        for version, name in deployed.items():
            if version in wanted:
                self._unreferenced_since.pop(version, None)
            elif now - self._unreferenced_since.setdefault(version, now) >= self.drain_s:
                say(f"removing model {version}: unreferenced for {self.drain_s:.0f} s")
                serve.delete(name, _blocking=False)
                self._unreferenced_since.pop(version)

    def run_forever(self, interval_s: float = 2.0, say: Callable[[str], None] = log.info,
                    stop: threading.Event | None = None) -> None:
        """A pass every `interval_s` until `stop` is set (never, without one); a failed pass (a
        deploy that failed, e.g. a version whose files fail their checksums) is retried."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.step(say)
            except Exception:
                log.exception("version reconciliation failed; retrying in %.0f s", interval_s)
            stop.wait(interval_s)

    def in_background(self, interval_s: float = 2.0, say: Callable[[str], None] = log.info) -> threading.Event:
        """`run_forever` in a daemon thread; set the returned event to stop it."""
        stop = threading.Event()
        threading.Thread(target=self.run_forever, args=(interval_s, say, stop), name="version-reconciler",
                         daemon=True).start()
        return stop


def deploy_ingress(settings: Settings) -> None:
    serve.run(ingress_deployment(settings), name=INGRESS_APP, route_prefix="/")


def wait_ready(settings: Settings, timeout_s: float = 120.0) -> None:
    """Block until /readyz answers 200 (the ingress has seen the stable model running)."""
    import urllib.error
    import urllib.request

    url = f"http://{settings.serve.host}:{settings.serve.port}/readyz"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready within {timeout_s:.0f} s")


def run_local(settings: Settings, say: Callable[[str], None] = log.info) -> str:
    """Bring the service up on the embedded defaults; returns its base URL."""
    registry = ModelRegistry.from_settings(settings)
    import_embedded_default(registry, progress=say)
    say("starting Ray and Serve")
    start_ray(settings)
    VersionReconciler(settings, registry).step(say)  # stable (and any canary/fallback) before traffic
    deploy_ingress(settings)
    wait_ready(settings)
    return f"http://{settings.serve.host}:{settings.serve.port}"


def run_config(settings: Settings, config_path: Path, say: Callable[[str], None] = log.info) -> str:
    """Deploy the applications of a Serve config file (the `serve deploy` schema) through the
    same builders the file names, so the local run and a cluster run the same code."""
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(config_path.read_text()))
    init_ray(settings, WORKER_SETUP_HOOK)
    from ray.serve._private.api import (
        serve_start,  # what `serve run CONFIG` itself calls
    )

    say(f"deploying {len(config.applications)} applications from {config_path}")
    http_options = proxy_http_options(settings, config.http_options.model_dump())
    serve_start(http_options=http_options).deploy_apps(config, _blocking=True)
    wait_ready(settings)
    return f"http://{settings.serve.host}:{settings.serve.port}"


def curl_example(url: str, settings: Settings) -> str:
    sample = settings.speech_data_dir / "faster_whisper" / "jfk.flac" if settings.speech_data_dir else None
    path = str(sample) if sample and sample.exists() else "speech.wav"
    return f"curl {url}/v1/audio/transcriptions -F file=@{path} -F model=whisper-1"
