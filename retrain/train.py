"""Fine-tuning a Whisper version on Ray Train (`TorchTrainer`): GPU workers when the cluster has
GPUs, CPU otherwise.

What the loop does, and why:
- By default the encoder's top 2 layers (and its final norm) learn and nothing else: a drift is
  acoustic (voices, noise, channel, rate) and the encoder is where audio becomes features. The
  decoder, Whisper's language model, stays the parent's exactly: when it learnt (lr 2e-5, the
  encoder frozen) it learnt the corrections' sentence templates and came out 1.45x worse than its
  parent on new sentences of the same drift. The frozen layers' output is computed once per clip
  and cached, so a step costs two encoder layers and the decoder; bf16 where the hardware has it.
- Other recipes stay available: the whole encoder frozen with the decoder (or only its
  cross-attention) learning on the cached outputs of the parent's int8 ONNX encoder (what
  serves it); the first N layers frozen with SpecAugment, speed perturbation and added noise on
  the fly; LoRA adapters through peft. Warmup then linear or cosine decay, gradient clipping.
- Early stopping on validation WER, never on loss, with clips decoded exactly as the service
  decodes them (its engine's decoding loop over the model being trained): a bare greedy loop
  judged differently from serving (on one run: validation 64 %, served 94 %).
- A forgetting guard after training (WiSE-FT: Wortsman et al., "Robust fine-tuning of zero-shot
  models", 2022): the best checkpoint's weights are interpolated with the parent's,
  parent + a x (best - parent), trying the largest `interpolation_weights` first (0.8 by default:
  the tuned weights are never taken whole), and the first `a` whose WER on every part of a
  retention set (known-good clips never trained on) stays within `max_retention_worsening` of the
  parent's is kept. The new slice's WER keeps falling long after
  general English has started to be forgotten, and interpolating keeps more of the gain for a
  given loss than stopping earlier does.
- A checkpoint (weights, optimiser, scheduler, step, best WER) at every evaluation, in the
  registry's storage; a worker that dies is replaced (`FailureConfig`) and resumes from it.
- Progress (loss, learning rate, samples/s, ETA) in the log and as Ray metrics.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from asrops.audio_format import SAMPLE_RATE
from asrops.clip_manifest import read_rows
from asrops.engines import ENCODERS, engine_threads
from asrops.engines.decoding import CHUNK_S, TIME_PRECISION, SpecialTokens
from asrops.engines.torch_backend import TorchWhisperBackend
from asrops.engines.types import DecodeOptions
from asrops.retrain.dataset import REPLAYED_SOURCES
from asrops.settings import EngineSettings, TrainSettings

log = logging.getLogger(__name__)

MAX_LABEL_TOKENS = 128
STATE_FILE = "train_state.pt"
BEST_DIR = "best"
GUARD_FILE = "forgetting_guard.json"
ENCODER_CACHE_ENTRIES = 256
"""Encoded batches kept for validation (a batch of 8 windows is ~18 MB): every first window, and
the later windows of long clips, which move with each model's timestamps."""


class TrainJob(BaseModel):
    """What one training run needs; everything else comes from `TrainSettings`."""

    parent_dir: Path
    """The parent version's verified local directory (a transformers checkpoint)."""
    train_manifest: Path
    validation_manifest: Path
    retention_manifest: Path | None = None
    """Known-good clips never trained on, for the forgetting guard; None or empty: no guard."""
    storage_path: str
    """Where Ray Train keeps checkpoints: a directory beside the registry's (or an s3:// URI)."""
    name: str
    """The run's name (unique per retrain job): its checkpoints live under storage_path/name."""
    output_dir: Path
    """Where the best model is written as a transformers checkpoint."""
    settings: TrainSettings
    decode: DecodeOptions = DecodeOptions()
    """How the service decodes a plain request: validation decodes the same way."""
    decode_batch_size: int = EngineSettings().offline_batch_size
    """Held-out clips the engine decodes at once (`engine.offline_batch_size`)."""


class GuardTrial(BaseModel):
    weight: float
    validation_wer: float
    retention_wer: float
    retention_wer_by_part: dict[str, float]
    """Per origin manifest."""


