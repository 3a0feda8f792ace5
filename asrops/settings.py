"""The one settings object. Every field can be set by an env var with the `ASROPS_` prefix;
nested fields use a double underscore (`ASROPS_ENGINE__KIND=torch`)."""

from __future__ import annotations

import math
import os
from functools import cached_property
from pathlib import Path
from string import Template
from typing import Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from asrops.audio_format import LONGEST_AUDIO_S

LONGEST_PROMPT_CHARS = 100_000
"""The most that `ServeSettings.max_prompt_chars` may allow: Serve's hop to a model replica keeps
a MiB beside the audio for a request's options (asrops/raycluster.py `MODEL_REQUEST_MAX_BYTES`)."""


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
    """Batches a model replica decodes side by side on its one engine; 0 means 2 on CPU, 1 on GPU.
    An ONNX engine's decoder steps on the cores shared among them (`engines.decoder_threads`)."""
    beam_size: int = Field(default=1, ge=1, le=16)
    """Default beam width; 1 is greedy decoding."""
    max_new_tokens: int = Field(default=224, ge=1, le=448)
    """Most tokens decoded per 30-s window (Whisper's context is 448; half is for the prompt)."""
    temperature_fallback: bool = True
    """Re-decode a window that loops or is improbable at rising temperatures, as openai/whisper
    does (`DecodeOptions.temperature_increment`); off: every window is kept as first decoded."""
    temperature_increment: float | None = Field(default=None, gt=0.0, le=1.0)
    """The fallback's temperature step; None keeps openai/whisper's 0.2 (five more tries at most).
    0.4 tries twice (0.4, 0.8): about half the fallback's cost on noisy speech."""
    pack_windows: bool = False
    """Short clips batched together in a replica share 30-s windows and are cut back by their
    timestamps (engines/packing.py): the encoder runs once for several clips, the decoder runs
    longer rows. Off: with tiny.en on 2 CPU cores it is slower than plain batches of 8 (RTFx 18.97
    vs 21.42 on the 245 core clips, WER 6.58 vs 6.55 %, `asrops bench engine --engines
    onnx-int8@8,onnx-int8+pack@8`); worth measuring for a model whose encoder dominates. Only at
    temperature 0 with timestamps and without word timestamps; work off the request path never
    packs."""
    short_windows: bool = True
    """Encode a short clip's window over its audio and at least 10 s of padding (15 s at least,
    in steps of 5 s), not 30 s: the encoder is most of an engine's time, and its attention grows
    with the square of the frames (engines/engine.py). ONNX engines only, and only over graphs
    exported by this asrops; off, every window is 30 s, as Whisper was trained."""
    offline_batch_size: int = Field(default=8, ge=1)
    """Clips one engine call transcribes in work off the request path: a retrain's evaluation,
    self-labelling and validation, and the drift reference (8 x 30-s windows: ~1 GB peak on CPU)."""

    def decode_options(self):
        """What a plain request decodes with: evaluations that must judge what serves use these."""
        from asrops.engines.types import DecodeOptions

        options = DecodeOptions(beam_size=self.beam_size, max_new_tokens=self.max_new_tokens)
        if not self.temperature_fallback:
            return options.model_copy(update={"temperature_increment": None})
        if self.temperature_increment is not None:
            return options.model_copy(update={"temperature_increment": self.temperature_increment})
        return options


