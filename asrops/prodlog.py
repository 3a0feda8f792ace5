"""The production log: one record per transcription request, as parquet, local or on S3.

The ingress hands each finished request to `ProductionLogWriter.submit`, which only appends to
an in-memory buffer; a background thread computes the features (asrops/features.py), keeps a
sampled copy of the audio, and writes one parquet file per flush. A slow or failing store
therefore never slows or fails a transcription: records wait in the buffer (bounded; the
oldest are dropped and counted) and failures are reported through `on_event`.

Layout under the store's root:
    records/date=YYYY-MM-DD/<first ms>-<last ms>-<uuid>.parquet
    audio/date=YYYY-MM-DD/hour=HH/<request id>.flac      (sampled, retention-limited)
    labelled-audio/date=YYYY-MM-DD/<request id>.flac     (audio of corrected requests: training data,
                                                          never purged with the sampled audio)
    requests/date=YYYY-MM-DD/<request id>.json           (each answered request by id, for
                                                          feedback: one read, not a scan; kept
                                                          while the request can be corrected)
    reference/vocabulary.json                            (words the reference transcripts use)
"""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import soundfile as sf
from pydantic import BaseModel, ConfigDict

from asrops.audio_format import SAMPLE_RATE
from asrops.engines.types import Transcription
from asrops.features import audio_features, transcript_features
from asrops.priority import lower_thread
from asrops.registry.store import ObjectStore, open_store
from asrops.settings import ProductionLogSettings, Settings

log = logging.getLogger(__name__)

RECORDS = "records"
AUDIO = "audio"
LABELLED_AUDIO = "labelled-audio"
VOCABULARY_KEY = "reference/vocabulary.json"
REQUEST_INDEX = "requests"
VOCABULARY_REFRESH_S = 60.0
REQUEST_TO_FEEDBACK = timedelta(days=1)
"""The longest after its answer that a request can be corrected (its index entry is kept so long)."""


class RequestOutcome(BaseModel):
    """How a request ended: what both the ingress's hand-over and the stored record start with."""

    request_id: str
    time: datetime
    model_version: str
    """The version that answered ("" when none did)."""
    route: str
    status: int
    latency_s: float
    error_code: str | None = None
    client: str | None = None
    """Who sent it: an API key's id, or `anonymous` (None in records from before it was kept).
    Feedback on a request is accepted only from the same client."""


class RequestRecord(RequestOutcome):
    """One row of the production log. Audio and transcript features are None when the request
    failed before they existed (a bad upload has no transcript)."""

    # audio
    duration_s: float | None = None
    original_sample_rate: int | None = None
    original_channels: int | None = None
    rms_dbfs: float | None = None
    peak: float | None = None
    clipping_ratio: float | None = None
    snr_db: float | None = None
    silence_ratio: float | None = None
    spectral_centroid_hz: float | None = None
    # transcript
    text: str | None = None
    words: int | None = None
    characters: int | None = None
    words_per_s: float | None = None
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    compression_ratio: float | None = None
    oov_share: float | None = None
    low_confidence_word_share: float | None = None
    audio_key: str | None = None
    """Where the sampled copy of the audio is, when this request's audio was kept."""


class IndexedRequest(BaseModel):
    """What feedback needs of an answered request, stored under its id (`request_index_key`)."""

    request_id: str
    time: datetime
    model_version: str
    route: str
    text: str
    client: str | None
    audio_key: str | None
    """The sampled copy of its audio, when it was kept."""

    @classmethod
    def of(cls, record: RequestRecord) -> IndexedRequest:
        return cls(request_id=record.request_id, time=record.time, model_version=record.model_version,
                   route=record.route, text=record.text or "", client=record.client, audio_key=record.audio_key)


class FinishedRequest(RequestOutcome):
    """What the ingress knows when a request ends; turned into a RequestRecord off the request path."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    samples: np.ndarray | None = None
    original_sample_rate: int | None = None
    original_channels: int | None = None
    transcription: Transcription | None = None


def store_for(settings: Settings) -> ObjectStore:
    pl = settings.monitoring.production_log
    return open_store(settings.production_log_uri, pl.s3_endpoint_url, settings.registry.s3_region)


def to_record(done: FinishedRequest, vocabulary: frozenset[str] | None) -> RequestRecord:
    fields = done.model_dump(include=set(RequestOutcome.model_fields))
    if done.samples is not None:
        fields |= audio_features(done.samples, done.original_sample_rate or SAMPLE_RATE,
                                 done.original_channels or 1).model_dump()
    if done.transcription is not None:
        fields |= transcript_features(done.transcription, vocabulary).model_dump()
        fields["text"] = done.transcription.text
    return RequestRecord(**fields)


def audio_key(request_id: str, when: datetime) -> str:
    return f"{AUDIO}/date={when:%Y-%m-%d}/hour={when:%H}/{request_id}.flac"


def labelled_audio_key(request_id: str, when: datetime) -> str:
    """Where a corrected request's audio is kept: apart from the sampled audio, whose retention
    (days) is shorter than a retrain's lookback over corrections (a month)."""
    return f"{LABELLED_AUDIO}/date={when:%Y-%m-%d}/{request_id}.flac"


