"""POST /v1/feedback: a client's corrected transcript for one of its requests.

The correction is joined to what was answered: from this ingress's memory of recent requests
(with their audio), else from the production log (with its sampled audio, when that request's
was sampled). The audio is kept apart as labelled audio (prodlog.labelled_audio_key), which the
sampled audio's purge leaves alone. Stored in the feedback store; each one also
adds to the live word error rate of the version that answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from asrops.feedback import (
    AnsweredRequest,
    FeedbackIn,
    FeedbackRecord,
    FeedbackStore,
    RecentRequests,
    join,
)
from asrops.prodlog import ProductionLogReader, flac_bytes, labelled_audio_key
from asrops.registry.store import ObjectStore
from asrops.serve.errors import UNAVAILABLE, ApiError, ErrorKind
from asrops.serve.metrics import IngressMetrics

log = logging.getLogger(__name__)

REQUEST_NOT_FOUND = ErrorKind(404, "invalid_request_error", "request_not_found", "request_id")
LOG_LOOKBACK = timedelta(days=1)


class FeedbackRecorder:
    def __init__(self, open_store: Callable[[], ObjectStore], recent: RecentRequests,
                 metrics: IngressMetrics | None = None, retry_after_s: int = 2):
        self._open_store, self.recent, self.metrics = open_store, recent, metrics
        self.retry_after_s = retry_after_s

    async def record(self, feedback: FeedbackIn, client: str) -> FeedbackRecord:
        """`client` is who sends the correction: only the client that made the request may (a
        foreign one is told the id is unknown, so ids of others' requests are not confirmed)."""
        answered = self.recent.get(feedback.request_id)  # read on the event loop, which also writes it
        try:
            record = await asyncio.to_thread(self._record, feedback, answered, client)
        except LookupError:
            raise ApiError(REQUEST_NOT_FOUND, f"No transcription with request id {feedback.request_id!r} is known "
                           "here: send the X-Request-Id header of a transcription answered in the last day.") from None
        except OSError as exc:
            log.warning("feedback for %s not stored: %s", feedback.request_id, exc)
            raise ApiError(UNAVAILABLE, "The feedback store is unavailable; retry after the time in Retry-After.",
                           headers={"Retry-After": str(self.retry_after_s)}) from None
        self._count(record)
        log.info("feedback for %s (version %s): %d word errors in %d words", record.request_id,
                 record.model_version, record.word_errors, record.reference_words)
        return record

    def _record(self, feedback: FeedbackIn, answered: AnsweredRequest | None, client: str) -> FeedbackRecord:
        store = self._open_store()
        if answered is not None:
            if not answered.belongs_to(client):
                raise LookupError(feedback.request_id)
            audio = flac_bytes(answered.samples) if answered.samples is not None else None
        else:
            answered, sampled_key = self._from_log(store, feedback.request_id)
            if not answered.belongs_to(client):
                raise LookupError(feedback.request_id)
            audio = store.read_bytes(sampled_key)[0] if sampled_key else None  # the sampled copy is purged in days
        key = None
        if audio is not None:
            key = labelled_audio_key(feedback.request_id, answered.time)
            store.write_bytes(key, audio)
        record = join(feedback, answered, key)
        FeedbackStore(store).save(record)
        return record

    def _from_log(self, store: ObjectStore, request_id: str) -> tuple[AnsweredRequest, str | None]:
        now = datetime.now(UTC)
        frame = ProductionLogReader(store).read(now - LOG_LOOKBACK, now)
        rows = frame[(frame["request_id"] == request_id) & (frame["status"] == 200)]
        if rows.empty:
            raise LookupError(request_id)
        row = rows.iloc[-1]
        owner = row.get("client")
        answered = AnsweredRequest(model_version=row["model_version"], route=row["route"], text=row["text"] or "",
                                   time=row["time"].to_pydatetime(), samples=None,
                                   client=owner if isinstance(owner, str) else None)
        return answered, row["audio_key"] if isinstance(row["audio_key"], str) else None

    def _count(self, record: FeedbackRecord) -> None:
        if not self.metrics:
            return
        tags = {"model_version": record.model_version, "route": record.route}
        self.metrics.feedback.inc(1, tags=tags)
        if record.word_errors:
            self.metrics.feedback_word_errors.inc(record.word_errors, tags=tags)
        if record.reference_words:
            self.metrics.feedback_reference_words.inc(record.reference_words, tags=tags)
