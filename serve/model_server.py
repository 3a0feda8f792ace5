"""One Serve application per model version: `model-<version id>`.

Why one application per version: versions come and go at run time (canary, rollback), and
a Serve application is the unit that can be deployed and deleted on its own; every metric
of its replicas carries the version.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator
from ray import serve

from asrops.audio_format import SAMPLE_RATE, from_pcm16, to_pcm16
from asrops.cpu_wakeup import hold_cpu_wakeup_latency
from asrops.engines import engine_lanes, load_engine
from asrops.engines.slice_gate import GatedBackend
from asrops.engines.types import DecodeOptions, Segment, Transcription
from asrops.raycluster import idle_own_task_loop
from asrops.registry import ModelRegistry
from asrops.serve.lanes import Deliver, EngineLanes
from asrops.serve.metrics import ModelMetrics
from asrops.serve.ray_shims import warnings_to_console
from asrops.settings import Settings, load_settings

log = logging.getLogger(__name__)

WARMUP_SAMPLES = SAMPLE_RATE  # one second of silence


def model_app_name(version_id: str) -> str:
    return f"model-{version_id}"


class ModelRequest(BaseModel):
    """What the ingress sends a model replica (and a shadow its copy)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    pcm16: np.ndarray
    """The audio as 16-bit PCM, 16 kHz mono: half the bytes of float32 between processes."""
    options: DecodeOptions

    @field_validator("pcm16")
    @classmethod
    def _is_pcm16(cls, value: np.ndarray) -> np.ndarray:
        if value.dtype != np.int16 or value.ndim != 1:
            raise ValueError(f"expected 1-D int16 samples, got {value.ndim}-D {value.dtype}")
        return value

    @classmethod
    def of(cls, samples: np.ndarray, options: DecodeOptions) -> ModelRequest:
        """From float samples in [-1, 1] (what the ingress decoded)."""
        return cls(pcm16=to_pcm16(samples), options=options)

    @property
    def audio(self) -> np.ndarray:
        """float32 samples, as the engine takes them."""
        return from_pcm16(self.pcm16)

    @property
    def duration_s(self) -> float:
        return len(self.pcm16) / SAMPLE_RATE


class ModelReply(BaseModel):
    transcription: Transcription | None = None
    error: str | None = None
    """Set when this request failed inside the engine; its batch-mates are unaffected."""
    version: str
    batch_size: int
    engine_s: float = 0.0
    """From its batch's start on the engine to its own transcription being done: what the model
    cost this request, beside what serving did (the API's `Server-Timing` header)."""


class PartialReply(BaseModel):
    """A streamed request's segments of one decoded window, sent before its `ModelReply`."""

    segments: list[Segment]
    version: str


@dataclass(frozen=True)
class _Work:
    """A request on the lanes, with where its segments go as windows are decoded (streams)."""

    request: ModelRequest
    on_segments: Callable[[list[Segment]], None] | None = None


