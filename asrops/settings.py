"""The one settings object. Every field can be set by an env var with the `ASROPS_` prefix;
nested fields use a double underscore (`ASROPS_ENGINE__KIND=torch`)."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "asrops"


class RegistrySettings(BaseModel):
    uri: str = ""
    """Where model versions live: a local directory, or `s3://bucket/prefix`.
    Empty means `<data_dir>/registry`."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto, ...); None means AWS's own."""
    s3_region: str = "us-east-1"
    cache_dir: Path | None = None
    """Local copy of versions fetched from S3, verified before use. None means `<data_dir>/cache`."""


class EngineSettings(BaseModel):
    kind: Literal["torch", "onnx", "onnx-int8"] = "onnx-int8"
    """Inference engine: `onnx-int8` (ONNX Runtime, int8 weights: fastest on CPU), `onnx` (fp32)
    or `torch` (transformers; fp16 on CUDA)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` takes CUDA when torch (or onnxruntime-gpu) sees a GPU."""
    threads: int = Field(default=0, ge=0)
    """Intra-op threads per engine; 0 means one per CPU core."""
    lanes: int = Field(default=0, ge=0)
    """Engines per model replica decoding batches side by side; 0 means 2 on CPU, 1 on GPU."""
    beam_size: int = Field(default=1, ge=1, le=16)
    """Default beam width; 1 is greedy decoding."""
    max_new_tokens: int = Field(default=224, ge=1, le=448)
    """Most tokens decoded per 30-s window (Whisper's context is 448; half is for the prompt)."""


class AudioSettings(BaseModel):
    max_upload_bytes: int = 25 * 1024 * 1024
    """Largest accepted upload, in bytes (OpenAI's limit is 25 MiB)."""
    max_duration_s: float = 600.0
    """Longest accepted audio, in seconds."""
    max_sample_rate_hz: int = 384_000
    """Highest accepted input sample rate, in Hz."""
    max_channels: int = 32
    """Most accepted input channels."""


class BreakerSettings(BaseModel):
    """When a version stops getting traffic (see serve/breaker.py)."""

    consecutive_failures: int = Field(default=5, ge=1)
    """Server-side failures in a row that open the breaker."""
    error_ratio: float = Field(default=0.5, gt=0, le=1)
    """Share of failed requests inside `window_s` that opens the breaker..."""
    min_requests: int = Field(default=10, ge=1)
    """...once the window holds at least this many requests."""
    window_s: float = Field(default=30.0, gt=0)
    open_s: float = Field(default=10.0, gt=0)
    """How long an open breaker refuses traffic before letting probes through."""
    half_open_probes: int = Field(default=1, ge=1)
    """Requests let through at once while half-open; one success closes the breaker."""


class ServeSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = []
    """Client keys; empty means no auth. Only their sha256 is kept in memory after start."""
    admin_tokens: list[str] = []
    """Tokens for the admin API (/admin/...); empty means the admin API is off (403)."""
    request_timeout_s: float = 120.0
    """A transcription not answered in this many seconds gets 504."""
    max_batch_size: int = Field(default=8, ge=1)
    """Most requests one engine lane decodes together."""
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    """How long a replica gathers requests that arrive together, in seconds. Short: under load,
    requests wait for a free engine lane and are batched then; alone, a request should not wait."""
    max_ongoing_requests: int = Field(default=16, ge=1)
    """Requests in flight per model replica (a batch is built from these)."""
    max_queued_requests: int = Field(default=64, ge=-1)
    """Requests waiting per model deployment before new ones get 503 + Retry-After; -1 = no limit."""
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    """Autoscaling bounds per model version; one replica per 2 cores is right on CPU."""
    model_num_cpus: float = Field(default=0.5, gt=0)
    """CPUs Ray reserves per model replica. Half a CPU lets a 2-core node hold stable, canary
    and fallback side by side; the engine's threads (engine.threads) decide what it really uses."""
    target_ongoing_requests: float = 8.0
    """Autoscaling target of in-flight requests per replica."""
    ingress_replicas: int = 1
    ingress_max_ongoing_requests: int = Field(default=64, ge=1)
    """Requests in flight per ingress replica; above the model's own limit so batches can form."""
    retry_after_s: int = 2
    """Value of Retry-After on 503 responses, in seconds."""
    canary_timeout_s: float = Field(default=30.0, gt=0)
    """A canary (or any version with somewhere to fall back to) not answering within this many
    seconds is given up on and the next version in line answers."""
    breaker: BreakerSettings = BreakerSettings()


