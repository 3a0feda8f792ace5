"""The ingress deployment: the HTTP API in front of the per-version model applications.

It keeps a view of the registry's aliases and of which model applications are running,
refreshed every few seconds off the request path, and forwards each request to the model
application of the version it resolves to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import numpy as np
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from asrops.engines.types import DecodeOptions
from asrops.errors import VersionNotFoundError
from asrops.evaluation import score
from asrops.feedback import RecentRequests
from asrops.prodlog import ProductionLogWriter, store_for
from asrops.raycluster import idle_own_task_loop
from asrops.registry import ALIAS_NAMES, Aliases, ModelRegistry, RolloutState, referenced_versions
from asrops.serve.admin import build_admin, serve_admin
from asrops.serve.api import SegmentsDecoded, TranscribeResult, build_api
from asrops.serve.breaker import CircuitBreaker
from asrops.serve.errors import INTERNAL, OVERLOADED, UNAVAILABLE, ApiError
from asrops.serve.feedback import FeedbackRecorder
from asrops.serve.metrics import BREAKER_VALUE, IngressMetrics
from asrops.serve.model_server import ModelReply, ModelRequest, PartialReply
from asrops.serve.ray_shims import warnings_to_console
from asrops.serve.routing import Route, RoutePlan, plan_route
from asrops.serve.telemetry import RequestTelemetry
from asrops.settings import Settings, load_settings

log = logging.getLogger(__name__)

SILENT_APP_BACKOFF_S = 30.0
"""A model application that did not say its version is not asked again for this long, so that
it delays no routing change (a rollback included) more than once."""

REPLICA_DEATH_RETRIES = 2
REPLICA_DIED = (RayActorError, ActorUnavailableError)


class StatusSchedule:
    """When to read Serve's application statuses, which cost about 50 ms of CPU a read (each
    deployment's router config is cloudpickled): whenever the versions running differ from those
    the rollout references (one to deploy or route to, or one to remove), else every `resync_s`.
    Shared by the ingress and the version reconciler, which both polled it every 2 s."""

    def __init__(self, resync_s: float):
        self.resync_s = resync_s
        self._due_at = 0.0

    def due(self, running: set[str] | None, referenced: set[str]) -> bool:
        now = time.monotonic()
        if running == referenced and now < self._due_at:
            return False
        self._due_at = now + self.resync_s
        return True


class ServeTranscriber:
    """`Transcriber` over Serve model applications, one per version, routed by the rollout state."""

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: IngressMetrics | None = None):
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.aliases = Aliases()
        self.rollout = RolloutState()
        self.apps: dict[str, str] = {}  # version id → name of the model application serving it
        self._app_versions: dict[str, tuple[str, float]] = {}  # app name → (version, deployed at)
        self._handles: dict[str, object] = {}  # app name → handle (a lookup asks the Serve controller)
        self.breakers: dict[str, CircuitBreaker] = {}
        self.stats = RoutingStats()
        self._shadow_tasks: set[asyncio.Task] = set()
        self._former_canaries: set[str] = set()
        self._ask_again_at: dict[str, float] = {}  # model applications that did not say their version
        self._statuses = StatusSchedule(settings.serve.status_resync_s)

    async def refresh(self) -> None:
        """Re-read aliases, rollout state and which version each RUNNING `model-*` application
        serves (the applications as `StatusSchedule` says). On a registry failure the last good view
        is kept: loaded models keep serving."""
        try:
            aliases = (await asyncio.to_thread(self.registry.read_aliases)).value
            rollout = (await asyncio.to_thread(self.registry.read_rollout)).value
            if (aliases, rollout) != (self.aliases, self.rollout):
                log.info("routing changed: aliases %s -> %s; rollout %s -> %s",
                         self.aliases.model_dump(), aliases.model_dump(),
                         self.rollout.model_dump(exclude={"updated_at"}), rollout.model_dump(exclude={"updated_at"}))
            self.aliases, self.rollout = aliases, rollout
        except Exception:
            log.warning("registry unreachable; keeping aliases %s", self.aliases, exc_info=True)
        if not self._statuses.due(set(self.apps), referenced_versions(self.aliases, self.rollout)):
            self._export_gauges()
            return
        statuses = (await asyncio.to_thread(serve.status)).applications
        # An application gets traffic once it has been RUNNING (loaded and warm) and keeps it
        # while it exists: a replica that died and is being replaced makes it UNHEALTHY or
        # DEPLOYING for a while, and Serve holds requests until a replica is back.
        apps = {
            name: app.last_deployed_time_s for name, app in statuses.items()
            if name.startswith("model-") and (
                app.status == "RUNNING" or (name in self._app_versions and app.status in ("DEPLOYING", "UNHEALTHY")))
        }
        now = time.monotonic()
        to_ask = [name for name, deployed_at in apps.items()
                  if ((known := self._app_versions.get(name)) is None
                      or (known[1] != deployed_at and statuses[name].status == "RUNNING"))  # new, or redeployed
                  and self._ask_again_at.get(name, 0.0) <= now]
        answers = await asyncio.gather(*(self._version_of(name) for name in to_ask))  # together: one
        for name, version in zip(to_ask, answers, strict=True):  # silent app delays the others by nothing
            if version is None:
                self._ask_again_at[name] = now + SILENT_APP_BACKOFF_S
            else:
                self._ask_again_at.pop(name, None)
                self._app_versions[name] = (version, apps[name])
        self._app_versions = {n: v for n, v in self._app_versions.items() if n in apps}
        self._ask_again_at = {n: t for n, t in self._ask_again_at.items() if n in apps}
        self._handles = {n: h for n, h in self._handles.items() if n in apps}
        self.apps = {version: name for name, (version, _) in self._app_versions.items()}
        self._export_gauges()

    async def _version_of(self, name: str) -> str | None:
        """The version a model application serves; None when it does not say so in time."""
        try:
            return await asyncio.wait_for(_await(serve.get_app_handle(name).version.remote()),
                                          self.settings.serve.control_timeout_s)
        except TimeoutError:
            log.warning("model application %s did not say its version within %.0f s; asked again in %.0f s",
                        name, self.settings.serve.control_timeout_s, SILENT_APP_BACKOFF_S)
            return None

    def _export_gauges(self) -> None:
        """Breaker states and the canary's traffic, as gauges (refreshed with the routing view)."""
        if not self.metrics:
            return
        for version in self.running | set(self.breakers):
            self.metrics.breaker.set(BREAKER_VALUE[self.breaker(version).state], tags={"model_version": version})
        if canary := self.rollout.canary_version:
            self.metrics.canary_weight.set(self.rollout.canary_weight, tags={"model_version": canary})
            self.metrics.shadow_share.set(self.rollout.shadow_share, tags={"model_version": canary})
        for version in self._former_canaries - {canary}:
            self.metrics.canary_weight.set(0, tags={"model_version": version})
            self.metrics.shadow_share.set(0, tags={"model_version": version})
        self._former_canaries = {canary} if canary else set()

    @property
    def running(self) -> set[str]:
        return set(self.apps)

    def resolve(self, model: str) -> str:
        """The version a model name means, before any canary split (`stable` is the stable)."""
        return self._plan(model, "", "", RolloutState()).version

    def _plan(self, model: str, client: str, request_id: str, rollout: RolloutState | None = None) -> RoutePlan:
        try:
            return plan_route(model, self.aliases, rollout or self.rollout, client, request_id, self.running)
        except VersionNotFoundError as exc:
            if model in ALIAS_NAMES and getattr(self.aliases, model):  # named, just not up (yet)
                raise ApiError(UNAVAILABLE, f"The {model} version ({getattr(self.aliases, model)}) is not running "
                               "yet; retry shortly.",
                               headers={"Retry-After": str(self.settings.serve.retry_after_s)}) from None
            raise VersionNotFoundError(f"{exc} Use 'whisper-1' or one of: {', '.join(self.model_names())}.") from None

    def model_names(self) -> list[str]:
        aliases = [name for name in ALIAS_NAMES if getattr(self.aliases, name) in self.running]
        return aliases + sorted(self.running)

    def ready(self) -> bool:
        return self.aliases.stable is not None and self.aliases.stable in self.running

    def serving(self) -> dict:
        """What this ingress sees and has counted, for the admin API."""
        return {
            "running": sorted(self.running),
            "breakers": {v: {"state": b.state.value, "error_ratio": round(b.error_ratio(), 3)}
                         for v, b in self.breakers.items()},
            "routes": dict(self.stats.routes),
            "fallbacks": self.stats.fallbacks,
            "shadow_compared": self.stats.shadow_compared,
            "shadow_mean_wer": (self.stats.shadow_wer_sum / self.stats.shadow_compared
                                if self.stats.shadow_compared else None),
        }

    def breaker(self, version: str) -> CircuitBreaker:
        if version not in self.breakers:
            self.breakers[version] = CircuitBreaker(self.settings.serve.breaker)
        return self.breakers[version]

    def _handle(self, version: str):
        name = self.apps[version]
        if name not in self._handles:
            self._handles[name] = serve.get_app_handle(name)
        return self._handles[name]

    async def transcribe(self, model: str, audio: np.ndarray, options: DecodeOptions, client: str,
                         request_id: str) -> TranscribeResult:
        plan = self._plan(model, client, request_id)
        request = ModelRequest.of(audio, options)
        version, route, reply = await self._first_answer(plan, request, request_id, self._call)
        self.breaker(version).record(failed=False)
        if plan.shadow and route is Route.SHADOW:
            self._start_shadow(plan.shadow, request, reply.transcription.text, request_id)
        self.stats.count(route)
        log.info("request %s: answered by %s via route %s", request_id, reply.version, route.value)
        return TranscribeResult(transcription=reply.transcription, version=reply.version, route=route.value,
                                batch_size=reply.batch_size, engine_s=reply.engine_s)

    async def transcribe_stream(self, model: str, audio: np.ndarray, options: DecodeOptions, client: str,
                                request_id: str) -> AsyncIterator[SegmentsDecoded | TranscribeResult]:
        """`transcribe`, streamed: routing and fallback are the same up to a version's first event
        (nothing has reached the client yet); a failure after it ends the stream by raising."""
        plan = self._plan(model, client, request_id)
        request = ModelRequest.of(audio, options)
        version, route, (first, rest) = await self._first_answer(plan, request, request_id, self._open_stream)
        self.stats.count(route)
        log.info("request %s: streamed by %s via route %s", request_id, version, route.value)
        finished = False
        try:
            event = first
            while isinstance(event, PartialReply):
                yield SegmentsDecoded(segments=event.segments, version=event.version, route=route.value)
                event = await anext(rest)
            if event.error:
                raise ModelFailed(event.error)
            finished = True
        except Exception:  # the version's fault (a client that goes away is not: GeneratorExit)
            self.breaker(version).record(failed=True)
            raise
        finally:
            if not finished:
                rest.cancel()
        self.breaker(version).record(failed=False)
        yield TranscribeResult(transcription=event.transcription, version=event.version, route=route.value,
                               batch_size=event.batch_size, engine_s=event.engine_s)

    async def _first_answer(self, plan: RoutePlan, request: ModelRequest, request_id: str, ask):
        """(version, route, answer) from the first version in the plan's line that answers
        `ask(version, request, timeout_s)`: a version whose breaker is open is skipped unless it is
        the last one left; one that fails, hangs or lost its replicas hands over to the next."""
        chain = [(plan.version, plan.route), *plan.fallbacks]
        for i, (version, route) in enumerate(chain):
            last = i == len(chain) - 1
            if not self.breaker(version).allow() and not last:
                if self.metrics:
                    self.metrics.breaker_skips.inc(1, tags={"model_version": version, "route": route.value})
                continue
            try:
                return version, route, await ask(version, request, None if last else self._timeout(request))
            except BackPressureError:
                if last:
                    raise ApiError(OVERLOADED, "The service is at capacity; retry after the time in Retry-After.",
                                   headers={"Retry-After": str(self.settings.serve.retry_after_s)}) from None
                continue
            except Exception as exc:  # the version raised, hung or lost its replicas: next in line
                self.breaker(version).record(failed=True)
                log.warning("request %s: version %s (route %s) failed (%s: %s); %s", request_id, version, route,
                            type(exc).__name__, exc, "no fallback left" if last else "falling back")
                if last and isinstance(exc, REPLICA_DIED):
                    raise ApiError(UNAVAILABLE, f"Version {version} lost its replica; retry shortly.",
                                   headers={"Retry-After": str(self.settings.serve.retry_after_s)}) from None
                if last:
                    raise ApiError(INTERNAL, f"Version {version} could not transcribe this audio.") from None
                self.stats.fallbacks += 1
                if self.metrics:
                    self.metrics.fallbacks.inc(1, tags={"model_version": version, "route": route.value})
        raise AssertionError("unreachable: the last version in line either answers or raises")

    async def _open_stream(self, version: str, request: ModelRequest, timeout_s: float | None):
        """A version's stream and its first event (a failure before it can still fall back)."""
        if version not in self.running:
            raise VersionUnavailable(f"version {version} is not running")
        stream = self._handle(version).options(stream=True).transcribe_stream.remote(request)
        try:
            first = await asyncio.wait_for(anext(stream), timeout_s)
        except BaseException:
            stream.cancel()
            raise
        if isinstance(first, ModelReply) and first.error:
            raise ModelFailed(first.error)
        return first, stream

    def _timeout(self, request: ModelRequest) -> float:
        """How long a version with somewhere to fall back to gets: longer for longer audio."""
        s = self.settings.serve
        return s.canary_timeout_s + request.duration_s * s.canary_timeout_per_audio_s

    async def _call(self, version: str, request: ModelRequest, timeout_s: float | None) -> ModelReply:
        """One version's answer. A replica that dies mid-request is retried: Serve sends the
        retry to a live replica, or holds it until the dead one has been replaced."""
        for attempt in range(REPLICA_DEATH_RETRIES + 1):
            try:
                return await self._call_once(version, request, timeout_s)
            except REPLICA_DIED as exc:
                if attempt == REPLICA_DEATH_RETRIES:
                    raise
                log.warning("a replica of %s died under a request (%s); retrying", version, type(exc).__name__)
                await asyncio.sleep(0.5 * (attempt + 1))  # give Serve time to notice the death
        raise AssertionError("unreachable")

    async def _call_once(self, version: str, request: ModelRequest, timeout_s: float | None) -> ModelReply:
        if version not in self.running:
            raise VersionUnavailable(f"version {version} is not running")
        response = self._handle(version).transcribe.remote(request)
        try:
            reply = await asyncio.wait_for(_await(response), timeout_s)
        except TimeoutError:
            response.cancel()
            raise
        if reply.error:
            raise ModelFailed(reply.error)
        return reply

    def _start_shadow(self, version: str, request: ModelRequest, answered: str, request_id: str) -> None:
        """Send a copy to `version` off the response path and record how far its text is from
        the answer (WER of shadow against the version that answered): a label-free signal."""
        if not self.breaker(version).allow():
            return

        async def shadow() -> None:
            try:
                reply = await self._call(version, request, self._timeout(request))
            except Exception as exc:
                self.breaker(version).record(failed=not isinstance(exc, BackPressureError))
                log.info("request %s: shadow %s failed (%s)", request_id, version, type(exc).__name__)
                return
            self.breaker(version).record(failed=False)
            disagreement = score([answered], [reply.transcription.text]).wer
            self.stats.record_shadow(disagreement)
            if self.metrics and disagreement is not None:
                self.metrics.shadow_disagreement.observe(disagreement / 100, tags={"model_version": version})
            log.info("request %s: shadow %s disagreement %.1f %% WER", request_id, version, disagreement or 0.0)

        task = asyncio.get_running_loop().create_task(shadow())
        self._shadow_tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._shadow_tasks.discard)


