"""One Serve application per model version: `model-<version id>`.

Why one application per version: versions come and go at run time (canary, rollback), and
a Serve application is the unit that can be deployed and deleted on its own; every metric
of its replicas carries the version.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import numpy as np
from pydantic import BaseModel, ConfigDict
from ray import serve

from asrops.engines import load_engine
from asrops.engines.types import DecodeOptions, Transcription
from asrops.registry import ModelRegistry
from asrops.settings import Settings, load_settings

log = logging.getLogger("asrops.serve.model")

WARMUP_SAMPLES = 16_000  # one second of silence


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
    """Loads one verified version, warms it, and decodes batches of requests."""

    def __init__(self, version: str, settings_json: str | None = None):
        settings = Settings.model_validate_json(settings_json) if settings_json else load_settings()
        registry = ModelRegistry.from_settings(settings)
        self.version_id = registry.resolve(version)
        engine = settings.engine
        self.engine = load_engine(registry.fetch(self.version_id), engine.kind, engine.device, engine.threads)
        self.engine.transcribe([np.zeros(WARMUP_SAMPLES, dtype=np.float32)])
        self.transcribe_batch.set_max_batch_size(settings.serve.max_batch_size)
        self.transcribe_batch.set_batch_wait_timeout_s(settings.serve.batch_wait_timeout_s)
        log.info("model %s ready (%s engine)", self.version_id, engine.kind)

    def version(self) -> str:
        """Which version this application serves (its name need not say)."""
        return self.version_id

    async def transcribe(self, request: ModelRequest) -> ModelReply:
        return await self.transcribe_batch(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def transcribe_batch(self, requests: list[ModelRequest]) -> list[ModelReply]:
        """Requests with the same decode options are decoded together; the engine runs in a
        thread so the replica keeps accepting requests (and answering health checks)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[request.options.model_dump_json()].append(i)
        replies: list[ModelReply | None] = [None] * len(requests)
        for indices in groups.values():
            for i, reply in zip(indices, await self._decode([requests[i] for i in indices], len(requests))):
                replies[i] = reply
        return replies

    async def _decode(self, requests: list[ModelRequest], batch_size: int) -> list[ModelReply]:
        options = requests[0].options
        try:
            results = await asyncio.to_thread(self.engine.transcribe, [r.audio for r in requests], options)
            return [ModelReply(transcription=t, version=self.version_id, batch_size=batch_size) for t in results]
        except Exception:
            if len(requests) == 1:
                log.exception("transcription failed in %s", self.version_id)
                return [ModelReply(error="the model failed on this audio", version=self.version_id, batch_size=batch_size)]
            # One bad request must not fail its batch-mates: retry them one by one.
            log.warning("batch of %d failed in %s; retrying one by one", len(requests), self.version_id)
            return [(await self._decode([r], batch_size))[0] for r in requests]

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
        ray_actor_options={"num_cpus": 1, "num_gpus": 1 if _gpus_present() else 0},
    ).bind(version_id, settings.model_dump_json())


def _gpus_present() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_model_app(args: dict) -> serve.Application:
    """Serve config entry point: `import_path: serve.model_server:build_model_app`, args `{version: ...}`."""
    settings = load_settings()
    return model_deployment(ModelRegistry.from_settings(settings).resolve(args.get("version", "stable")), settings)