class ProductionLogSettings(BaseModel):
    """One record per request (serve/telemetry.py writes, monitoring/ reads), off the request path."""

    uri: str = ""
    """A local directory or `s3://bucket/prefix`. Empty means `<data_dir>/prodlog`."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for an `s3://` uri; None means AWS's own."""
    enabled: bool = True
    flush_interval_s: float = Field(default=2.0, gt=0)
    """How often buffered records are written as one parquet file, in seconds."""
    max_buffered_records: int = Field(default=20_000, ge=1)
    """Records held in memory while the store is slow or failing; beyond this the oldest are dropped (counted)."""
    keep_audio: bool = True
    """False keeps no audio at all; only features and transcripts are logged."""
    audio_sample_share: float = Field(default=0.1, ge=0, le=1)
    """Share of successful requests whose audio is kept (16 kHz FLAC) for relabelling."""
    audio_retention_days: float = Field(default=7.0, gt=0)
    """Sampled audio older than this many days is deleted by the drift monitor."""
    recent_requests: int = Field(default=512, ge=0)
    """Answered requests each ingress remembers (text and audio), so that feedback on them can
    be joined and their audio kept for relabelling..."""
    recent_audio_s: float = Field(default=3_600.0, ge=0)
    """...holding at most this many seconds of audio (16 kHz float32: 64 KB a second)."""


class DriftSettings(BaseModel):
    """The drift monitor (monitoring/): an Evidently report per window against a reference."""

    window_s: float = Field(default=300.0, gt=0)
    """Length of one current window, in seconds; the monitor runs once per window."""
    min_samples: int = Field(default=30, ge=1)
    """A window with fewer successful requests gets no drift judgement (no verdict on thin data)."""
    drift_share: float = Field(default=0.5, gt=0, le=1)
    """Share of drifted columns that makes a window drifted (Evidently's dataset drift)."""
    verdict_windows: int = Field(default=3, ge=1)
    """N: how many recent judged windows a verdict looks at..."""
    verdict_drifted: int = Field(default=2, ge=1)
    """...K: how many of them must be drifted for a drift verdict."""
    numeric_features: list[str] = [
        "duration_s", "rms_dbfs", "peak", "clipping_ratio", "snr_db", "silence_ratio",
        "spectral_centroid_hz", "words", "characters", "words_per_s", "avg_logprob",
        "no_speech_prob", "compression_ratio", "oov_share",
    ]
    categorical_features: list[str] = ["original_sample_rate", "original_channels"]
    text_feature: str | None = "text"
    """Transcript column checked for text drift (a TF-IDF domain classifier); None skips it."""
    numeric_method: str | None = "ks"
    """Evidently stat test for numeric columns (`ks`, `wasserstein`, `psi`, ...); None = Evidently's
    default by size, which above 1,000 reference rows is normed Wasserstein at 0.1: on windows of
    tens of requests sampling noise alone passes 0.1 (measured: 65-88 % of columns "drifted" on
    undrifted windows), where K-S keeps its 5 % false-alarm rate per column."""
    categorical_method: str | None = "chisquare"
    text_method: str | None = None
    column_methods: dict[str, str] = {}
    """Per-column stat test overriding the defaults above, e.g. `{"snr_db": "wasserstein"}`."""
    column_thresholds: dict[str, float] = {}
    """Per-column threshold for its stat test (p-value for tests, distance for distances)."""
    reference_rows: int = Field(default=2_000, ge=10)
    """Most reference rows used (sampled), to bound the report's cost."""


class MonitoringSettings(BaseModel):
    monitor_port: int = 9464
    """Where the drift monitor serves its /metrics."""
    prometheus_port: int = 9090
    prometheus_binary: str = "prometheus"
    """Debian's `prometheus` package; `asrops serve` starts one unless `prometheus_enabled` is false."""
    prometheus_enabled: bool = True
    scrape_interval_s: float = Field(default=5.0, gt=0)
    ray_metrics_port: int = 8080
    """Ray's own Prometheus endpoint on each node (replica metrics); Ray lists its nodes in a
    service-discovery file that Prometheus reads."""
    drift: DriftSettings = DriftSettings()
    production_log: ProductionLogSettings = ProductionLogSettings()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ASROPS_", env_nested_delimiter="__", extra="ignore"
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    """Root of everything the embedded deployment writes (registry, logs, reports)."""
    log_level: str = "INFO"
    speech_data_dir: Path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech"
    """Real recorded speech with transcripts (`manifest.jsonl`), beside the checkout by default;
    used by the engine benchmark and the tests that need real speech."""
    registry: RegistrySettings = RegistrySettings()
    engine: EngineSettings = EngineSettings()
    audio: AudioSettings = AudioSettings()
    serve: ServeSettings = ServeSettings()
    monitoring: MonitoringSettings = MonitoringSettings()

    @cached_property
    def registry_uri(self) -> str:
        return self.registry.uri or str(self.data_dir / "registry")

    @cached_property
    def production_log_uri(self) -> str:
        return self.monitoring.production_log.uri or str(self.data_dir / "prodlog")

    @cached_property
    def cache_dir(self) -> Path:
        return self.registry.cache_dir or (self.data_dir / "cache")


def load_settings() -> Settings:
    """Read settings from the environment; call once at a process's entry point and pass on."""
    return Settings()
