"""The ingress deployment: the HTTP API in front of the per-version model applications.

It keeps a view of the registry's aliases and of which model applications are running,
refreshed every few seconds off the request path, and forwards each request to the model
application of the version it resolves to.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from ray import serve
from ray.serve.exceptions import BackPressureError

from asrops.engines.types import DecodeOptions
from asrops.errors import VersionNotFoundError
from asrops.registry import ALIAS_NAMES, Aliases, ModelRegistry
from asrops.settings import Settings, load_settings
from serve.api import TranscribeResult, build_api
from serve.errors import INTERNAL, OVERLOADED, UNAVAILABLE, ApiError
from serve.model_server import ModelRequest

log = logging.getLogger("asrops.serve.ingress")

REFRESH_S = 2.0  # how often aliases and running model applications are re-read


class ServeTranscriber:
    """`Transcriber` over Serve model applications, one per version."""

    def __init__(self, registry: ModelRegistry, settings: Settings):
        self.registry = registry
        self.settings = settings
        self.aliases = Aliases()
        self.apps: dict[str, str] = {}  # version id → name of the model application serving it
        self._app_versions: dict[str, tuple[str, float]] = {}  # app name → (version, deployed at)
        self._handles: dict[str, object] = {}  # app name → handle (a lookup asks the Serve controller)

    async def refresh(self) -> None:
        """Re-read aliases and which version each RUNNING `model-*` application serves.
        On a registry failure the last good view is kept: loaded models keep serving."""
        try:
            self.aliases = (await asyncio.to_thread(self.registry.read_aliases)).value
        except Exception:
            log.warning("registry unreachable; keeping aliases %s", self.aliases, exc_info=True)
        statuses = (await asyncio.to_thread(serve.status)).applications
        apps = {
            name: app.last_deployed_time_s for name, app in statuses.items()
            if name.startswith("model-") and app.status == "RUNNING"
        }
        for name, deployed_at in apps.items():
            if self._app_versions.get(name, (None, None))[1] != deployed_at:
                version = await serve.get_app_handle(name).version.remote()
                self._app_versions[name] = (version, deployed_at)
        self._app_versions = {n: v for n, v in self._app_versions.items() if n in apps}
        self._handles = {n: h for n, h in self._handles.items() if n in apps}
        self.apps = {version: name for name, (version, _) in self._app_versions.items()}

    @property
    def running(self) -> set[str]:
        return set(self.apps)

    def resolve(self, model: str) -> str:
        if model in ALIAS_NAMES:
            version = getattr(self.aliases, model)
            if version is None:
                raise VersionNotFoundError(f"No version is {model} right now. Known models: {', '.join(self.model_names())}.")
            return version
        if model in self.running:
            return model
        raise VersionNotFoundError(
            f"Model {model!r} is not served here. Use 'whisper-1' or one of: {', '.join(self.model_names())}."
        )

    def model_names(self) -> list[str]:
        aliases = [name for name in ALIAS_NAMES if getattr(self.aliases, name) in self.running]
        return aliases + sorted(self.running)

    def ready(self) -> bool:
        return self.aliases.stable is not None and self.aliases.stable in self.running

    def _handle(self, version: str):
        name = self.apps[version]
        if name not in self._handles:
            self._handles[name] = serve.get_app_handle(name)
        return self._handles[name]

    async def transcribe(self, model: str, audio: np.ndarray, options: DecodeOptions, client: str) -> TranscribeResult:
        version = self.resolve(model)
        if version not in self.running:
            raise ApiError(UNAVAILABLE, f"Version {version} is not running yet; retry shortly.",
                           headers={"Retry-After": str(self.settings.serve.retry_after_s)})
        try:
            reply = await self._handle(version).transcribe.remote(ModelRequest(audio=audio, options=options))
        except BackPressureError:
            raise ApiError(OVERLOADED, "The service is at capacity; retry after the time in Retry-After.",
                           headers={"Retry-After": str(self.settings.serve.retry_after_s)}) from None
        if reply.error:
            raise ApiError(INTERNAL, f"Version {version} could not transcribe this audio ({reply.error}).")
        route = "explicit" if model not in ALIAS_NAMES else model
        return TranscribeResult(transcription=reply.transcription, version=reply.version, route=route,
                                batch_size=reply.batch_size)


@serve.deployment(name="ingress", health_check_period_s=5)
@serve.ingress()
class Ingress:
    def __init__(self, settings_json: str | None = None):
        self.settings = Settings.model_validate_json(settings_json) if settings_json else load_settings()
        self.transcriber = ServeTranscriber(ModelRegistry.from_settings(self.settings), self.settings)
        self._refresher = asyncio.get_event_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.transcriber.refresh()
            except Exception:
                log.warning("refresh failed", exc_info=True)
            log.debug("refresh took %.3f s", time.monotonic() - started)
            await asyncio.sleep(REFRESH_S)

    def __serve_build_asgi_app__(self):
        from ray.serve.context import _get_serve_request_context

        return build_api(self.transcriber, self.settings, lambda: _get_serve_request_context().request_id)


def ingress_deployment(settings: Settings):
    return Ingress.options(
        num_replicas=settings.serve.ingress_replicas,
        max_ongoing_requests=settings.serve.ingress_max_ongoing_requests,
        # Mostly waiting on model replicas: reserving a whole CPU would leave a 2-core node no
        # room for a second model version (canary).
        ray_actor_options={"num_cpus": 0},
    ).bind(settings.model_dump_json())


def build_ingress_app(args: dict) -> serve.Application:
    """Serve config entry point: `import_path: serve.ingress:build_ingress_app`."""
    return ingress_deployment(load_settings())
