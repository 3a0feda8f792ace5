"""The drift reference: what traffic looked like when the stable version was known to be good.

Two ways to make one, both stored in the production log's store (`reference/`):
- `pin_window`: a production window an operator vouches for;
- `from_manifest`: the stable version's validation set (audio + text), transcribed here by the
  stable version itself, so its features are what that version produces on known-good audio.
Either also stores the reference vocabulary (the words its transcripts use), which the
production log uses for each request's out-of-vocabulary share.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from asrops.audio import decode_audio
from asrops.clip_manifest import read_rows
from asrops.features import vocabulary_of, words_of
from asrops.prodlog import FinishedRequest, ProductionLogReader, to_record
from asrops.registry.store import ObjectStore

log = logging.getLogger(__name__)

REFERENCE_KEY = "reference/features.parquet"
PARTIAL_PREFIX = "reference/partial/"
"""A reference being made from a manifest, saved batch by batch until it is complete."""


def successful(frame: pd.DataFrame) -> pd.DataFrame:
    """Only answered requests describe traffic: errors have no transcript to compare."""
    return frame[frame["status"] == 200].reset_index(drop=True)


def held_out_oov_share(texts: list[str]) -> list[float | None]:
    """Each reference row's OOV share against the vocabulary of the other half of the
    reference: what production rows will look like against the whole vocabulary, where
    measuring a row against a vocabulary that contains its own words would always give 0."""
    halves = [vocabulary_of(texts[1::2]), vocabulary_of(texts[0::2])]  # even rows vs odd vocabulary
    shares = []
    for i, text in enumerate(texts):
        words = words_of(text)
        shares.append(sum(w not in halves[i % 2] for w in words) / len(words) if words else None)
    return shares


def save_reference(store: ObjectStore, frame: pd.DataFrame) -> None:
    frame = frame.copy()
    frame["oov_share"] = held_out_oov_share([t or "" for t in frame["text"]])
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    store.write_bytes(REFERENCE_KEY, buf.getvalue())
    ProductionLogReader(store).write_vocabulary(vocabulary_of([t for t in frame["text"].dropna()]))
    log.info("reference stored: %d rows, %s", len(frame), REFERENCE_KEY)


def load_reference(store: ObjectStore) -> pd.DataFrame | None:
    try:
        return pd.read_parquet(io.BytesIO(store.read_bytes(REFERENCE_KEY)[0]))
    except KeyError:
        return None


def pin_window(store: ObjectStore, start: datetime, end: datetime) -> pd.DataFrame:
    frame = successful(ProductionLogReader(store).read(start, end))
    if frame.empty:
        raise ValueError(f"no answered requests between {start:%Y-%m-%d %H:%M:%S} and {end:%Y-%m-%d %H:%M:%S}")
    save_reference(store, frame)
    return load_reference(store)


def from_manifest(store: ObjectStore, manifest: Path, engine, version: str, batch_size: int,
                  progress: Callable[[str], None] = log.info, limit: int | None = None,
                  yield_to_pinned: bool = False) -> pd.DataFrame:
    """Transcribe every clip of `manifest` (jsonl with `audio`) with `engine`, keep its features.
    What is transcribed is saved batch by batch (`PARTIAL_PREFIX`): a run stopped half way
    resumes where it was, for the same version and clips, instead of starting again.
    `yield_to_pinned` (the first-run bootstrap): when a reference appears while this runs (an
    operator pinned one), stop and keep that one rather than overwrite it."""
    rows = read_rows(manifest)[:limit]
    partial_key = f"{PARTIAL_PREFIX}{version}-{_fingerprint(rows)}.parquet"
    try:
        done = pd.read_parquet(io.BytesIO(store.read_bytes(partial_key)[0]))
        progress(f"reference: resuming at {len(done)}/{len(rows)} clips (a bootstrap stopped before it ended)")
    except KeyError:
        done = pd.DataFrame()
    for start in range(len(done), len(rows), batch_size):
        if yield_to_pinned and (pinned := load_reference(store)) is not None:
            progress(f"reference: one was stored meanwhile ({len(pinned)} rows); keeping it, bootstrap stopped")
            store.delete_prefix(PARTIAL_PREFIX)
            return pinned
        chunk = rows[start : start + batch_size]
        decoded = [decode_audio((manifest.parent / r["audio"]).read_bytes()) for r in chunk]
        records = [to_record(FinishedRequest(
            request_id=f"reference-{start + i}", time=datetime.now(UTC), model_version=version,
            route="reference", status=200, latency_s=0.0, samples=audio.samples,
            original_sample_rate=audio.original_sample_rate, original_channels=audio.original_channels,
            transcription=t), None).model_dump()
            for i, (audio, t) in enumerate(zip(decoded, engine.transcribe([a.samples for a in decoded])))]
        done = pd.DataFrame(records) if done.empty else pd.concat([done, pd.DataFrame(records)], ignore_index=True)
        buf = io.BytesIO()
        done.to_parquet(buf, index=False)
        store.write_bytes(partial_key, buf.getvalue())
        progress(f"reference: {len(done)}/{len(rows)} clips transcribed")
    save_reference(store, done)
    store.delete_prefix(PARTIAL_PREFIX)
    return load_reference(store)


def _fingerprint(rows: list[dict]) -> str:
    """Which clips a partial reference is of (their audio paths and texts), in 12 hex digits."""
    text = "\n".join(f"{r.get('audio')}\t{r.get('text', '')}" for r in rows)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def synthetic_reference(store: ObjectStore, registry, settings, progress: Callable[[str], None] = log.info,
                        n: int = 100) -> pd.DataFrame:
    """A reference with no data of one's own yet: the stable version's features on clean
    synthetic speech (asrops synth's `clean` preset), the traffic it is known to handle."""
    import tempfile

    from asrops.engines import load_engine
    from asrops.synth import PRESETS, generate

    version = registry.resolve("stable")
    progress(f"drift reference: none yet; making one from {n} clean synthetic clips through {version}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate(PRESETS["clean"].model_copy(update={"n": n, "seed": 1}), Path(tmp), progress=progress)
        engine = load_engine(registry.fetch(version), settings.engine.kind, settings.engine.device,
                             settings.engine.threads)
        return from_manifest(store, manifest, engine, version, settings.engine.offline_batch_size, progress,
                             yield_to_pinned=True)
