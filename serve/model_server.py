"""One Serve application per model version: `model-<version id>`.

Why one application per version: versions come and go at run time (canary, rollback), and
a Serve application is the unit that can be deployed and deleted on its own; every metric
of its replicas carries the version.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from pydantic import BaseModel, ConfigDict
from ray import serve

from asrops.audio_format import SAMPLE_RATE
from asrops.engines import load_engine, resolve_device
from asrops.engines.types import DecodeOptions, Transcription
from asrops.registry import ModelRegistry
from asrops.serve.lanes import EngineLanes
from asrops.serve.metrics import ModelMetrics
from asrops.settings import Settings, load_settings

log = logging.getLogger(__name__)

WARMUP_SAMPLES = SAMPLE_RATE  # one second of silence


def model_app_name(version_id: str) -> str:
    return f"model-{version_id}"


class ModelRequest(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    audio: np.ndarray
    options: DecodeOptions


class ModelReply(BaseModel):
    transcription: Transcription | None = None
    error: str | None = None
    """Set when this request failed inside the engine; its batch-mates are unaffected."""
    version: str
    batch_size: int


@serve.deployment(name="model", health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
class ModelServer:
    """Loads one verified version, warms it, and decodes batches of requests on engine lanes."""

    def __init__(self, version: str, settings_json: str | None = None):
        settings = Settings.model_validate_json(settings_json) if settings_json else load_settings()
        registry = ModelRegistry.from_settings(settings)
        self.version_id = registry.resolve(version)
        engine = settings.engine
        version_dir = registry.fetch(self.version_id)
        lanes = engine_lanes(settings)
        self.engines = [load_engine(version_dir, engine.kind, engine.device, engine.threads) for _ in range(lanes)]
        for e in self.engines:
            e.transcribe([np.zeros(WARMUP_SAMPLES, dtype=np.float32)])
        self.lanes = EngineLanes(self._decode, lanes, settings.serve.max_batch_size,
                                 key=lambda r: r.options.model_dump_json())
        self.metrics = ModelMetrics(self.version_id)
        self.transcribe_batch.set_max_batch_size(settings.serve.max_batch_size)
        self.transcribe_batch.set_batch_wait_timeout_s(settings.serve.batch_wait_timeout_s)
        log.info("model %s ready (%s engine, %d lanes)", self.version_id, engine.kind, lanes)

    def version(self) -> str:
        """Which version this application serves (its name need not say)."""
        return self.version_id

    def info(self) -> dict:
        """What this replica is doing, for operators (and the replica-kill test: its pid)."""
        return {"version": self.version_id, "pid": os.getpid(), "lanes": self.lanes.lanes,
                "busy_lanes": self.lanes.busy, "queued": self.lanes.queued}

    async def transcribe(self, request: ModelRequest) -> ModelReply:
        return await self.transcribe_batch(request)

    # Serve gathers requests that arrive together; the lanes (not Serve) bound how many
    # batches run at once, so Serve may hand over as many batches as it forms.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=1024)
    async def transcribe_batch(self, requests: list[ModelRequest]) -> list[ModelReply]:
        return await self.lanes.run(requests)

    def _decode(self, lane: int, requests: list[ModelRequest]) -> list[ModelReply]:
        """Runs in a lane's thread; a request that breaks the engine fails alone."""
        self.metrics.batch(len(requests), self.lanes.queued)
        try:
            results = self.engines[lane].transcribe([r.audio for r in requests], requests[0].options)
            return [ModelReply(transcription=t, version=self.version_id, batch_size=len(requests)) for t in results]
        except Exception:
            if len(requests) == 1:
                log.exception("transcription failed in %s", self.version_id)
                return [ModelReply(error="the model failed on this audio", version=self.version_id, batch_size=1)]
            log.warning("batch of %d failed in %s; retrying one by one", len(requests), self.version_id)
            return [self._decode(lane, [r])[0] for r in requests]

    def check_health(self) -> None:
        """Serve restarts a replica whose engine stopped answering."""
        if not self.engines:
            raise RuntimeError("engine not loaded")


def engine_lanes(settings: Settings) -> int:
    """`engine.lanes`, or by default 2 on CPU (one decodes while the other runs Python) and 1 on GPU."""
    if settings.engine.lanes:
        return settings.engine.lanes
    return 1 if resolve_device(settings.engine.device) == "cuda" else 2


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
