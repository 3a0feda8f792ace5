"""Replica metrics, through Ray's own metrics API (exported by each node's Prometheus endpoint
with a `ray_` prefix: `asrops_requests_total` is scraped as `ray_asrops_requests_total`).

Every metric about a model carries `model_version` (not `version`: Ray adds a `Version` label
of its own) and, where a request took a route, `route`. Names follow Prometheus conventions:
base units, `_total` for counters, `_seconds` for durations. The dashboards and alert rules
in monitoring/ are written against these names.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from asrops.serve.breaker import BreakerState

LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
AUDIO_BUCKETS = [1, 2, 5, 10, 20, 30, 60, 120, 300, 600]
RTF_BUCKETS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5]
NEG_LOGPROB_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1, 1.5, 2, 3]
PROB_BUCKETS = [0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1]
COMPRESSION_BUCKETS = [0.5, 1, 1.5, 2, 2.4, 3, 4]
WER_BUCKETS = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32]
BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}

VR = ("model_version", "route")


class IngressMetrics:
    """Everything the ingress measures per request and per routing change."""

    def __init__(self):
        self.requests = Counter("asrops_requests_total", "Transcription requests by HTTP status and route.",
                                tag_keys=(*VR, "status"))
        self.latency = Histogram("asrops_request_duration_seconds", "Time from request to response.",
                                 boundaries=LATENCY_BUCKETS, tag_keys=VR)
        self.audio = Histogram("asrops_audio_duration_seconds", "Duration of the transcribed audio.",
                               boundaries=AUDIO_BUCKETS, tag_keys=VR)
        self.rtf = Histogram("asrops_real_time_factor", "Processing seconds per audio second.",
                             boundaries=RTF_BUCKETS, tag_keys=VR)
        self.decode_errors = Counter("asrops_decode_errors_total", "Uploads refused, by error code.",
                                     tag_keys=("kind",))
        self.client_audio = Counter("asrops_client_audio_seconds_total", "Audio seconds transcribed per client "
                                    "(an API key's id, or anonymous).", tag_keys=("client",))
        # Ray histograms take positive bucket bounds only, so avg_logprob (<= 0) is recorded negated.
        self.neg_avg_logprob = Histogram("asrops_segment_neg_avg_logprob", "-avg_logprob per segment: 0 is "
                                         "certain; above 1 Whisper doubts the segment.",
                                         boundaries=NEG_LOGPROB_BUCKETS, tag_keys=VR)
        self.no_speech = Histogram("asrops_segment_no_speech_prob", "Whisper's no_speech_prob per segment.",
                                   boundaries=PROB_BUCKETS, tag_keys=VR)
        self.compression = Histogram("asrops_segment_compression_ratio", "gzip ratio of each segment's text.",
                                     boundaries=COMPRESSION_BUCKETS, tag_keys=VR)
        self.fallbacks = Counter("asrops_fallbacks_total", "Requests a version failed and the next in line "
                                 "answered; model_version is the version that failed.", tag_keys=VR)
        self.breaker_skips = Counter("asrops_breaker_skips_total", "Requests meant for a version whose open "
                                     "breaker skipped it; the next in line answered.", tag_keys=VR)
        self.breaker = Gauge("asrops_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                             tag_keys=("model_version",))
        self.canary_weight = Gauge("asrops_canary_weight", "Percent of clients routed to the canary.",
                                   tag_keys=("model_version",))
        self.shadow_share = Gauge("asrops_shadow_share", "Share of stable requests copied to the canary.",
                                  tag_keys=("model_version",))
        self.shadow_disagreement = Histogram("asrops_shadow_disagreement_ratio", "WER of the shadow canary's "
                                             "text against the stable's answer.", boundaries=WER_BUCKETS,
                                             tag_keys=("model_version",))
        self.log_records = Counter("asrops_production_log_records_total", "Production log records by outcome.",
                                   tag_keys=("outcome",))
        self.log_failures = Counter("asrops_production_log_write_failures_total",
                                    "Failed writes to the production log store.")
        # Live WER per version and client from corrections: (errors - retracted errors) / (words -
        # retracted words); a second correction of a request retracts what the first added.
        vrc = (*VR, "client")
        self.feedback = Counter("asrops_feedback_total", "Requests corrected (once each, however often).",
                                tag_keys=vrc)
        self.feedback_word_errors = Counter("asrops_feedback_word_errors_total", "Word errors of the answered "
                                            "text against corrections.", tag_keys=vrc)
        self.feedback_reference_words = Counter("asrops_feedback_reference_words_total", "Words in the "
                                                "corrections.", tag_keys=vrc)
        self.feedback_retracted_word_errors = Counter(
            "asrops_feedback_retracted_word_errors_total", "Word errors of corrections replaced by a later one.",
            tag_keys=vrc)
        self.feedback_retracted_reference_words = Counter(
            "asrops_feedback_retracted_reference_words_total", "Words of corrections replaced by a later one.",
            tag_keys=vrc)

    def request(self, version: str, route: str, status: int, latency_s: float) -> None:
        tags = {"model_version": version, "route": route}
        self.requests.inc(1, tags={**tags, "status": str(status)})
        self.latency.observe(latency_s, tags=tags)

    def transcription(self, version: str, route: str, duration_s: float, latency_s: float, segments) -> None:
        tags = {"model_version": version, "route": route}
        self.audio.observe(duration_s, tags=tags)
        if duration_s > 0:
            self.rtf.observe(latency_s / duration_s, tags=tags)
        for s in segments:
            self.neg_avg_logprob.observe(-s.avg_logprob, tags=tags)
            self.no_speech.observe(s.no_speech_prob, tags=tags)
            self.compression.observe(s.compression_ratio, tags=tags)

    def production_log_event(self, name: str, count: int) -> None:
        if name == "write_failure":
            self.log_failures.inc(count)
        else:
            self.log_records.inc(count, tags={"outcome": name})


class ModelMetrics:
    """What a model replica measures: how large its batches are and how many requests wait."""

    def __init__(self, version: str):
        self.tags = {"model_version": version}
        self.batch_size = Histogram("asrops_batch_size", "Requests decoded together in one engine call.",
                                    boundaries=BATCH_BUCKETS, tag_keys=("model_version",))
        self.queue_depth = Gauge("asrops_queue_depth", "Requests waiting for a free engine lane.",
                                 tag_keys=("model_version",))
        self.queue_depth.set(0, tags=self.tags)
        self.slice_gate_windows = Counter(
            "asrops_slice_gate_windows_total", "30-s windows a retrained version with a slice gate encoded, by "
            "encoder: its retrained one (audio like its drift) or its parent's.", tag_keys=("model_version", "encoder"))

    def batch(self, size: int, queued: int) -> None:
        self.batch_size.observe(size, tags=self.tags)
        self.queue_depth.set(queued, tags=self.tags)

    def slice_gate(self, retrained: int, parent: int) -> None:
        for encoder, n in (("retrained", retrained), ("parent", parent)):
            if n:
                self.slice_gate_windows.inc(n, tags={**self.tags, "encoder": encoder})