def request_index_key(request_id: str, when: datetime) -> str:
    return f"{REQUEST_INDEX}/date={when:%Y-%m-%d}/{request_id}.json"


def find_request(store: ObjectStore, request_id: str, now: datetime) -> IndexedRequest | None:
    """An answered request by id, from the index (a read per day it could be from, no listing)."""
    for day in (now, now - REQUEST_TO_FEEDBACK):
        try:
            return IndexedRequest.model_validate_json(store.read_bytes(request_index_key(request_id, day))[0])
        except KeyError:
            continue
    return None


def flac_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def records_to_parquet(records: list[RequestRecord]) -> bytes:
    frame = pd.DataFrame([r.model_dump() for r in records])
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def _held(item: FinishedRequest | tuple[RequestRecord, bytes | None]) -> int:
    """Bytes of audio a buffered item holds: raw samples before its record is built, the sampled
    FLAC (if any) after."""
    if isinstance(item, FinishedRequest):
        return item.samples.nbytes if item.samples is not None else 0
    return len(item[1]) if item[1] is not None else 0


class ProductionLogWriter:
    """Buffers finished requests and writes them in the background; see the module docstring.

    `on_event(name, count)` reports `written`, `dropped` and `write_failure` (for metrics)."""

    def __init__(self, open_store_fn: Callable[[], ObjectStore], settings: ProductionLogSettings,
                 on_event: Callable[[str, int], None] | None = None, seed: int | None = None,
                 niceness: int = 0):
        """`niceness`: the writer's thread runs at least this low a priority (the features it
        computes after each answer would otherwise take the CPU from the next request's engine)."""
        self.settings = settings
        self._niceness = niceness
        self._open_store = open_store_fn
        self._store: ObjectStore | None = None
        self._on_event = on_event or (lambda name, n: None)
        self._pending: deque[FinishedRequest] = deque()
        self._unwritten: list[tuple[RequestRecord, bytes | None]] = []  # built, waiting for a store that works
        self._held_bytes = 0  # audio held by both, bounded by settings.max_buffered_mb
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._random = random.Random(seed)
        self._vocabulary: frozenset[str] | None = None
        self._vocabulary_read_at = -VOCABULARY_REFRESH_S
        self._thread = threading.Thread(target=self._run, name="production-log", daemon=True)
        self._thread.start()

    def submit(self, done: FinishedRequest) -> None:
        """Never blocks on the store and never raises: the request path calls this."""
        with self._lock:
            self._pending.append(done)
            self._held_bytes += _held(done)
            dropped = self._trim_locked()
        if dropped:
            self._on_event("dropped", dropped)

    def _trim_locked(self) -> int:
        """Drop the oldest records (unwritten ones first) past either bound; returns how many."""
        dropped, s = 0, self.settings
        while (len(self._pending) + len(self._unwritten) > s.max_buffered_records
               or self._held_bytes > s.max_buffered_mb * 2**20) and (self._pending or self._unwritten):
            self._held_bytes -= _held(self._unwritten.pop(0) if self._unwritten else self._pending.popleft())
            dropped += 1
        return dropped

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Write what is buffered now; True when nothing is left unwritten (for tests and shutdown)."""
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending and not self._unwritten and not self._busy:
                    return True
            time.sleep(0.05)
        return False

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    _busy = False

    def _run(self) -> None:
        try:  # this thread only: the request path that submits keeps its own priority
            lower_thread(threading.get_native_id(), self._niceness)
        except OSError:
            log.warning("production log: could not lower the writer's priority", exc_info=True)
        while not self._stopping:
            self._wake.wait(self.settings.flush_interval_s)
            self._wake.clear()
            try:
                self._flush_once()
            except Exception:  # never let the thread die: the next flush tries again
                log.exception("production log flush failed")

    def _store_or_none(self) -> ObjectStore | None:
        if self._store is None:
            try:
                self._store = self._open_store()
            except Exception as exc:
                log.warning("production log store unavailable: %s", exc)
                self._on_event("write_failure", 1)
        return self._store

    def _vocabulary_now(self, store: ObjectStore) -> frozenset[str] | None:
        if time.monotonic() - self._vocabulary_read_at >= VOCABULARY_REFRESH_S:
            self._vocabulary_read_at = time.monotonic()
            try:
                self._vocabulary = frozenset(json.loads(store.read_bytes(VOCABULARY_KEY)[0]))
            except KeyError:
                self._vocabulary = None
            except Exception as exc:
                log.warning("could not read the reference vocabulary: %s", exc)
        return self._vocabulary

    def _flush_once(self) -> None:
        with self._lock:
            taken, self._pending = list(self._pending), deque()
            self._held_bytes -= sum(_held(d) for d in taken)
            self._busy = bool(taken or self._unwritten)
        try:
            if not self._busy:
                return
            store = self._store_or_none()
            vocabulary = self._vocabulary_now(store) if store else None
            built = [(to_record(d, vocabulary), self._sampled_audio(d)) for d in taken]
            with self._lock:
                batch, self._unwritten = self._unwritten + built, []
                self._held_bytes += sum(_held(b) for b in built) - sum(_held(b) for b in batch)
            if store is None or not self._write(store, batch):
                with self._lock:
                    self._unwritten = batch + self._unwritten
                    self._held_bytes += sum(_held(b) for b in batch)
                    dropped = self._trim_locked()
                if dropped:
                    self._on_event("dropped", dropped)
        finally:
            self._busy = False

    def _sampled_audio(self, done: FinishedRequest) -> bytes | None:
        s = self.settings
        if (not s.keep_audio or done.samples is None or done.status != 200
                or self._random.random() >= s.audio_sample_share):
            return None
        return flac_bytes(done.samples)

    def _write(self, store: ObjectStore, batch: list[tuple[RequestRecord, bytes | None]]) -> bool:
        try:
            for record, audio in batch:
                if audio is not None and record.audio_key is None:
                    key = audio_key(record.request_id, record.time)
                    store.write_bytes(key, audio)
                    record.audio_key = key
                if record.status == 200:  # before the records: a failed batch is written again whole
                    store.write_bytes(request_index_key(record.request_id, record.time),
                                      IndexedRequest.of(record).model_dump_json().encode())
            records = [r for r, _ in batch]
            first, last = min(r.time for r in records), max(r.time for r in records)
            key = (f"{RECORDS}/date={first:%Y-%m-%d}/{int(first.timestamp() * 1000)}-"
                   f"{int(last.timestamp() * 1000)}-{uuid.uuid4().hex[:8]}.parquet")
            store.write_bytes(key, records_to_parquet(records))
        except Exception as exc:
            log.warning("production log write failed (%d records kept for retry): %s", len(batch), exc)
            self._on_event("write_failure", 1)
            return False
        self._on_event("written", len(batch))
        return True


class ProductionLogReader:
    """Reads windows of the production log; used by the drift monitor and dataset builders."""

    def __init__(self, store: ObjectStore):
        self.store = store

    def read(self, start: datetime, end: datetime) -> pd.DataFrame:
        """Records with `start <= time < end` (UTC), oldest first; empty frame when none."""
        start_ms, end_ms = start.timestamp() * 1000, end.timestamp() * 1000
        frames = []
        day = start.astimezone(UTC).date()
        while day <= end.astimezone(UTC).date():
            for key in self.store.list_prefix(f"{RECORDS}/date={day:%Y-%m-%d}/"):
                first, last = (int(x) for x in key.rsplit("/", 1)[1].split("-")[:2])
                if last >= start_ms and first < end_ms:
                    frames.append(pd.read_parquet(io.BytesIO(self.store.read_bytes(key)[0])))
            day += timedelta(days=1)
        if not frames:
            return pd.DataFrame(columns=list(RequestRecord.model_fields))
        frame = pd.concat(frames, ignore_index=True)
        frame = frame[(frame["time"] >= pd.Timestamp(start)) & (frame["time"] < pd.Timestamp(end))]
        return frame.sort_values("time").reset_index(drop=True)

    def purge_audio(self, retention_days: float, now: datetime | None = None) -> int:
        """Delete sampled audio whose hour ended more than `retention_days` ago, and the request
        index's days that can no longer be corrected; returns how many hours of audio."""
        now = now or datetime.now(UTC)
        index_cutoff = f"{REQUEST_INDEX}/date={(now - REQUEST_TO_FEEDBACK - timedelta(days=1)):%Y-%m-%d}"
        for day in sorted({key.rsplit("/", 1)[0] for key in self.store.list_prefix(f"{REQUEST_INDEX}/")}):
            if day < index_cutoff:
                self.store.delete_prefix(day + "/")
        cutoff = now - timedelta(days=retention_days)
        hours = {key.rsplit("/", 1)[0] for key in self.store.list_prefix(f"{AUDIO}/")}
        purged = 0
        for prefix in sorted(hours):
            date, hour = prefix.split("/")[1].removeprefix("date="), prefix.split("/")[2].removeprefix("hour=")
            ends = datetime.fromisoformat(f"{date}T{hour}:00:00+00:00") + timedelta(hours=1)
            if ends < cutoff:
                self.store.delete_prefix(prefix + "/")
                purged += 1
        return purged

    def write_vocabulary(self, words: frozenset[str]) -> None:
        self.store.write_bytes(VOCABULARY_KEY, json.dumps(sorted(words)).encode())