async def _await(response):
    return await response


class VersionUnavailable(RuntimeError):
    """The routed version has no running model application (yet, or any more)."""


class ModelFailed(RuntimeError):
    """The model replica answered with an error for this request."""


class RoutingStats:
    """Counters the routing layer keeps until the monitoring issue exports them as metrics."""

    def __init__(self):
        self.routes: dict[str, int] = {}
        self.fallbacks = 0
        self.shadow_compared = 0
        self.shadow_wer_sum = 0.0

    def count(self, route: Route) -> None:
        self.routes[route.value] = self.routes.get(route.value, 0) + 1

    def record_shadow(self, wer: float | None) -> None:
        if wer is not None:
            self.shadow_compared += 1
            self.shadow_wer_sum += wer


@serve.deployment(name="ingress", health_check_period_s=5)
@serve.ingress()
class Ingress:
    def __init__(self, settings_json: str | None = None):
        warnings_to_console()
        self.settings = Settings.model_validate_json(settings_json) if settings_json else load_settings()
        self.metrics = IngressMetrics()
        self.transcriber = ServeTranscriber(ModelRegistry.from_settings(self.settings), self.settings, self.metrics)
        log_settings = self.settings.monitoring.production_log
        self.production_log = ProductionLogWriter(
            lambda: store_for(self.settings), log_settings, on_event=self.metrics.production_log_event,
            niceness=self.settings.monitoring.background_niceness,
        ) if log_settings.enabled else None
        self.recent = RecentRequests(log_settings.recent_requests, log_settings.recent_audio_s)
        self._refresher = asyncio.get_event_loop().create_task(self._refresh_forever())
        if (port := self.settings.serve.admin_port) is not None:
            self._admin_server = asyncio.get_event_loop().create_task(self._serve_admin(port))
        idle_own_task_loop()  # the main thread, Ray's task loop; requests run on the event loop

    def _admin_router(self):
        return build_admin(self.transcriber.registry, self.settings.serve.admin_tokens, self.transcriber.serving)

    async def _serve_admin(self, port: int) -> None:
        try:
            await serve_admin(self._admin_router(), port, self.settings.serve.retry_after_s)
        except (OSError, SystemExit) as exc:  # uvicorn exits when the port is taken (another replica)
            log.warning("admin API not served on 127.0.0.1:%d by this replica: %s", port, exc)

    def __del__(self):
        """Serve calls this on graceful shutdown and then shuts the thread pool that
        `asyncio.to_thread` uses: routing stops refreshing first (a refresh after that failed and
        logged the registry as unreachable, with a traceback, at every stop), then what the
        production log still holds is written."""
        if refresher := getattr(self, "_refresher", None):
            refresher.cancel()
        if getattr(self, "production_log", None):
            self.production_log.close(timeout_s=10)

    async def _refresh_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:  # a hung registry must not freeze routing changes and rollbacks for good
                await asyncio.wait_for(self.transcriber.refresh(), 3 * self.settings.serve.control_timeout_s)
            except Exception:
                log.warning("refresh failed", exc_info=True)
            log.debug("refresh took %.3f s", time.monotonic() - started)
            await asyncio.sleep(self.settings.serve.refresh_s)

    def __serve_build_asgi_app__(self):
        from ray.serve.context import _get_serve_request_context

        admin = self._admin_router() if self.settings.serve.admin_port is None else None  # else on its own port
        feedback = FeedbackRecorder(lambda: store_for(self.settings), self.recent, self.metrics,
                                    self.settings.serve.retry_after_s, self.settings.serve.feedback_timeout_s)
        return build_api(self.transcriber, self.settings, lambda: _get_serve_request_context().request_id, admin,
                         RequestTelemetry(self.metrics, self.production_log, self.recent), feedback)


def ingress_deployment(settings: Settings):
    return Ingress.options(
        num_replicas=settings.serve.ingress_replicas,
        max_ongoing_requests=settings.serve.ingress_max_ongoing_requests,
        # Mostly waiting on model replicas: reserving a whole CPU would leave a 2-core node no
        # room for a second model version (canary).
        ray_actor_options={"num_cpus": 0},
    ).bind(settings.model_dump_json())


def build_ingress_app(args: dict) -> serve.Application:
    """Serve config entry point: `import_path: asrops.serve.ingress:build_ingress_app`."""
    return ingress_deployment(load_settings())