class ForgettingGuard(BaseModel):
    """The interpolation weights tried after training (1 = the fine-tuned checkpoint, 0 = the
    parent) and the one kept."""

    parent_retention_wer: float
    parent_retention_wer_by_part: dict[str, float]
    retention_limits: dict[str, float]
    """Per part: the parent's WER x (1 + max_retention_worsening); empty = no limit."""
    trials: list[GuardTrial]
    kept_weight: float
    """0 when every weight forgot too much: the parent's weights are kept (the gate will refuse)."""


class TrainResult(BaseModel):
    output_dir: Path
    steps: int
    best_validation_wer: float | None
    guard: ForgettingGuard | None = None
    """What the forgetting guard tried and kept (None: no retention set)."""
    resumed_from_step: int | None
    """Set when a worker failed and training went on from a checkpoint."""
    seconds: float
    samples_per_s: float
    history: list[dict]


# --- data ---------------------------------------------------------------------------------
def _load_audio(path: str) -> np.ndarray:
    from asrops.audio import decode_audio

    return decode_audio(Path(path).read_bytes()).samples


def _augment(samples: np.ndarray, s: TrainSettings, rng: random.Random) -> np.ndarray:
    """Speed perturbation (resampling) and white noise at `noise_snr_db` on half the examples."""
    factor = rng.choice(s.speed_perturbation) if s.speed_perturbation else 1.0
    if factor != 1.0:
        positions = np.arange(0, len(samples) - 1, factor)
        samples = np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)
    if s.noise_snr_db is not None and rng.random() < 0.5:
        power = float(np.mean(samples**2)) + 1e-10
        noise = np.random.default_rng(rng.randrange(2**32)).standard_normal(len(samples)).astype(np.float32)
        samples = samples + noise * math.sqrt(power / 10 ** (s.noise_snr_db / 10))
    return samples


def _timestamp(special: SpecialTokens, seconds: float) -> int:
    return special.timestamp_begin + round(min(max(seconds, 0.0), CHUNK_S) / TIME_PRECISION)


def _labels(tokenizer, special: SpecialTokens, texts: list[str], durations: list[float]):
    """Decoder targets in the timestamp mode the service decodes in (one segment per clip):
    <|startoftranscript|><|0.00|> text <|end|><|endoftext|>. Training without timestamps while
    serving with them teaches one mode and judges the other. The model's inputs are these
    shifted right, which transformers does from `labels`."""
    import torch

    ids = [[special.sot, _timestamp(special, 0.0),
            *tokenizer.encode(" " + t.strip(), add_special_tokens=False)[:MAX_LABEL_TOKENS],
            _timestamp(special, d), special.eot] for t, d in zip(texts, durations, strict=True)]
    width = max(len(i) for i in ids)
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    for row, tokens in enumerate(ids):
        labels[row, : len(tokens)] = torch.tensor(tokens)
    return labels