class AudioSettings(BaseModel):
    max_upload_bytes: int = 25 * 1024 * 1024
    """Largest accepted upload, in bytes (OpenAI's limit is 25 MiB)."""
    max_duration_s: float = Field(default=600.0, gt=0, le=LONGEST_AUDIO_S)
    """Longest accepted audio, in seconds (at most two hours: Serve's hop to a model replica is
    sized for that, asrops/raycluster.py)."""
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
    proxy_port: int | None = Field(default=None, ge=1, le=65535)
    """Serve's HTTP proxy, on a local cluster, where the ingress replica answers on `port` itself
    (direct ingress): it reaches the same ingress, and any other application deployed beside it.
    None: a free port."""
    ray_dashboard_modules: list[str] | None = Field(default=["JobHead", "NodeHead"], min_length=1)
    """The parts of Ray's dashboard a local cluster runs: the Jobs API that retrains go through
    (JobHead) and the record of the head node it submits to (NodeHead). Ray's others ran seven
    more processes beside the engine (its web UI's pages on actors, tasks, logs, Serve, Data and
    Train) and its usage-stats reporting. None: all of Ray's. Not used on KubeRay or with
    RAY_ADDRESS."""
    api_keys: list[str] = []
    """Client keys; empty means no auth. Only their sha256 is kept in memory after start."""
    admin_tokens: list[str] = []
    """Tokens for the admin API (/admin/...); empty means the admin API is off (403)."""
    admin_port: int | None = Field(default=None, ge=1, le=65535)
    """Serve the admin API on its own port, on 127.0.0.1 (each ingress replica tries to bind it:
    run one ingress replica per node), and not on the client port, which then answers 404 for
    /admin. None: /admin beside /v1 on the client port, behind the admin tokens."""
    rate_limit_per_s: float | None = Field(default=None, gt=0)
    """Transcriptions per second one client (one API key; all anonymous callers together) may
    start, per ingress replica; more get 429 + Retry-After. None: no rate limit."""
    rate_limit_burst: int = Field(default=20, ge=1)
    """Requests a client may send at once above its rate (the token bucket's size)."""
    max_in_flight_per_client: int | None = Field(default=64, ge=1)
    """Transcriptions of one client in flight at once, per ingress replica; more get 429. None:
    no limit. The default is above what one well-behaved client sends (benchmarks use 16)."""
    max_prompt_chars: int = Field(default=1000, ge=0, le=LONGEST_PROMPT_CHARS)
    """Longest accepted `prompt`, in characters (Whisper keeps at most 223 prompt tokens, about
    1,000 characters of English); a longer one gets 400."""
    request_timeout_s: float = 120.0
    """A transcription not answered in this many seconds gets 504."""
    max_batch_size: int = Field(default=8, ge=1)
    """Most requests one engine lane decodes together."""
    max_ongoing_requests: int = Field(default=16, ge=1)
    """Requests in flight per model replica (a batch is built from these)."""
    max_queued_requests: int = Field(default=64, ge=-1)
    """Requests waiting per model deployment before new ones get 503 + Retry-After; -1 = no limit."""
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    """Autoscaling bounds per model version; one replica per 2 cores is right on CPU."""
    model_num_gpus: float | None = Field(default=None, ge=0, le=1)
    """GPUs Ray reserves per model replica. None: a whole one when the cluster has GPUs at deploy
    time, else none. A fraction (0.3) lets stable, canary and fallback share one GPU, and asks
    for it even when no GPU node is up yet (an autoscaling cluster then starts one)."""
    model_num_cpus: float = Field(default=0.5, gt=0)
    """CPUs Ray reserves per model replica. Half a CPU lets a 2-core node hold stable, canary
    and fallback side by side; the engine's threads (engine.threads) decide what it really uses."""
    target_ongoing_requests: float = 8.0
    """Autoscaling target of in-flight requests per replica."""
    cpu_wakeup_latency_us: int | None = Field(default=0, ge=0)
    """The longest a CPU may take to wake, asked of Linux by each model replica for its life (PM
    QoS, asrops/cpu_wakeup.py): at 0 idle CPUs poll instead of halting, so a lone request's
    hand-offs between threads do not wait for one to wake. Measured on 2 cores, alternated on one
    running service: a lone request's serving 14.5 -> 9.6 ms, the engine in its replica 1.11 ->
    1.03x the bare engine's time; 7 % more throughput at concurrency 16. Idle CPUs then spin
    (power). None (`null`): the machine's own idle states. Needs root (or the device opened to the
    service's user); otherwise logged and left. A kernel without a cpuidle driver ignores it
    (logged): its idle CPUs halt regardless."""
    ingress_replicas: int = 1
    ingress_max_ongoing_requests: int = Field(default=64, ge=1)
    """Requests in flight per ingress replica; above the model's own limit so batches can form."""
    retry_after_s: int = 2
    """Value of Retry-After on 503 responses, in seconds."""
    refresh_s: float = Field(default=2.0, gt=0)
    """How often the ingress re-reads aliases, the rollout and the running model applications
    (how fast a weight change or rollback reaches traffic), in seconds."""
    status_resync_s: float = Field(default=30.0, gt=0)
    """While every version the rollout references is running and nothing else is, the ingress and
    the version reconciler re-read Serve's application statuses this seldom (they re-read aliases and
    rollout every `refresh_s`, and statuses too as soon as those change): a full status costs about
    50 ms of CPU, and read every 2 s it was most of what the idle ingress and driver used, in seconds."""
    drain_s: float = Field(default=30.0, ge=0)
    """How long a model application no version references any more keeps running before it is
    deleted (its in-flight requests finish first), in seconds."""
    canary_timeout_s: float = Field(default=30.0, gt=0)
    """A canary (or any version with somewhere to fall back to) not answering within this many
    seconds, plus `canary_timeout_per_audio_s` for each second of audio, is given up on and the
    next version in line answers."""
    canary_timeout_per_audio_s: float = Field(default=0.5, ge=0)
    """Seconds added to the canary timeout per second of audio: long audio on a healthy canary
    takes long (600 s of audio: 330 s in all), and must not count as the canary failing."""
    control_timeout_s: float = Field(default=10.0, gt=0)
    """Longest wait for the registry or a model application during the ingress's refresh; a hung
    one is skipped (and retried on the next refresh) so routing changes and rollbacks go on."""
    feedback_timeout_s: float = Field(default=10.0, gt=0)
    """Longest a correction waits on the feedback store before it gets 503 + Retry-After (a hung
    store must not hold clients for the S3 client's own timeouts and retries, minutes)."""
    breaker: BreakerSettings = BreakerSettings()

    @field_validator("api_keys", "admin_tokens")
    @classmethod
    def _no_blank_secret(cls, secrets: list[str]) -> list[str]:
        if any(not s.strip() for s in secrets):
            raise ValueError("a blank key or token would let anyone in: remove it (an empty list turns auth off)")
        return secrets

    @property
    def local_url(self) -> str:
        """The service's base URL as a client on this machine reaches it."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


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
    max_buffered_mb: float = Field(default=256.0, gt=0)
    """Audio held for unwritten records (raw until a record is built, then only the sampled
    FLAC), in MiB; past it the oldest records are dropped (counted), whatever their number."""
    keep_audio: bool = True
    """False keeps no audio at all; only features and transcripts are logged."""
    audio_sample_share: float = Field(default=0.1, ge=0, le=1)
    """Share of successful requests whose audio is kept (16 kHz FLAC) for relabelling."""
    audio_retention_days: float = Field(default=7.0, gt=0)
    """Sampled audio older than this many days is deleted by the drift monitor."""
    recent_requests: int = Field(default=512, ge=0)
    """Answered requests each ingress remembers (text and audio), so that feedback on them can
    be joined and their audio kept for relabelling..."""
    recent_audio_s: float = Field(default=600.0, ge=0)
    """...holding at most this many seconds of audio (16 kHz float32: 64 KB a second, so 38 MB)."""


class DriftSettings(BaseModel):
    """The drift monitor (monitoring/): an Evidently report per window against a reference."""

    window_s: float = Field(default=300.0, gt=0)
    """Length of one current window, in seconds; the monitor runs once per window."""
    bootstrap_reference: bool = True
    """With no reference when `asrops serve` starts, it first makes one from clean synthetic
    speech through the stable version, before serving (about a minute on 2 cores, once per data
    directory; `asrops serve --config` leaves it to the monitor, which stops early and keeps
    yours if you pin one meanwhile). Off when you pin your own (`asrops drift reference`)."""
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
        "no_speech_prob", "compression_ratio", "oov_share", "low_confidence_word_share",
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


RAY_METRICS_REPORT_INTERVAL_S = 10.0
"""How often Ray's workers report their metrics to their node's agent, and the agent gathers the
node's own (asrops/raycluster.py RAY_TUNING sets both): the freshness of everything Prometheus
reads from Ray's metrics endpoint."""


