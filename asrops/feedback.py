"""Feedback: corrected transcripts that clients send for requests they made.

Each correction is joined, when it arrives, to what the service answered (version, its text)
and to the request's audio, which is kept for relabelling whether or not the production log
had sampled it. Stored beside the production log, by the date of the request (so a second
correction of a request lands on the first and replaces it):

    feedback/date=YYYY-MM-DD/<request id>.json

It is the source of labels for retraining and of live word error rates per version. Every
consumer counts clients, not corrections (`by_client`): one API key is one voice, however many
corrections it sends.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, StringConstraints

from asrops.audio_format import SAMPLE_RATE
from asrops.errors import ConflictError
from asrops.evaluation import score
from asrops.prodlog import REQUEST_TO_FEEDBACK
from asrops.registry.store import ObjectStore
from asrops.request_id import RequestId

log = logging.getLogger(__name__)

FEEDBACK = "feedback"
SAVE_RETRIES = 5


TagName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
TagValue = Annotated[str, StringConstraints(max_length=256)]


class FeedbackIn(BaseModel):
    """What a client sends to POST /v1/feedback."""

    request_id: RequestId
    """The X-Request-Id of the transcription being corrected."""
    text: str = Field(max_length=20_000)
    """The correct transcript."""
    tags: dict[TagName, TagValue] = Field(default_factory=dict, max_length=20)
    """Optional slice tags (accent, domain, device, ...), used to stratify retraining data."""


class FeedbackRecord(BaseModel):
    """A stored correction, joined to what was answered."""

    request_id: str
    received_at: datetime
    model_version: str
    route: str
    hypothesis: str
    reference: str
    tags: dict[str, str]
    audio_key: str | None
    """Where the request's audio is (16 kHz FLAC), for retraining."""
    word_errors: int
    reference_words: int
    client: str | None = None
    """Who corrected it (the client that made the request); None in records from before it was kept."""
    requested_at: datetime | None = None
    """When the request was answered: the date in the record's key (None in older records, which
    are keyed by `received_at`)."""

    @property
    def wer(self) -> float | None:
        return 100.0 * self.word_errors / self.reference_words if self.reference_words else None


@dataclass
class AnsweredRequest:
    """What the service remembers of a recent request so that feedback can be joined to it."""

    model_version: str
    route: str
    text: str
    time: datetime
    samples: np.ndarray | None
    client: str | None = None
    """Who asked (an API key's id, or `anonymous`); None when not known."""

    def belongs_to(self, client: str) -> bool:
        """Only the client that made a request may correct it (unknown owners are let through)."""
        return self.client is None or self.client == client


class RecentRequests:
    """The last answered requests (bounded by count and by seconds of audio), in memory: most
    feedback comes within minutes, and a request's audio must still be at hand to keep it."""

    def __init__(self, max_requests: int = 512, max_audio_s: float = 600.0):
        self.max_requests, self.max_audio_s = max_requests, max_audio_s
        self._items: OrderedDict[str, AnsweredRequest] = OrderedDict()
        self._audio_s = 0.0

    def add(self, request_id: str, answered: AnsweredRequest) -> None:
        if (replaced := self._items.pop(request_id, None)) is not None:  # a reused id: count its audio once
            self._audio_s -= self._seconds(replaced)
        self._items[request_id] = answered
        self._audio_s += self._seconds(answered)
        while self._items and (len(self._items) > self.max_requests or self._audio_s > self.max_audio_s):
            _, old = self._items.popitem(last=False)
            self._audio_s -= self._seconds(old)

    def get(self, request_id: str) -> AnsweredRequest | None:
        return self._items.get(request_id)

    @staticmethod
    def _seconds(a: AnsweredRequest) -> float:
        return len(a.samples) / SAMPLE_RATE if a.samples is not None else 0.0


def join(feedback: FeedbackIn, answered: AnsweredRequest, audio_key: str | None) -> FeedbackRecord:
    s = score([feedback.text], [answered.text])
    return FeedbackRecord(
        request_id=feedback.request_id, received_at=datetime.now(UTC), model_version=answered.model_version,
        route=answered.route, hypothesis=answered.text, reference=feedback.text, tags=feedback.tags,
        audio_key=audio_key, word_errors=s.word_errors, reference_words=s.words,
        client=answered.client, requested_at=answered.time,
    )


class FeedbackStore:
    def __init__(self, store: ObjectStore):
        self.store = store

    @staticmethod
    def key(request_id: str, requested_at: datetime) -> str:
        return f"{FEEDBACK}/date={requested_at:%Y-%m-%d}/{request_id}.json"

    def save(self, record: FeedbackRecord) -> FeedbackRecord | None:
        """Store `record`; a second correction of the same request replaces the first, which is
        returned (so that live counters can move by the difference)."""
        key = self.key(record.request_id, record.requested_at or record.received_at)
        for attempt in range(SAVE_RETRIES + 1):  # compare-and-swap: two at once replace one another in turn
            try:
                data, token = self.store.read_bytes(key)
                replaced = FeedbackRecord.model_validate_json(data)
            except KeyError:
                token, replaced = None, None
            try:
                self.store.write_if(key, record.model_dump_json().encode(), token)
                return replaced
            except ConflictError:
                if attempt == SAVE_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def read(self, start: datetime, end: datetime) -> pd.DataFrame:
        """Corrections received in [start, end), one row each (the latest of each request)."""
        rows = []
        day = (start - REQUEST_TO_FEEDBACK).date()  # keyed by request date, which comes first
        while day <= end.date():
            for key in self.store.list_prefix(f"{FEEDBACK}/date={day:%Y-%m-%d}/"):
                record = FeedbackRecord.model_validate(json.loads(self.store.read_bytes(key)[0]))
                if start <= record.received_at < end:
                    rows.append(record.model_dump())
            day += timedelta(days=1)
        return pd.DataFrame(rows, columns=list(FeedbackRecord.model_fields))


class ClientWer(BaseModel):
    """Live WER over corrections, counted by client: each client's WER over its own corrections,
    and the median of those, so that one key (however many corrections it sends) moves it no
    further than any other."""

    clients: int
    median_wer: float | None
    """Percent; None without corrections that have words."""


def by_client(frame: pd.DataFrame) -> ClientWer:
    """`frame`: rows of FeedbackStore.read. Records without a client count as one client."""
    if not len(frame):
        return ClientWer(clients=0, median_wer=None)
    who = frame["client"].fillna("unknown") if "client" in frame else pd.Series("unknown", index=frame.index)
    sums = frame.groupby(who)[["word_errors", "reference_words"]].sum()
    with_words = sums[sums["reference_words"] > 0]
    wers = 100.0 * with_words["word_errors"] / with_words["reference_words"]
    return ClientWer(clients=len(sums), median_wer=float(wers.median()) if len(wers) else None)