# --- model --------------------------------------------------------------------------------
def _prepare_model(parent_dir: Path, s: TrainSettings, device):
    """The parent, with what `s` freezes frozen (and LoRA adapters added)."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(parent_dir)
    model.config.apply_spec_augment = s.spec_augment and not s.freeze_encoder
    encoder = model.model.encoder
    if s.freeze_encoder:
        encoder.requires_grad_(False)
        if s.train_encoder_top_layers:
            for module in [*encoder.layers[len(encoder.layers) - s.train_encoder_top_layers:], encoder.layer_norm]:
                module.requires_grad_(True)
    elif s.freeze_encoder_layers:
        for module in [encoder.conv1, encoder.conv2, encoder.embed_positions,
                       *encoder.layers[: s.freeze_encoder_layers]]:
            module.requires_grad_(False)
    model.model.decoder.embed_positions.requires_grad_(False)
    if s.train_decoder == "none":
        model.model.decoder.requires_grad_(False)
        model.proj_out.requires_grad_(False)
    elif s.train_decoder == "cross_attention":
        model.model.decoder.requires_grad_(False)
        for layer in model.model.decoder.layers:
            layer.encoder_attn.requires_grad_(True)
            layer.encoder_attn_layer_norm.requires_grad_(True)
    if s.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj"]
        model = get_peft_model(model, LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, target_modules=targets,
                                                 lora_dropout=0.05))
    return model.to(device)


def _base(model):
    """The WhisperForConditionalGeneration under a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _int8_encoder(parent_dir: Path, s: TrainSettings):
    """The parent's int8 ONNX encoder (what serves it on CPU), or None when it has none. With the
    encoder frozen, training the decoder on its outputs matches serving exactly and encodes about
    three times faster than the fp32 torch encoder on a CPU."""
    path = parent_dir / ENCODERS["onnx-int8"]
    if not path.exists():
        return None
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = engine_threads(s.threads)  # never ONNX Runtime's pinned default
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class Encoder:
    """The one place clips are encoded while training: training's cached encoder outputs and
    validation's decoding both come from here. With the encoder frozen on a CPU that is the
    parent's int8 ONNX encoder (as served); otherwise the model's own encoder. With the encoder
    frozen every model judged has the parent's encoder, so validation windows are cached.

    With `top_layers` (the encoder frozen but its top layers learning), what is cached is the
    input of the first learning layer, computed once per clip by the parent's frozen layers; the
    top layers and the final norm run on it at every step."""

    def __init__(self, device, int8_session=None, frozen: bool = True, batch_size: int = 16, top_layers: int = 0,
                 autocast_dtype=None):
        self.device, self.int8, self.frozen, self.batch_size = device, int8_session, frozen, batch_size
        self.top_layers, self.autocast_dtype = top_layers, autocast_dtype
        self.cache: dict[str, object] = {}

    def __call__(self, model, mel: np.ndarray, cache: bool = False):
        frozen_part = self.frozen_part(model, mel, cache)
        return top_of_encoder(model, frozen_part, self.top_layers) if self.top_layers else frozen_part

    def frozen_part(self, model, mel: np.ndarray, cache: bool = False):
        """What the frozen layers make of `mel` (the whole encoder's output without top layers)."""
        import torch

        key = hashlib.sha1(mel.tobytes()).hexdigest() if cache and self.frozen else None
        if key in self.cache:
            return self.cache[key]
        if self.int8 is not None and not self.top_layers:
            encoded = torch.from_numpy(self.int8.run(None, {"input_features": mel.astype(np.float32)})[0])
        else:
            base = _base(model)
            features = torch.from_numpy(mel).to(self.device, base.dtype)
            # not inference_mode: cached outputs feed the training graph
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                                 enabled=self.autocast_dtype is not None):
                encoded = _frozen_layers(base, features, self.top_layers) if self.top_layers else \
                    base.model.encoder(features).last_hidden_state
            encoded = encoded.to(base.dtype)
        if key is not None and len(self.cache) < ENCODER_CACHE_ENTRIES:
            self.cache[key] = encoded
        return encoded

    def clips(self, model, extractor, audios: list[np.ndarray], what: str):
        """Every clip's frozen encoding, in batches, with progress (training's cache)."""
        import torch

        outs = []
        n = self.batch_size
        for i in range(0, len(audios), n):
            outs.append(self.frozen_part(model, _features(extractor, audios[i : i + n])))
            log.info("encoding %s clips: %d/%d", what, min(i + n, len(audios)), len(audios))
        return torch.cat(outs)


@cache
def _takes_head_mask(layer_type: type) -> bool:
    """transformers 4.x's encoder layer requires a head mask argument; 5.x's has none."""
    return "layer_head_mask" in inspect.signature(layer_type.forward).parameters


def _run_layer(layer, hidden):
    extra = {"layer_head_mask": None} if _takes_head_mask(type(layer)) else {}
    out = layer(hidden, None, **extra)
    return out[0] if isinstance(out, tuple) else out


def _frozen_layers(model, features, top_layers: int):
    """The encoder up to (not including) its last `top_layers` layers, as transformers' Whisper
    encoder computes it (convolutions, positions, layers): the top layers are not run for nothing."""
    import torch

    encoder = model.model.encoder
    hidden = torch.nn.functional.gelu(encoder.conv2(torch.nn.functional.gelu(encoder.conv1(features))))
    hidden = hidden.permute(0, 2, 1)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
    for layer in encoder.layers[: len(encoder.layers) - top_layers]:
        hidden = _run_layer(layer, hidden)
    return hidden