class MonitoringSettings(BaseModel):
    monitor_port: int = 9464
    """Where the drift monitor serves its /metrics."""
    metrics_host: str = "127.0.0.1"
    """The address the drift monitor and the promotion controller serve /metrics on: loopback on
    one machine (the local Prometheus is there); 0.0.0.0 in a pod, where the Prometheus Operator
    scrapes the pod's address (k8s/: a NetworkPolicy admits only Prometheus)."""
    prometheus_port: int = 9090
    prometheus_binary: str = "prometheus"
    """Debian's `prometheus` package; `asrops serve` starts one unless `prometheus_enabled` is false."""
    prometheus_enabled: bool = True
    background_niceness: int = Field(default=10, ge=0, le=19)
    """How much `asrops serve` lowers the priority of what runs beside the request path: the
    processes it starts (the drift monitor, the promotion controller, Prometheus), itself, and
    on a local cluster Ray's own (GCS, dashboard, agents, log monitor) and Serve's controller. On
    a busy node they take what the model replicas, the ingress and the proxy (niceness 0) leave."""
    scrape_interval_s: float = Field(default=5.0, gt=0)
    """How often Prometheus scrapes the drift monitor and the promotion controller, and evaluates
    the alert rules."""
    ray_scrape_interval_s: float = Field(default=RAY_METRICS_REPORT_INTERVAL_S, gt=0)
    """How often Prometheus scrapes Ray's metrics endpoint (the replicas' metrics): a scrape more
    often than Ray refreshes it (RAY_METRICS_REPORT_INTERVAL_S) reads the same values again, and
    each costs Ray's agent 60-70 ms of CPU (about 1,700 series), taken from the engine on 2 cores."""
    ray_metrics_port: int = 8080
    """Ray's own Prometheus endpoint on each node (replica metrics). The local Prometheus scrapes
    it on loopback; with RAY_ADDRESS it reads the nodes from Ray's service-discovery file."""
    drift: DriftSettings = DriftSettings()
    production_log: ProductionLogSettings = ProductionLogSettings()


