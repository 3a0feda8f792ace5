"""What every transcription request leaves behind: its metrics and its production-log record.

The API calls `RequestTelemetry.observe` once per request, after the response is ready; it
only updates in-memory metrics and appends to the production log's buffer, so neither can
slow or fail the request.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from asrops.audio import DecodedAudio
from asrops.feedback import AnsweredRequest, RecentRequests
from asrops.prodlog import FinishedRequest, ProductionLogWriter
from asrops.serve.metrics import IngressMetrics

log = logging.getLogger(__name__)

DECODE_ERROR_CODES = frozenset({"unsupported_media", "empty_file", "invalid_audio", "audio_too_long",
                                "file_too_large"})
NO_ROUTE = "none"


class RequestTelemetry:
    def __init__(self, metrics: IngressMetrics | None, writer: ProductionLogWriter | None,
                 recent: RecentRequests | None = None):
        self.metrics, self.writer, self.recent = metrics, writer, recent

    def observe(self, request_id: str, status: int, latency_s: float, error_code: str | None,
                decoded: DecodedAudio | None, result, asked_version: str | None = None,
                client: str | None = None) -> None:
        """`result` is the TranscribeResult of a request that was answered, else None;
        `asked_version` is the version its model name resolved to (what a failure counts against);
        `client` is who sent it (a key's id or `anonymous`), metered in audio seconds."""
        try:
            self._observe(request_id, status, latency_s, error_code, decoded, result, asked_version, client)
        except Exception:  # telemetry must never turn an answered request into an error
            log.exception("request %s: telemetry failed", request_id)

    def _observe(self, request_id, status, latency_s, error_code, decoded, result, asked_version, client) -> None:
        version, route = (result.version, result.route) if result else (asked_version or "", NO_ROUTE)
        now = datetime.now(UTC)
        if self.recent is not None and result:
            self.recent.add(request_id, AnsweredRequest(model_version=version, route=route, time=now,
                                                        text=result.transcription.text,
                                                        samples=decoded.samples if decoded is not None else None,
                                                        client=client))
        if self.metrics:
            self.metrics.request(version, route, status, latency_s)
            if error_code in DECODE_ERROR_CODES:
                self.metrics.decode_errors.inc(1, tags={"kind": error_code})
            if result:
                t = result.transcription
                self.metrics.transcription(version, route, t.duration_s, latency_s, t.segments)
                if client:
                    self.metrics.client_audio.inc(t.duration_s, tags={"client": client})
        if self.writer:
            self.writer.submit(FinishedRequest(
                request_id=request_id, time=now, model_version=version, route=route, status=status,
                latency_s=latency_s, error_code=error_code, client=client,
                samples=decoded.samples if decoded is not None else None,
                original_sample_rate=decoded.original_sample_rate if decoded is not None else None,
                original_channels=decoded.original_channels if decoded is not None else None,
                transcription=result.transcription if result else None,
            ))