def top_of_encoder(model, hidden, top_layers: int):
    """The encoder's last `top_layers` layers and its final norm over `hidden` (the input of the
    first of them): with the frozen part cached, this is all of the encoder that runs per step."""
    encoder = _base(model).model.encoder
    for layer in encoder.layers[len(encoder.layers) - top_layers:]:
        hidden = _run_layer(layer, hidden)
    return encoder.layer_norm(hidden)


def _features(extractor, audios: list[np.ndarray]) -> np.ndarray:
    return extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features


class _TrainingBackend(TorchWhisperBackend):
    """The serving engine's torch backend over a model being trained (already loaded), with its
    encoding done by the `Encoder`."""

    def __init__(self, model, device, encoder: Encoder):  # no TorchWhisperBackend.__init__: nothing to load
        self.model, self.device, self.dtype = _base(model), device, _base(model).dtype
        self._encoder, self._trained = encoder, model

    def encode(self, mel: np.ndarray):
        return self._encoder(self._trained, mel, cache=True)


class HeldOut:
    """Clips transcribed to judge a model (validation, retention) by the serving engine's own
    decoding over that model: timestamp rules, suppressed tokens, no-speech skipping, long-form
    windows, exactly as the service will decode them."""

    def __init__(self, rows: list[dict], job: TrainJob, device, encoder: Encoder):
        self.rows, self.audio = rows, [_load_audio(r["audio"]) for r in rows]
        self.parent_dir, self.device, self.encoder = Path(job.parent_dir), device, encoder
        self.decode, self.batch_size = job.decode, job.decode_batch_size
        self._gen = json.loads((self.parent_dir / "generation_config.json").read_text())

    def transcripts(self, model) -> list[str]:
        from asrops.engines.engine import WhisperEngine

        model.eval()
        engine = WhisperEngine(name="training", backend=_TrainingBackend(model, self.device, self.encoder),
                               model_dir=self.parent_dir, suppress_tokens=self._gen["suppress_tokens"],
                               begin_suppress_tokens=self._gen["begin_suppress_tokens"])
        texts = []
        for i in range(0, len(self.audio), self.batch_size):
            texts += [t.text for t in engine.transcribe(self.audio[i : i + self.batch_size], self.decode)]
        model.train()
        return texts

    def wer(self, model) -> float:
        from asrops.evaluation import score

        return score([r["text"] for r in self.rows], self.transcripts(model)).wer

    def wer_by_part(self, model) -> tuple[float, dict[str, float]]:
        """The WER over all rows, and per part (the manifest each row came from)."""
        from asrops.evaluation import score

        hyps = self.transcripts(model)
        by_part = defaultdict(lambda: ([], []))
        for row, hyp in zip(self.rows, hyps, strict=True):
            part = row.get("origin") or row.get("source", "retention")
            by_part[part][0].append(row["text"])
            by_part[part][1].append(hyp)
        return score([r["text"] for r in self.rows], hyps).wer, \
            {part: score(refs, h).wer for part, (refs, h) in sorted(by_part.items())}


# --- the stages of a worker's training run (each runs without Ray) --------------------------
@dataclass
class Progress:
    """Where a run is; saved with every checkpoint and restored on resume."""

    step: int = 0
    best: float | None = None
    """Best validation WER so far (the parent's before the first step)."""
    bad_evals: int = 0
    """Evaluations since the best one (early stopping)."""
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    seen: int = 0
    """Examples trained on since this process started (for samples/s)."""
    started: float = field(default_factory=time.monotonic)


@dataclass
class TrainingRun:
    """Everything one worker trains with: the job, the model and its optimiser, the data."""

    job: TrainJob
    device: object
    rank: int
    world: int
    processor: object
    special: SpecialTokens
    model: object
    params: list
    optimizer: object
    scheduler: object
    autocast_dtype: object
    encoder: Encoder
    train_rows: list[dict]
    train_audio: list[np.ndarray]
    cached: object
    """Encoder outputs of every training clip when the encoder is frozen, else None."""
    validation: HeldOut
    progress: Progress = field(default_factory=Progress)
    parent: object = None
    """A frozen copy of the parent, for the KL term on replayed clips (None: no term)."""
    replayed: list[bool] = field(default_factory=list)
    """Per training row: replayed known-good speech (the KL term's clips)."""

    @property
    def settings(self) -> TrainSettings:
        return self.job.settings