@serve.deployment(name="model", health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
class ModelServer:
    """Loads one verified version, warms it, and decodes batches of requests on engine lanes."""

    def __init__(self, version: str, settings_json: str | None = None):
        warnings_to_console()
        settings = Settings.model_validate_json(settings_json) if settings_json else load_settings()
        registry = ModelRegistry.from_settings(settings)
        self.version_id = registry.resolve(version)
        engine = settings.engine
        version_dir = registry.fetch(self.version_id)
        lanes = engine_lanes(engine.lanes, engine.device, engine.kind)
        # One engine for every lane: its ONNX Runtime sessions run concurrent calls, and its
        # decoding keeps no state between calls. A copy per lane cost 150 MB and ran slower
        # (measured on 2 cores, 2 lanes, 120 clips: RTFx 19.8/18.6 with two, 21.7/20.1 with one).
        self.engine = load_engine(version_dir, engine.kind, engine.device, engine.threads, engine.short_windows,
                                  lanes)
        # Held for the replica's life: the kernel drops it when the process ends, however it ends.
        self._cpu_wakeup_fd = hold_cpu_wakeup_latency(settings.serve.cpu_wakeup_latency_us)
        self.engine.transcribe([np.zeros(WARMUP_SAMPLES, dtype=np.float32)])
        self.pack_windows = engine.pack_windows
        self.lanes = EngineLanes(self._decode, lanes, settings.serve.max_batch_size,
                                 key=lambda w: w.request.options.model_dump_json())
        self.metrics = ModelMetrics(self.version_id)
        if isinstance(self.engine.backend, GatedBackend):
            self.engine.backend.on_route = self.metrics.slice_gate
        log.info("model %s ready (%s engine, %d lanes)", self.version_id, engine.kind, lanes)
        idle_own_task_loop()  # the main thread, Ray's task loop; requests run on the event loop

    def version(self) -> str:
        """Which version this application serves (its name need not say)."""
        return self.version_id

    def info(self) -> dict:
        """What this replica is doing, for operators (and the replica-kill test: its pid)."""
        return {"version": self.version_id, "pid": os.getpid(), "lanes": self.lanes.lanes,
                "busy_lanes": self.lanes.busy, "queued": self.lanes.queued}

    async def transcribe(self, request: ModelRequest) -> ModelReply:
        """Batched on the lanes with whatever else waits for one, and answered as soon as its
        own transcription is done. (Not `@serve.batch`: it answers a batch when all of it is
        done, and held a lone request for its wait.)"""
        (reply,) = await self.lanes.run([_Work(request)])
        return reply

    async def transcribe_stream(self, request: ModelRequest) -> AsyncIterator[PartialReply | ModelReply]:
        """A `PartialReply` per decoded window with new segments, then the `ModelReply` (called
        with `handle.options(stream=True)`). The request still shares batches on the lanes."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[PartialReply | asyncio.Future] = asyncio.Queue()

        def on_segments(segments: list[Segment]) -> None:  # in the lane's thread
            loop.call_soon_threadsafe(events.put_nowait, PartialReply(segments=segments, version=self.version_id))

        done = asyncio.ensure_future(self.lanes.run([_Work(request, on_segments)]))
        done.add_done_callback(events.put_nowait)  # after every partial the lane's thread queued
        try:
            while not isinstance(event := await events.get(), asyncio.Future):
                yield event
            yield event.result()[0]
        finally:
            done.cancel()  # the client went away: the lanes drop a request not yet taken

    def _decode(self, lane: int, work: list[_Work], deliver: Deliver[ModelReply]) -> list[ModelReply]:
        """Runs in a lane's thread; each request is delivered when its transcription is done, and
        a request that breaks the engine fails alone."""
        self.metrics.batch(len(work), self.lanes.queued)
        replies: dict[int, ModelReply] = {}
        started = time.perf_counter()

        def on_segments(i: int, segments: list[Segment]) -> None:
            if work[i].on_segments is not None:
                work[i].on_segments(segments)

        def on_done(i: int, transcription: Transcription) -> None:  # the engine calls it for every audio
            replies[i] = ModelReply(transcription=transcription, version=self.version_id, batch_size=len(work),
                                    engine_s=time.perf_counter() - started)
            deliver(i, replies[i])

        try:
            self.engine.transcribe([w.request.audio for w in work], work[0].request.options,
                                   on_segments, pack=self.pack_windows, on_done=on_done)
        except Exception:
            if len(work) == 1:
                log.exception("transcription failed in %s", self.version_id)
                return [ModelReply(error="the model failed on this audio", version=self.version_id, batch_size=1)]
            log.warning("batch of %d failed in %s; retrying the %d not answered one by one", len(work),
                        self.version_id, len(work) - len(replies))
            for i, w in enumerate(work):
                if i not in replies:
                    replies[i] = self._decode(lane, [w], lambda _, reply, i=i: deliver(i, reply))[0]
        return [replies[i] for i in range(len(work))]

    def check_health(self) -> None:
        """Serve restarts a replica whose engine stopped answering."""
        if self.engine is None:
            raise RuntimeError("engine not loaded")


def model_deployment(version_id: str, settings: Settings):
    """The Serve application for one version, with replica settings from `settings.serve`."""
    s = settings.serve
    return ModelServer.options(
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        ray_actor_options={"num_cpus": s.model_num_cpus, "num_gpus": _num_gpus(s.model_num_gpus)},
    ).bind(version_id, settings.model_dump_json())


def _num_gpus(configured: float | None) -> float:
    """The setting, else a whole GPU when the cluster has one now."""
    if configured is not None:
        return configured
    import ray

    return 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0


def build_model_app(args: dict) -> serve.Application:
    """Serve config entry point: `import_path: asrops.serve.model_server:build_model_app`, args `{version: ...}`."""
    settings = load_settings()
    return model_deployment(ModelRegistry.from_settings(settings).resolve(args.get("version", "stable")), settings)
