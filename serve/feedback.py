"""POST /v1/feedback: a client's corrected transcript for one of its requests.

The correction is joined to what was answered: from this ingress's memory of recent requests
(with their audio), else from the production log's request index (with its sampled audio, when
that request's was sampled): an unknown id costs two reads, never a scan. The audio is kept
apart as labelled audio (prodlog.labelled_audio_key), which the sampled audio's purge leaves
alone. Stored in the feedback store, one correction per request: a second replaces the first,
and the live word error counters of the version that answered move by the difference (what the
first had added is counted as retracted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from asrops.feedback import (
    AnsweredRequest,
    FeedbackIn,
    FeedbackRecord,
    FeedbackStore,
    RecentRequests,
    join,
)
from asrops.prodlog import find_request, flac_bytes, labelled_audio_key
from asrops.registry.store import ObjectStore
from asrops.serve.errors import UNAVAILABLE, ApiError, ErrorKind
from asrops.serve.metrics import IngressMetrics

log = logging.getLogger(__name__)

REQUEST_NOT_FOUND = ErrorKind(404, "invalid_request_error", "request_not_found", "request_id")
STORE_THREADS = 4
"""Feedback store calls at once; more wait their turn (within the deadline)."""


class FeedbackRecorder:
    def __init__(self, open_store: Callable[[], ObjectStore], recent: RecentRequests,
                 metrics: IngressMetrics | None = None, retry_after_s: int = 2, timeout_s: float = 10.0):
        self._open_store, self.recent, self.metrics = open_store, recent, metrics
        self.retry_after_s, self.timeout_s = retry_after_s, timeout_s
        # Store calls get threads of their own: on a hung store each waits out the S3 client's
        # timeouts (minutes), and in the event loop's shared pool they would starve the audio
        # decoding of every transcription.
        self._threads = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="feedback-store")

    async def record(self, feedback: FeedbackIn, client: str) -> FeedbackRecord:
        """`client` is who sends the correction: only the client that made the request may (a
        foreign one is told the id is unknown, so ids of others' requests are not confirmed)."""
        answered = self.recent.get(feedback.request_id)  # read on the event loop, which also writes it
        try:
            # The thread is not cancelled by the deadline: a correction it still stores is
            # counted there, and the client's retry replaces it (counted by the difference).
            stored = asyncio.get_running_loop().run_in_executor(self._threads, self._record, feedback, answered, client)
            record, replaced = await asyncio.wait_for(stored, self.timeout_s)
        except TimeoutError:
            log.warning("feedback for %s: the feedback store did not answer in %.0f s", feedback.request_id,
                        self.timeout_s)
            raise ApiError(UNAVAILABLE, "The feedback store is not answering; retry after the time in Retry-After.",
                           headers={"Retry-After": str(self.retry_after_s)}) from None
        except LookupError:
            raise ApiError(REQUEST_NOT_FOUND, f"No transcription with request id {feedback.request_id!r} is known "
                           "here: send the X-Request-Id header of a transcription answered in the last day.") from None
        except OSError as exc:
            log.warning("feedback for %s not stored: %s", feedback.request_id, exc)
            raise ApiError(UNAVAILABLE, "The feedback store is unavailable; retry after the time in Retry-After.",
                           headers={"Retry-After": str(self.retry_after_s)}) from None
        log.info("feedback for %s (version %s, client %s): %d word errors in %d words%s", record.request_id,
                 record.model_version, client, record.word_errors, record.reference_words,
                 " (replaces an earlier correction)" if replaced else "")
        return record

    def _record(self, feedback: FeedbackIn, answered: AnsweredRequest | None,
                client: str) -> tuple[FeedbackRecord, FeedbackRecord | None]:
        store = self._open_store()
        if answered is not None:
            if not answered.belongs_to(client):
                raise LookupError(feedback.request_id)
            audio = flac_bytes(answered.samples) if answered.samples is not None else None
        else:
            answered, sampled_key = self._from_index(store, feedback.request_id)
            if not answered.belongs_to(client):
                raise LookupError(feedback.request_id)
            audio = store.read_bytes(sampled_key)[0] if sampled_key else None  # the sampled copy is purged in days
        key = None
        if audio is not None:
            key = labelled_audio_key(feedback.request_id, answered.time)
            store.write_bytes(key, audio)
        record = join(feedback, answered, key)
        record.client = client
        replaced = FeedbackStore(store).save(record)
        self._count(record, replaced)  # here, not after the deadline: stored means counted
        return record, replaced

    @staticmethod
    def _from_index(store: ObjectStore, request_id: str) -> tuple[AnsweredRequest, str | None]:
        found = find_request(store, request_id, datetime.now(UTC))
        if found is None:
            raise LookupError(request_id)
        answered = AnsweredRequest(model_version=found.model_version, route=found.route, text=found.text,
                                   time=found.time, samples=None, client=found.client)
        return answered, found.audio_key

    def _count(self, record: FeedbackRecord, replaced: FeedbackRecord | None) -> None:
        """Counters only grow: a replaced correction's words are counted again as retracted, so
        that (added - retracted) is what the stored corrections hold (promotion/checks.py)."""
        if not self.metrics:
            return
        m = self.metrics
        tags = {"model_version": record.model_version, "route": record.route, "client": record.client or ""}
        if replaced is None:
            m.feedback.inc(1, tags=tags)
        for added, retracted, new, old in (
                (m.feedback_word_errors, m.feedback_retracted_word_errors, record.word_errors,
                 replaced.word_errors if replaced else 0),
                (m.feedback_reference_words, m.feedback_retracted_reference_words, record.reference_words,
                 replaced.reference_words if replaced else 0)):
            if new:
                added.inc(new, tags=tags)
            if old:
                retracted.inc(old, tags=tags)