def _autocast_dtype(s: TrainSettings, device):
    """bf16 where the hardware computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or
    AMX: 1.6x faster for the encoder's layers on this project's 2-core machine), fp16 on other
    CUDA GPUs; None (fp32) otherwise or when `mixed_precision` is "no"."""
    import torch

    if s.mixed_precision == "no":
        return None
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if s.mixed_precision == "bf16" or (s.mixed_precision == "auto" and bf16) \
            else torch.float16
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private: absent means unknown
    native = torch.backends.mkldnn.is_available() and probe is not None and probe()
    return torch.bfloat16 if s.mixed_precision == "bf16" or (s.mixed_precision == "auto" and native) else None


def setup(job: TrainJob, device, rank: int = 0, world: int = 1, wrap=lambda model: model) -> TrainingRun:
    """Load the parent, freeze what the settings freeze, build the optimiser and schedule, read
    this worker's share of the data, and encode it once when the encoder is frozen. `wrap` is
    what a distributed run puts around the model (Ray Train's `prepare_model`)."""
    import torch
    from transformers import WhisperProcessor, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    s = job.settings
    use_cuda = device.type == "cuda"
    autocast_dtype = _autocast_dtype(s, device)
    processor = WhisperProcessor.from_pretrained(job.parent_dir)
    model = wrap(_prepare_model(job.parent_dir, s, device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
    make_schedule = get_cosine_schedule_with_warmup if s.schedule == "cosine" else get_linear_schedule_with_warmup
    scheduler = make_schedule(optimizer, s.warmup_steps, s.max_steps)

    train_rows = read_rows(job.train_manifest, resolve_audio=True)[rank::world]
    valid_rows = read_rows(job.validation_manifest, resolve_audio=True)
    log.info("worker %d/%d: %d training and %d validation clips on %s", rank + 1, world, len(train_rows),
             len(valid_rows), device)
    train_audio = [_load_audio(r["audio"]) for r in train_rows]
    top = s.train_encoder_top_layers if s.freeze_encoder else 0
    int8 = _int8_encoder(job.parent_dir, s) if s.freeze_encoder and not top and not use_cuda else None
    if int8 is not None:
        log.info("frozen encoder on CPU: caching the outputs of the int8 ONNX encoder the service runs")
    elif top:
        log.info("encoder frozen but its top %d layers: caching the frozen layers' output", top)
    encoder = Encoder(device, int8, frozen=s.freeze_encoder, batch_size=s.encode_batch_size, top_layers=top,
                      autocast_dtype=autocast_dtype)
    cached = encoder.clips(model, processor.feature_extractor, train_audio, "training") if s.freeze_encoder else None
    parent = None
    if (s.replay_kl_weight or s.replay_encoder_weight) and cached is not None:
        import copy

        parent = copy.deepcopy(_base(model)).eval().requires_grad_(False)
    replayed = [r.get("source") in REPLAYED_SOURCES for r in train_rows]
    return TrainingRun(job=job, device=device, rank=rank, world=world, processor=processor,
                       special=SpecialTokens.from_tokenizer_file(Path(job.parent_dir) / "tokenizer.json"),
                       model=model, params=params, optimizer=optimizer, scheduler=scheduler,
                       autocast_dtype=autocast_dtype, encoder=encoder, train_rows=train_rows, train_audio=train_audio,
                       cached=cached, validation=HeldOut(valid_rows, job, device, encoder), parent=parent,
                       replayed=replayed)


def resume(run: TrainingRun, checkpoint_dir: Path | None) -> None:
    """Go on from a checkpoint (a worker that died was replaced), or start: the parent's
    validation WER is the first best, and the parent the first best model."""
    import torch

    p = run.progress
    if checkpoint_dir is not None:
        state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location=run.device, weights_only=False)
        (run.model if run.settings.lora else _base(run.model)).load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        p.step, p.best, p.bad_evals, p.history = state["step"], state["best"], state["bad_evals"], state["history"]
        p.resumed_from = p.step
        log.info("resumed from the checkpoint at step %d (best validation WER %s)", p.step, p.best)
    if p.best is None:
        p.best = run.validation.wer(run.model)
        log.info("parent's validation WER: %.2f %%", p.best)
        p.history.append({"step": 0, "validation_wer": p.best})
        _save_best(run.model, run.processor, run.job.output_dir, run.settings)
    run.model.train()


def train_step(run: TrainingRun, rng: random.Random) -> dict:
    """One optimiser step on a random batch; returns its metrics (loss, lr, samples/s, ETA)."""
    import torch

    s, p = run.settings, run.progress
    batch = rng.sample(range(len(run.train_rows)), min(s.batch_size, len(run.train_rows)))
    audios = [run.train_audio[i] for i in batch] if run.cached is not None else \
        [_augment(run.train_audio[i], s, rng) for i in batch]
    labels = _labels(run.processor.tokenizer, run.special, [run.train_rows[i]["text"] for i in batch],
                     [len(a) / SAMPLE_RATE for a in audios]).to(run.device)
    with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
        if run.cached is not None:
            encoded = run.cached[batch]
            if run.encoder.top_layers:
                encoded = top_of_encoder(run.model, encoded, run.encoder.top_layers)
            out = run.model(encoder_outputs=(encoded,), labels=labels)
            kl, drift = _replay_terms(run, batch, labels, out.logits, encoded)
            loss = out.loss
            if kl is not None:
                loss = loss + s.replay_kl_weight * kl
            if drift is not None:
                loss = loss + s.replay_encoder_weight * drift
        else:
            features = torch.from_numpy(_features(run.processor.feature_extractor, audios)).to(run.device)
            out = run.model(input_features=features, labels=labels)
            loss, kl, drift = out.loss, None, None
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, s.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    p.step += 1
    p.seen += len(batch)
    elapsed = time.monotonic() - p.started
    rate = p.seen / elapsed if elapsed else 0.0
    eta = (s.max_steps - p.step) * len(batch) / rate if rate else float("nan")
    lr = run.scheduler.get_last_lr()[0]
    metrics = {"step": p.step, "loss": float(out.loss.detach()), "learning_rate": lr, "samples_per_second": rate,
               "eta_seconds": eta, **({} if kl is None else {"replay_kl": float(kl.detach())}),
               **({} if drift is None else {"replay_encoder_change": float(drift.detach())})}
    log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s ETA %.0f s", p.step, s.max_steps, metrics["loss"], lr,
             rate, eta)
    return metrics


