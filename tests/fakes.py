"""Stand-in model versions for tests of routing and monitoring: small Serve deployments that
answer a fixed text, raise, or hang, where a broken Whisper cannot be made on demand."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
from ray import serve

from asrops.audio import audio_to_wav_bytes
from asrops.engines.types import Transcription
from asrops.registry import ModelRegistry
from asrops.serve.model_server import ModelReply

# Near silence: valid audio that the engine skips without decoding, so 1,000 requests are quick.
QUIET = audio_to_wav_bytes((np.random.default_rng(0).standard_normal(8_000) * 1e-4).astype(np.float32))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class FakeVersion:
    """A stand-in model application: answers `text`, raises, hangs, or (mute) never says its version."""

    def __init__(self, version: str, behaviour: str):
        self.version_id, self.behaviour = version, behaviour

    async def version(self) -> str:
        if self.behaviour == "mute":  # never says which version it is
            await asyncio.sleep(3600)
        return self.version_id

    async def transcribe(self, request) -> ModelReply:
        if self.behaviour == "raise":
            raise RuntimeError("canary bug")
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        return ModelReply(transcription=Transcription(text="canary says hi", segments=[], duration_s=0.5),
                          version=self.version_id, batch_size=1)

    async def transcribe_stream(self, request):
        """As `transcribe`, streamed: a broken version fails (or hangs) before its first event."""
        yield await self.transcribe(request)


def publish_dummy(registry: ModelRegistry, version: str, tmp_path) -> None:
    if version in {m.id for m in registry.list_versions()}:
        return
    src = tmp_path / version
    src.mkdir()
    (src / "weights.bin").write_bytes(version.encode() * 16)
    registry.publish(src, id=version, family="test-canary", parent=None, source="tests/test_canary.py")


def wait_routable(service: str, version: str, timeout_s: float = 30) -> None:
    """Until the ingress has seen the application and routes an explicit request to it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.post(f"{service}/v1/audio/transcriptions", files={"file": ("q.wav", QUIET)},
                       headers={"X-Model-Version": version}, timeout=30)
        if r.status_code == 200 and r.headers["x-model-version"] == version:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{version} never became routable")


class SteadyLoad:
    """Concurrent clients posting quiet clips in a loop until stopped; keeps every response."""

    def __init__(self, service: str, clients: int = 4):
        self.service, self.clients = service, clients
        self.results: list[tuple[int, str, str]] = []  # (status, version header, text or error)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=180) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    r = http.post(f"{self.service}/v1/audio/transcriptions", files={"file": ("q.wav", QUIET)},
                                  headers={"X-Client-Id": f"load-{i}-{n}"})
                    body = r.json().get("text", r.text) if r.headers.get("content-type", "").startswith(
                        "application/json") else r.text
                    self.results.append((r.status_code, r.headers.get("x-model-version", ""), str(body)))
                except httpx.HTTPError as exc:
                    self.results.append((0, "", repr(exc)))

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def failures(self) -> list[tuple[int, str, str]]:
        return [r for r in self.results if r[0] != 200]