class DatasetSettings(BaseModel):
    """What the retraining dataset builder keeps (retrain/dataset.py); every drop is counted."""

    min_snr_db: float = 3.0
    """Estimated SNR below this: too noisy to learn from."""
    max_clipping_ratio: float = Field(default=0.01, ge=0, le=1)
    """Share of clipped samples above this: distorted."""
    min_duration_s: float = Field(default=0.5, gt=0)
    max_duration_s: float = Field(default=30.0, gt=0)
    """Whisper trains on 30-s windows; longer clips would be cut."""
    min_chars_per_s: float = 2.0
    max_chars_per_s: float = 30.0
    """Characters of transcript per second of audio outside [min, max]: the text does not belong
    to the audio (a mislabel, a truncated file, silence)."""
    min_speech_ratio: float = Field(default=0.1, ge=0, le=1)
    """Share of non-silent frames below this: (nearly) silent audio."""
    max_client_share: float = Field(default=0.5, gt=0, le=1)
    """When corrections come from several clients (API keys), none supplies more than this share
    of a retrain's corrections (its newest are kept): one key cannot make the training data."""
    replay_share: float = Field(default=0.75, ge=0, le=1)
    """Replayed parent examples, as a share of the new training examples (against forgetting)."""
    retention_clips: int = Field(default=40, ge=0)
    """Replay examples (at most half the pool) kept apart as a retention set: never trained on,
    transcribed at each validation to check that the parent's knowledge survives."""
    validation_share: float = Field(default=0.15, gt=0, lt=1)
    test_share: float = Field(default=0.2, gt=0, lt=1)
    """Held-out shares of the new data, split per slice (stratified)."""
    slice_fields: list[str] = ["accent", "snr_db", "domain", "voice"]
    """Fields that define slices, for stratified splits and per-slice reports."""
    hold_out_by: Literal["template", "sentence"] = "template"
    """What never crosses from training to held-out: a synthetic clip's template (the strict
    choice: held-out text has sentence shapes never trained on), or only its sentence (traffic
    that repeats the same kinds of request, where a retrain may learn those shapes)."""
    seed: int = 0