def _replay_terms(run: TrainingRun, batch: list[int], labels, logits, encoded):
    """The two terms that hold the model to its parent on the batch's replayed (known-good) clips:
    - KL(parent || model) over their label tokens: what the model says there stays what the
      parent said (the parent's own labels, as cross-entropy, only hold its top choice);
    - the relative change of their encoder output (top-layer recipe only): what the learning
      layers make of that audio stays what the parent's made of it.
    Each is None when it is off, or there is no parent copy or no replayed clip."""
    import torch

    s = run.settings
    rows = [i for i, b in enumerate(batch) if run.replayed[b]]
    if run.parent is None or not rows:
        return None, None
    index = torch.tensor(rows, device=logits.device)
    with torch.no_grad():
        target_encoded = run.cached[[batch[i] for i in rows]]
        if run.encoder.top_layers:
            target_encoded = top_of_encoder(run.parent, target_encoded, run.encoder.top_layers)
    kl = None
    if s.replay_kl_weight:
        with torch.no_grad():
            target = run.parent(encoder_outputs=(target_encoded,), labels=labels[index]).logits.float().log_softmax(-1)
        mine = logits[index].float().log_softmax(-1)
        per_token = (target.exp() * (target - mine)).sum(-1)
        kl = per_token[labels[index] != -100].mean()
    drift = None
    if s.replay_encoder_weight and run.encoder.top_layers:
        target_encoded = target_encoded.float()
        drift = (encoded[index].float() - target_encoded).pow(2).sum() / target_encoded.pow(2).sum()
    return kl, drift


