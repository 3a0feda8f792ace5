"""Traffic simulator: sends labelled synthetic speech (from `asrops synth`) to a running service
at a chosen rate and mix, so stationary or drifted traffic can be produced on demand.

A mix is a list of manifests with weights (`clean/manifest.jsonl:0.8,accent/manifest.jsonl:0.2`);
each request draws its clip from a manifest picked by weight. Requests leave on a fixed
schedule (open loop: a slow service does not slow the sender) up to a concurrency bound.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from pydantic import BaseModel

from asrops.clip_manifest import read_rows


class MixPart(BaseModel):
    manifest: Path
    weight: float


class SimulationResult(BaseModel):
    sent: int
    statuses: dict[str, int]
    """HTTP status (or `error` for a connection failure) → count."""
    p50_latency_s: float | None
    seconds: float
    corrections: int = 0
    """Answers the clients corrected through POST /v1/feedback (accepted ones)."""


def parse_mix(spec: str) -> list[MixPart]:
    """`a.jsonl:0.8,b.jsonl:0.2` (a missing weight is 1)."""
    parts = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        path, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
        parts.append(MixPart(manifest=Path(path), weight=float(weight or 1)))
    if not parts:
        raise ValueError("the mix names no manifest")
    return parts


SLICE_TAGS = ("voice", "accent", "snr_db", "domain")


def _clips(manifest: Path) -> list[tuple[bytes, dict]]:
    """Each clip's bytes and its manifest row (its text and slice fields)."""
    rows = read_rows(manifest)
    if not rows:
        raise ValueError(f"{manifest} lists no clips")
    return [((manifest.parent / row["audio"]).read_bytes(), row) for row in rows]


def simulate(url: str, mix: list[MixPart], rate_per_s: float, count: int, concurrency: int = 8,
             api_keys: Sequence[str] = (), seed: int = 0, progress: Callable[[str], None] | None = None,
             client_ids: int = 50, correct_share: float = 0.0) -> SimulationResult:
    """Send `count` requests at `rate_per_s` drawn from `mix`; returns what came back.
    Each request carries one of `client_ids` client ids, as a fleet of client apps would, and
    (when keys are given) the API key of that client, `api_keys[client % len(api_keys)]`.
    A `correct_share` of the answers is corrected with the manifest's text (and its slice
    fields as tags) through POST /v1/feedback, with the same key, as users fixing transcripts
    would. Only corrections from several keys count as several clients (serve/feedback.py)."""
    rng = random.Random(seed)
    pools = [_clips(part.manifest) for part in mix]
    weights = [part.weight for part in mix]
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    corrections = 0
    lock = threading.Lock()
    plan = [(rng.choices(range(len(pools)), weights)[0], rng.random(), rng.randrange(client_ids),
             rng.random() < correct_share) for _ in range(count)]

    def send(http: httpx.Client, i: int) -> None:
        nonlocal corrections
        pool_index, pick, client, corrects = plan[i]
        pool = pools[pool_index]
        clip, row = pool[int(pick * len(pool))]
        headers = {"Authorization": f"Bearer {api_keys[client % len(api_keys)]}"} if api_keys else {}
        started = time.monotonic()
        corrected = False
        try:
            r = http.post(f"{url}/v1/audio/transcriptions", files={"file": ("clip.wav", clip)},
                          headers={**headers, "X-Client-Id": f"sim-{client}"})
            status = str(r.status_code)
            elapsed = time.monotonic() - started
            if corrects and r.status_code == 200:
                tags = {k: str(row[k]) for k in SLICE_TAGS if row.get(k) is not None}
                f = http.post(f"{url}/v1/feedback", headers=headers,
                              json={"request_id": r.headers["x-request-id"], "text": row["text"], "tags": tags})
                corrected = f.status_code == 200
        except httpx.HTTPError:
            status, elapsed = "error", time.monotonic() - started
        with lock:
            statuses[status] += 1
            corrections += corrected
            latencies.append(elapsed)
            done = sum(statuses.values())
        if progress and (done % 25 == 0 or done == count):
            progress(f"simulate: {done}/{count} answered ({dict(statuses)})")

    start = time.monotonic()
    with httpx.Client(timeout=180) as http, ThreadPoolExecutor(concurrency) as pool:
        for i in range(count):
            delay = start + i / rate_per_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, http, i)
    latencies.sort()
    return SimulationResult(sent=count, statuses=dict(statuses),
                            p50_latency_s=latencies[len(latencies) // 2] if latencies else None,
                            seconds=time.monotonic() - start, corrections=corrections)