class TrainSettings(BaseModel):
    """Fine-tuning the parent version (retrain/train.py), on Ray Train."""

    learning_rate: float = Field(default=1e-4, gt=0)
    """For the encoder's top layers (the default recipe below). When the decoder learns, use
    about 2e-5: at 1e-4 tiny.en's decoder memorised the templates and forgot general English."""
    max_steps: int = Field(default=60, ge=1)
    batch_size: int = Field(default=16, ge=1)
    warmup_steps: int = Field(default=3, ge=0)
    schedule: Literal["linear", "cosine"] = "linear"
    """Decay after warmup."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    freeze_encoder: bool = True
    """Freeze the encoder (on CPU its outputs are then computed once per clip and cached), but
    for its top `train_encoder_top_layers` layers."""
    train_encoder_top_layers: int = Field(default=2, ge=0, le=32)
    """With freeze_encoder on: the top N encoder layers (and its final norm) learn all the same;
    the frozen layers' output is cached once per clip instead of the encoder's (no augmentation
    on the fly then: the acoustics come from the data)."""
    freeze_encoder_layers: int = Field(default=0, ge=0)
    """With freeze_encoder off: freeze the convolutions and the first N encoder layers."""
    train_decoder: Literal["all", "cross_attention", "none"] = "none"
    """What of the decoder learns: all of it, only its cross-attention (how it reads the audio,
    leaving its language model, self-attention, MLPs and embeddings, as the parent's), or none of
    it (the parent's decoder exactly: a retrain then cannot learn sentences, only acoustics)."""
    lora: bool = False
    """Train LoRA adapters (peft) on the attention projections instead of whole weights."""
    lora_rank: int = Field(default=8, ge=1)
    replay_kl_weight: float = Field(default=1.0, ge=0)
    """Weight of KL(parent || model) on the replayed clips' tokens, added to the loss (0 = off):
    on known-good speech the model keeps saying what the parent said. With cached encoder
    outputs only (the default recipes)."""
    replay_encoder_weight: float = Field(default=0.0, ge=0)
    """Weight of the replayed clips' encoder-output change, ||model - parent||^2 / ||parent||^2 over
    their frames, added to the loss (0 = off): the learning top layers keep what they make of
    known-good speech, so that what they learn about the drift does not move real speech. With the
    top-layer recipe only (it needs the frozen part's cached output)."""
    spec_augment: bool = True
    """Whisper's config masks (time and feature) while training, when the encoder is trained."""
    speed_perturbation: tuple[float, ...] = (0.9, 1.0, 1.1)
    """Speed factors drawn per example (when the encoder is trained)."""
    noise_snr_db: float | None = 20.0
    """White noise at this SNR on half the examples (when the encoder is trained); None = off."""
    eval_every_steps: int = Field(default=10, ge=1)
    early_stopping_patience: int = Field(default=3, ge=1)
    """Evaluations without a new best checkpoint before training stops."""
    interpolation_weights: tuple[float, ...] = (0.8, 0.65, 0.5, 0.35)
    """The forgetting guard's weights a, tried largest first, for parent + a x (fine-tuned - parent).
    The tuned weights are never taken whole: on the drift scenario a = 1 held the retention set
    yet lost 10 % (relative) on the golden set, and 0.8 kept most of the gain (0.55 -> 0.62 x W0)
    for +1.6 % there. (Chosen on that scenario's golden set, so its golden figure is optimistic.)"""
    max_retention_worsening: float | None = Field(default=0.02, ge=0)
    """The first interpolation weight whose WER on each part of the retention set (known-good
    clips never trained on, one part per manifest) is at most (1 + this) x the parent's is kept:
    the gate's golden margin. None = no limit: the largest weight is kept."""
    num_workers: int = Field(default=1, ge=1)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """On GPU: bf16 where supported, else fp16; on CPU: bf16 where the CPU computes it natively
    (AVX512-BF16, AMX), else fp32."""
    max_failures: int = Field(default=2, ge=0)
    """Worker failures Ray Train recovers from (resuming from the last checkpoint)."""
    threads: int = Field(default=0, ge=0)
    """Torch threads per CPU worker; 0 = all cores."""
    encode_batch_size: int = Field(default=16, ge=1)
    """Training clips encoded at once while the frozen encoder's outputs are cached."""


class SliceGateSettings(BaseModel):
    """The slice gate a retrain fits beside its candidate (asrops/engines/slice_gate.py): the
    retrained encoder serves only windows that sound like the drift, the parent's the rest."""

    enabled: bool = True
    min_validation_share: float = Field(default=0.95, gt=0.5, le=1)
    """The gate is kept only when it sorts at least this share of each class of the retrain's
    validation clips right (the drift's to the retrained layers, the replayed known-good ones to
    the parent's); else the drift is not one the audio shows, and the candidate serves all audio."""
    threshold: float = Field(default=0.5, gt=0, lt=1)
    """P(drift) from which a window goes to the retrained layers."""
    l2: float = Field(default=1e-2, ge=0)
    """Weight decay of the logistic regression (its features are standardised)."""


class GateSettings(BaseModel):
    """The evaluation gate a candidate must pass before it is published (retrain/evaluate.py)."""

    bootstrap_samples: int = Field(default=1000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    require_heldout_improvement: bool = True
    """The held-out WER difference (candidate - stable) must have its whole interval below 0."""
    max_golden_relative_worsening: float = Field(default=0.02, ge=0)
    """Each golden part's WER (one per golden manifest, judged on its own: a clean synthetic part
    that improves must not hide a real-speech part that gets worse) may worsen by at most this
    share of the stable's WER."""
    max_generalisation_ratio: float = Field(default=0.85, gt=0)
    """On each generalisation set (the drift's acoustics over sentences in no training text), the
    candidate's WER must be at most this multiple of the stable's: learning the drift, not the
    sentences, is what such a set shows."""
    max_new_runaway_share: float = Field(default=0.01, ge=0, le=1)
    """Share of all judged items where the candidate may run away (insert many words, or loop on a
    phrase) while the stable did not. Runaways are few but ruinous, and a WER average hides them."""
    canary_weight: int = Field(default=5, ge=0, le=100)
    """A passing candidate starts as canary at this weight..."""
    shadow_share: float = Field(default=0.0, ge=0, le=1)
    """...or (with weight 0) in shadow on this share of stable traffic."""


class TriggerSettings(BaseModel):
    """When a retrain starts by itself (retrain/trigger.py)."""

    on_drift: bool = True
    feedback_wer_threshold: float | None = 30.0
    """Live WER (percent, from feedback) of the stable above this triggers a retrain; None = off."""
    schedule_s: float | None = None
    """Retrain at least this often (seconds); None = no schedule."""
    cooldown_s: float = Field(default=3_600.0, ge=0)
    """No automatic retrain within this many seconds of the last one."""
    min_new_labels: int = Field(default=50, ge=0)
    """Corrections received since the last retrain needed before an automatic one."""
    min_label_clients: int = Field(default=3, ge=1)
    """Distinct clients (API keys) those corrections, and a feedback WER, must come from: one key
    cannot start a retrain. Without keys every caller is one client, so only 1 lets anonymous
    corrections start one (trusting every caller)."""
    jobs_address: str = "http://127.0.0.1:8265"
    """The Ray Jobs API retrains are submitted to (the local Ray's dashboard); RAY_ADDRESS, when
    set, wins, as it does for Ray's own CLI."""


class RetrainSettings(BaseModel):
    dataset: DatasetSettings = DatasetSettings()
    train: TrainSettings = TrainSettings()
    slice_gate: SliceGateSettings = SliceGateSettings()
    gate: GateSettings = GateSettings()
    trigger: TriggerSettings = TriggerSettings()
    curated_manifests: list[str] = []
    """Extra labelled data (manifests in `asrops synth`'s format) every retrain uses."""
    golden_manifests: list[str] = []
    """The pinned regression set, one part per entry; empty means the core English subset of
    `speech_data_dir`, when set. Like every manifest setting here: a clip manifest's path, or
    `registry:<name>[@<version>]`, a dataset kept in the registry (`asrops data import`), which
    is what a cluster uses: nothing lies beside the code there."""
    generalisation_manifests: list[str] = []
    """Labelled sets of the drift's acoustics over sentences that are in no training text (not in
    its templates either): the gate's evidence that a retrain learnt the drift, not the sentences
    (GateSettings.max_generalisation_ratio). At most `golden_clips` rows of each."""
    golden_clips: int = Field(default=100, ge=0)
    """At most this many clips of each golden manifest (0 = all): both versions transcribe them."""
    acoustic_manifests: list[str] = []
    """The drift's acoustics (its voices, noise, channel, rate) speaking broad text that shares
    no sentence shape with the corrections, e.g. `asrops synth --preset drift-accent-noise --text
    broad`: trained on only, never held out. What teaches a retrain the acoustics rather than
    the sentences its corrections happen to repeat."""
    replay_manifests: list[str] = []
    """The parent's training data (and other known-good data) replayed against forgetting."""
    self_label_manifests: list[str] = []
    """Known-good audio (its `text` is ignored) that the parent transcribes at retrain time; the
    clips it decodes as one segment join the replay pool with its own transcripts as labels, so
    training keeps the parent's behaviour on that audio (self-distillation against forgetting)."""
    retention_manifests: list[str] = []
    """Known-good data never trained on, only transcribed while training to pick a checkpoint
    that has not forgotten it (beside `dataset.retention_clips` of the replay data). Keep it
    apart from the golden set, which judges the result."""
    feedback_lookback_days: float = Field(default=30.0, gt=0)
    """Corrections (with their kept audio) from this many days back are a retrain's new data."""
    work_dir: Path | None = None
    """Datasets, checkpoints and reports of each job; None means `<data_dir>/retrain`."""


# --- the canary analysis: how the promotion controller judges and steps up a canary -----------
# (Flagger's analysis as data; the controller and the checks' PromQL live in asrops/promotion/.)
def render_query(template: str, version: str, window: str) -> str:
    """A check's PromQL for one version and window (`$version`, `$window` filled in)."""
    return Template(template).substitute(version=version, window=window)


class Bound(BaseModel):
    """One end of a check's range: `value` itself, or the stable's value plus or times it."""

    value: float
    relative_to_stable: Literal["absolute", "plus", "times"] = "absolute"

    def limit(self, stable: float | None) -> float | None:
        """The limit for this interval; None when it is relative and the stable has no value."""
        if self.relative_to_stable == "absolute":
            return self.value
        if stable is None or not math.isfinite(stable):
            return None
        return stable + self.value if self.relative_to_stable == "plus" else stable * self.value

    def describe(self) -> str:
        if self.relative_to_stable == "absolute":
            return f"{self.value:g}"
        return f"stable {'+' if self.relative_to_stable == 'plus' else 'x'} {self.value:g}"


class Gate(BaseModel):
    """A check runs only once `query` (a template) reaches `min` for both versions, e.g. enough
    corrected words for a feedback WER; until then it is skipped, neither passed nor failed."""

    query: str
    min: float


class MetricCheck(BaseModel):
    name: str = Field(pattern=r"^[a-z0-9_-]{1,40}$")
    query: str
    """PromQL returning one number; `$version` is the version judged, `$window` the window."""
    min: Bound | None = None
    max: Bound | None = None
    during: Literal["live", "shadow", "both"] = "live"
    """Live steps (canary weight > 0), the shadow phase, or both."""
    only_when: Gate | None = None

    @model_validator(mode="after")
    def _valid(self) -> MetricCheck:
        if self.min is None and self.max is None:
            raise ValueError(f"check {self.name!r} needs a min or a max")
        for template in (self.query, *([self.only_when.query] if self.only_when else [])):
            if "$version" not in template:
                raise ValueError(f"check {self.name!r}: its query must use $version")
            render_query(template, "v", "1m")  # raises on a bad placeholder
        return self

    @property
    def relative(self) -> bool:
        return any(b is not None and b.relative_to_stable != "absolute" for b in (self.min, self.max))

    def applies(self, shadow: bool) -> bool:
        return self.during == "both" or self.during == ("shadow" if shadow else "live")


class ShadowPhase(BaseModel):
    share: float = Field(default=0.5, gt=0, le=1)
    """Share of stable requests copied to the canary, whose answers go nowhere."""
    intervals: int = Field(default=2, ge=1)
    """Passing intervals in shadow before live traffic starts."""


class AnalysisSpec(BaseModel):
    """How a canary is judged and stepped up. Give `step_weights`, or `step_weight` and
    `max_weight` (5 and 50 mean 5, 10, ..., 50)."""

    interval_s: float = Field(default=60.0, ge=1)
    """How often the checks run (and the least time spent at each step)."""
    window_s: float | None = Field(default=None, ge=1)
    """The `$window` of the queries; None means interval_s."""
    step_weights: list[int] | None = [5, 10, 25, 50]
    step_weight: int | None = Field(default=None, ge=1, le=100)
    max_weight: int | None = Field(default=None, ge=1, le=100)
    threshold: int = Field(default=3, ge=1)
    """Failed checks (intervals with a failing check) that roll the canary back."""
    min_requests: float = Field(default=20, ge=1)
    """Requests the canary must have had in the window (shadow copies, in the shadow phase) for
    its checks to say anything: with 20, a p95 latency is the second-largest request rather than
    the largest, and an error ratio of 0 still bounds the true one below 15 % (95 %, the rule of
    three); fewer requests also leave the logprob average to a handful of clips. Fewer is an
    inconclusive interval: the canary holds its weight, neither advancing nor failing, so a
    canary is never promoted, nor rolled back, on no evidence. Size the steps and the window so
    that request rate x weight x window reaches this."""
    max_inconclusive: int = Field(default=10, ge=1)
    """Inconclusive intervals in a row (too few requests) after which the canary is rolled back:
    traffic too thin to judge it within that time."""
    shadow: ShadowPhase | None = None
    init_timeout_s: float = Field(default=600.0, gt=0)
    """A canary that has had no request this long after its rollout began is rolled back."""
    checks: list[MetricCheck] | None = None
    """None: the built-in checks (error ratio, p95 latency, avg logprob, shadow disagreement,
    feedback WER; asrops/promotion/checks.py)."""
    webhooks: list[str] = []
    """URLs POSTed a JSON event on every rollout decision (failures are logged, never fatal)."""

    @model_validator(mode="after")
    def _one_step_form(self) -> AnalysisSpec:
        if self.step_weight is not None or self.max_weight is not None:
            if self.step_weight is None or self.max_weight is None:
                raise ValueError("give both step_weight and max_weight, or step_weights")
            if self.max_weight < self.step_weight:
                raise ValueError("max_weight must be at least step_weight")
            self.step_weights = None
        elif not self.step_weights:
            raise ValueError("give step_weights (e.g. [5, 10, 25, 50]), or step_weight and max_weight")
        weights = self.weights()
        if any(not 0 < w <= 100 for w in weights) or weights != sorted(set(weights)):
            raise ValueError(f"step weights must rise strictly within 1..100, got {weights}")
        names = [c.name for c in self.checks or []]
        if len(names) != len(set(names)):
            raise ValueError(f"check names must be unique, got {names}")
        return self

    def weights(self) -> list[int]:
        if self.step_weights:
            return list(self.step_weights)
        return list(range(self.step_weight, self.max_weight + 1, self.step_weight))  # type: ignore[arg-type]

    @property
    def window(self) -> str:
        return f"{round(self.window_s or self.interval_s)}s"

    @classmethod
    def from_yaml(cls, path: Path) -> AnalysisSpec:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})


class PromotionSettings(BaseModel):
    """The promotion controller (asrops/promotion/controller.py): steps a canary up on live
    Prometheus metrics, promotes it or rolls it back."""

    enabled: bool = True
    """`asrops serve` starts the controller; off leaves canaries where operators put them."""
    analysis: AnalysisSpec = AnalysisSpec()
    analysis_file: Path | None = None
    """A YAML file with the analysis (same fields as `analysis`); it replaces `analysis`."""
    prometheus_url: str = ""
    """Prometheus's HTTP API; empty means the local one on `monitoring.prometheus_port`."""
    metrics_port: int = 9465
    """Where the controller serves its /metrics (phase, weight, failed checks, check values)."""
    poll_s: float = Field(default=1.0, gt=0)
    """How often the controller re-reads the rollout (pauses and aborts take effect this fast)."""

    def spec(self) -> AnalysisSpec:
        return AnalysisSpec.from_yaml(self.analysis_file) if self.analysis_file else self.analysis


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ASROPS_", env_nested_delimiter="__", extra="ignore", env_parse_none_str="null"
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    """Root of everything the embedded deployment writes (registry, logs, reports)."""
    log_level: str = "INFO"
    speech_data_dir: Path | None = None
    """Real recorded speech with transcripts (a folder with `manifest.jsonl`): the engine
    benchmark's clips and the retrain gate's default golden set. None: there is none. The
    scripts (scripts/env.sh) set it to ../shared/data/speech beside the checkout when present."""
    registry: RegistrySettings = RegistrySettings()
    engine: EngineSettings = EngineSettings()
    audio: AudioSettings = AudioSettings()
    serve: ServeSettings = ServeSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    retrain: RetrainSettings = RetrainSettings()
    promotion: PromotionSettings = PromotionSettings()

    @cached_property
    def registry_uri(self) -> str:
        return self.registry.uri or str(self.data_dir / "registry")

    @cached_property
    def production_log_uri(self) -> str:
        return self.monitoring.production_log.uri or str(self.data_dir / "prodlog")

    @cached_property
    def prometheus_url(self) -> str:
        return self.promotion.prometheus_url or f"http://127.0.0.1:{self.monitoring.prometheus_port}"

    @property
    def speech_manifest(self) -> Path | None:
        """`speech_data_dir`'s manifest, when there is one."""
        manifest = self.speech_data_dir / "manifest.jsonl" if self.speech_data_dir else None
        return manifest if manifest and manifest.exists() else None

    @cached_property
    def cache_dir(self) -> Path:
        return self.registry.cache_dir or (self.data_dir / "cache")


def env_var(*path: str) -> str:
    """The environment variable that sets the setting at `path` ("monitoring", "monitor_port"),
    for messages that tell a person what to change. A path that names no setting raises
    KeyError, so a renamed setting cannot leave a stale name behind."""
    model: type[BaseModel] = Settings
    for name in path:
        model = model.model_fields[name].annotation
    config = Settings.model_config
    return config["env_prefix"] + config["env_nested_delimiter"].join(path).upper()


def load_settings() -> Settings:
    """Read settings from the environment; call once at a process's entry point and pass on."""
    return Settings()