def due_for_evaluation(run: TrainingRun) -> bool:
    s, step = run.settings, run.progress.step
    return step % s.eval_every_steps == 0 or step == s.max_steps


def evaluate(run: TrainingRun) -> float:
    """Validation WER now; a new best is saved (by rank 0) and resets the early-stopping count."""
    p = run.progress
    wer = run.validation.wer(run.model)
    improved = wer < p.best
    p.best, p.bad_evals = (wer, 0) if improved else (p.best, p.bad_evals + 1)
    if improved and run.rank == 0:
        _save_best(run.model, run.processor, run.job.output_dir, run.settings)
    log.info("step %d: validation WER %.2f %% (best %.2f %%)%s", p.step, wer, p.best,
             "; stopping early" if should_stop(run) else "")
    return wer


def should_stop(run: TrainingRun) -> bool:
    return run.progress.bad_evals >= run.settings.early_stopping_patience


def checkpoint(run: TrainingRun, directory: Path) -> Path:
    """Everything `resume` needs, written into `directory`."""
    import torch

    p = run.progress
    state = {"model": (run.model.state_dict() if run.settings.lora else _base(run.model).state_dict()),
             "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "step": p.step,
             "best": p.best, "bad_evals": p.bad_evals, "history": p.history}
    torch.save(state, Path(directory) / STATE_FILE)
    return Path(directory)


def guard(run: TrainingRun) -> ForgettingGuard | None:
    """After training (rank 0, once): the forgetting guard over the retention set, and the model it
    keeps written as the best; None without a retention set."""
    job = run.job
    out = Path(job.output_dir) / GUARD_FILE
    rows = read_rows(job.retention_manifest, resolve_audio=True) if job.retention_manifest else []
    if not rows or out.exists():
        return ForgettingGuard.model_validate_json(out.read_text()) if out.exists() else None
    log.info("forgetting guard over %d retention clips", len(rows))
    retention = HeldOut(rows, job, run.device, run.encoder)
    guarded, result = _forgetting_guard(job, run.settings, run.device, run.validation.wer, retention.wer_by_part)
    _save_best(guarded, run.processor, job.output_dir, run.settings.model_copy(update={"lora": False}))
    out.write_text(result.model_dump_json(indent=2))
    return result


# --- the loop each Ray Train worker runs -----------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    """Ray Train's side of the stages: the device, the checkpoint to resume from, reporting
    metrics and checkpoints, and Ray metrics for the dashboard."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.util.metrics import Gauge

    job = TrainJob.model_validate(config)
    s = job.settings
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Ray starts a 1-CPU worker with OMP_NUM_THREADS=1; threads=0 means every core, as documented
    # (one thread made each step of the drift scenario take 13 s instead of about 6)
    torch.set_num_threads(s.threads or len(os.sched_getaffinity(0)))
    pid_file = Path(job.output_dir) / "worker.pid"  # lets an operator (or a test) find the worker
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    gauges = {name: Gauge(f"asrops_retrain_{name}", f"Retrain {name}.", tag_keys=("job",))
              for name in ("step", "loss", "learning_rate", "samples_per_second", "eta_seconds",
                           "validation_wer")}

    run = setup(job, ray.train.torch.get_device(), rank, world,
                wrap=ray.train.torch.prepare_model if world > 1 else lambda model: model)
    found = ray.train.get_checkpoint()
    if found:
        with found.as_directory() as ckpt:
            resume(run, Path(ckpt))
    else:
        resume(run, None)

    p = run.progress
    rng = random.Random(s.max_steps * 1000 + p.step)
    while p.step < s.max_steps:
        metrics = train_step(run, rng)
        evaluating = due_for_evaluation(run)
        if evaluating:
            metrics["validation_wer"] = evaluate(run)
        for name, gauge in gauges.items():
            if name in metrics and math.isfinite(metrics[name]):
                gauge.set(metrics[name], tags={"job": job.name})
        p.history.append(metrics)
        stop = evaluating and should_stop(run)
        report = {**metrics, "best_validation_wer": p.best, "resumed_from_step": p.resumed_from,
                  "final": p.step >= s.max_steps or stop}
        if evaluating:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint(run, Path(tmp))
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        else:
            ray.train.report(report)
        if stop:
            break
    if rank == 0:
        guard(run)


def _forgetting_guard(job: TrainJob, s: TrainSettings, device, validation_wer,
                      retention_wers) -> tuple[object, ForgettingGuard]:
    """The best checkpoint as parent + a x (best - parent) for the first weight a (largest first)
    whose retention WER is within the limit on every part of the retention set (one part
    improving must not hide another being forgotten); a = 0 (the parent) when none is."""
    import torch
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(Path(job.output_dir) / BEST_DIR).to(device)
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    parent = WhisperForConditionalGeneration.from_pretrained(job.parent_dir).to(device).state_dict()

    def set_weight(a: float) -> None:
        with torch.no_grad():
            model.load_state_dict({k: parent[k] + a * (v - parent[k]) if v.is_floating_point() else v
                                   for k, v in tuned.items()})

    set_weight(0.0)
    parent_retention, parent_parts = retention_wers(model)
    limits = {} if s.max_retention_worsening is None else \
        {part: wer * (1 + s.max_retention_worsening) for part, wer in parent_parts.items()}
    log.info("forgetting guard: the parent's retention WER %.2f %% (%s); a weight is kept when every part "
             "stays at or below %s", parent_retention, format_wers(parent_parts), format_wers(limits) or "any")
    trials, kept = [], 0.0
    for a in sorted(s.interpolation_weights, reverse=True):
        set_weight(a)
        retention, parts = retention_wers(model)
        trial = GuardTrial(weight=a, validation_wer=validation_wer(model), retention_wer=retention,
                           retention_wer_by_part=parts)
        trials.append(trial)
        forgotten = [part for part, wer in parts.items() if wer > limits.get(part, math.inf) + 1e-9]
        log.info("forgetting guard: weight %.2f: validation WER %.2f %%, retention WER %.2f %% (%s) -> %s", a,
                 trial.validation_wer, retention, format_wers(parts),
                 f"forgets {', '.join(forgotten)}" if forgotten else "kept")
        if not forgotten:
            kept = a
            break
    set_weight(kept)
    if kept == 0.0:
        log.warning("forgetting guard: every weight forgot too much; keeping the parent's weights")
    return model, ForgettingGuard(parent_retention_wer=parent_retention, parent_retention_wer_by_part=parent_parts,
                                  retention_limits=limits, trials=trials, kept_weight=kept)


def format_wers(values: dict[str, float]) -> str:
    """`{part: WER}` as `part 1.23 %, ...` (logs and the scenario's summary)."""
    return ", ".join(f"{name} {value:.2f} %" for name, value in values.items())


def _save_best(model, processor, output_dir: Path, s: TrainSettings) -> None:
    """The best model so far, as a plain transformers checkpoint (LoRA adapters merged)."""
    best_dir = Path(output_dir) / BEST_DIR
    tmp = best_dir.with_name(BEST_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if s.lora:
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    _base(to_save).save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    shutil.rmtree(best_dir, ignore_errors=True)
    tmp.rename(best_dir)


def run_training(job: TrainJob, gpus_available: bool) -> TrainResult:
    """Fit on Ray Train; returns where the best model is. Raises if training failed for good."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = job.settings
    use_gpu = s.use_gpu == "yes" or (s.use_gpu == "auto" and gpus_available)
    started = time.monotonic()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=json.loads(job.model_dump_json()),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=RunConfig(name=job.name, storage_path=job.storage_path,
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    m = result.metrics or {}
    history = []
    if result.checkpoint:
        import torch

        with result.checkpoint.as_directory() as ckpt:
            history = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)["history"]
    seconds = time.monotonic() - started
    guard_file = Path(job.output_dir) / GUARD_FILE
    guard = ForgettingGuard.model_validate_json(guard_file.read_text()) if guard_file.exists() else None
    return TrainResult(output_dir=job.output_dir / BEST_DIR, steps=int(m.get("step", 0)),
                       best_validation_wer=m.get("best_validation_wer"), guard=guard,
                       resumed_from_step=m.get("resumed_from_step"),
                       seconds=seconds, samples_per_s=float(m.get("samples_per_second", 0.0)), history=history)
