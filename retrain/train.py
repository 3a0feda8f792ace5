"""Fine-tuning a Whisper version on Ray Train (`TorchTrainer`): GPU workers when the cluster has
GPUs, CPU otherwise.

What the loop does, and why:
- Small learning rate, warmup then linear or cosine decay, gradient clipping: tiny.en forgets
  general English fast (1e-4 memorised the training sentences and doubled real-speech WER).
- The encoder frozen by default (or its first N layers, or LoRA adapters through peft): the
  decoder is where a new accent's and vocabulary's words are learnt. With the whole encoder
  frozen its outputs are computed once per clip and cached, which is what makes a CPU retrain
  take minutes (the encoder is ~37 GFLOP per clip, the decoder step a fraction of that); on a
  CPU they come from the parent's int8 ONNX encoder, the one that serves it.
- When the encoder is trained: SpecAugment (Whisper's config masks), speed perturbation and
  added noise on the fly.
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
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from asrops.engines.types import DecodeOptions
from asrops.settings import TrainSettings

log = logging.getLogger("asrops.retrain.train")

SOT, EOT = 50257, 50256  # tiny.en: <|startoftranscript|>, <|endoftext|>
TIMESTAMP_BEGIN = 50363  # <|0.00|>; one token per 20 ms up to <|30.00|>
SECONDS_PER_TIMESTAMP = 0.02
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
def _rows(manifest: Path) -> list[dict]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for row in rows:
        row["audio"] = str((manifest.parent / row["audio"]).resolve())
    return rows


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


def _timestamp(seconds: float) -> int:
    return TIMESTAMP_BEGIN + round(min(max(seconds, 0.0), 30.0) / SECONDS_PER_TIMESTAMP)


def _labels(tokenizer, texts: list[str], durations: list[float]):
    """Decoder targets in the timestamp mode the service decodes in (one segment per clip):
    <|startoftranscript|><|0.00|> text <|end|><|endoftext|>. Training without timestamps while
    serving with them teaches one mode and judges the other. The model's inputs are these
    shifted right, which transformers does from `labels`."""
    import torch

    ids = [[SOT, _timestamp(0.0), *tokenizer.encode(" " + t.strip(), add_special_tokens=False)[:MAX_LABEL_TOKENS],
            _timestamp(d), EOT] for t, d in zip(texts, durations, strict=True)]
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
    elif s.freeze_encoder_layers:
        for module in [encoder.conv1, encoder.conv2, encoder.embed_positions,
                       *encoder.layers[: s.freeze_encoder_layers]]:
            module.requires_grad_(False)
    model.model.decoder.embed_positions.requires_grad_(False)
    if s.train_decoder == "cross_attention":
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


def _features(extractor, audios: list[np.ndarray]):
    import torch

    mel = extractor(audios, sampling_rate=16_000, return_tensors="np").input_features
    return torch.from_numpy(mel)


def _int8_encoder(parent_dir: Path, s: TrainSettings):
    """The parent's int8 ONNX encoder (what serves it on CPU), or None when it has none. With the
    encoder frozen, training the decoder on its outputs matches serving exactly and encodes about
    three times faster than the fp32 torch encoder on a CPU."""
    path = parent_dir / "onnx" / "int8" / "encoder_model.onnx"
    if not path.exists():
        return None
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if s.threads:
        opts.intra_op_num_threads = s.threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _training_backend(model, device, encoder_cache: dict, int8_encoder=None, frozen: bool = True):
    """The serving engine's torch backend over the model being trained, so validation decodes
    exactly as the service will (timestamp rules, suppressed tokens, no-speech skipping, long-form
    windows). With the encoder frozen, each clip is encoded once (by the int8 ONNX encoder on a
    CPU, as served) and reused for every model judged."""
    import torch

    from asrops.engines.torch_backend import TorchWhisperBackend

    class TrainingBackend(TorchWhisperBackend):
        def __init__(self):  # the model is already loaded: no TorchWhisperBackend.__init__
            self.model, self.device, self.dtype = _base(model), device, _base(model).dtype

        def encode(self, mel: np.ndarray):
            key = hashlib.sha1(mel.tobytes()).hexdigest() if frozen else None
            if key in encoder_cache:
                return encoder_cache[key]
            if int8_encoder is not None:
                encoded = torch.from_numpy(int8_encoder.run(None, {"input_features": mel.astype(np.float32)})[0])
            else:
                encoded = super().encode(mel)
            if key is not None and len(encoder_cache) < ENCODER_CACHE_ENTRIES:
                encoder_cache[key] = encoded
            return encoded

    return TrainingBackend()


def _engine_over(model, parent_dir: Path, device, encoder_cache: dict, int8_encoder, frozen: bool):
    from asrops.engines.engine import WhisperEngine

    gen = json.loads((Path(parent_dir) / "generation_config.json").read_text())
    return WhisperEngine(name="training", backend=_training_backend(model, device, encoder_cache, int8_encoder, frozen),
                         model_dir=Path(parent_dir), suppress_tokens=gen["suppress_tokens"],
                         begin_suppress_tokens=gen["begin_suppress_tokens"])


# --- the loop each Ray Train worker runs -----------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from ray.util.metrics import Gauge
    from transformers import WhisperProcessor, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from asrops.evaluation import score

    job = TrainJob.model_validate(config)
    s = job.settings
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if s.threads:
        torch.set_num_threads(s.threads)
    pid_file = Path(job.output_dir) / "worker.pid"  # lets an operator (or a test) find the worker
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    autocast_dtype = None
    if use_cuda and s.mixed_precision != "no":
        bf16 = torch.cuda.is_bf16_supported()
        autocast_dtype = torch.bfloat16 if s.mixed_precision == "bf16" or (s.mixed_precision == "auto" and bf16) \
            else torch.float16
    gauges = {name: Gauge(f"asrops_retrain_{name}", f"Retrain {name}.", tag_keys=("job",))
              for name in ("step", "loss", "learning_rate", "samples_per_second", "eta_seconds",
                           "validation_wer")}

    processor = WhisperProcessor.from_pretrained(job.parent_dir)
    model = _prepare_model(job.parent_dir, s, device)
    model = ray.train.torch.prepare_model(model) if ray.train.get_context().get_world_size() > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
    make_schedule = get_cosine_schedule_with_warmup if s.schedule == "cosine" else get_linear_schedule_with_warmup
    scheduler = make_schedule(optimizer, s.warmup_steps, s.max_steps)

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    train_rows = _rows(job.train_manifest)[rank::world]
    valid_rows = _rows(job.validation_manifest)
    retention_rows = _rows(job.retention_manifest) if job.retention_manifest else []
    log.info("worker %d/%d: %d training, %d validation and %d retention clips on %s", rank + 1, world,
             len(train_rows), len(valid_rows), len(retention_rows), device)
    train_audio = [_load_audio(r["audio"]) for r in train_rows]

    int8_encoder = _int8_encoder(job.parent_dir, s) if s.freeze_encoder and not use_cuda else None
    if int8_encoder is not None:
        log.info("frozen encoder on CPU: caching the outputs of the int8 ONNX encoder the service runs")

    def encode(audios: list[np.ndarray]):
        features = _features(processor.feature_extractor, audios)
        if int8_encoder is not None:
            return torch.from_numpy(int8_encoder.run(None, {"input_features": features.numpy()})[0])
        with torch.no_grad():
            return _base(model).model.encoder(features.to(device)).last_hidden_state

    def encode_all(audios: list[np.ndarray], what: str):
        outs = []
        for i in range(0, len(audios), 16):
            outs.append(encode(audios[i : i + 16]))
            log.info("encoding %s clips: %d/%d", what, min(i + 16, len(audios)), len(audios))
        return torch.cat(outs)

    encoder_cache: dict = {}

    class HeldOut:
        """Clips transcribed to judge a model (validation, retention), by the serving engine's
        decoding over that model."""

        def __init__(self, rows: list[dict]):
            self.rows, self.audio = rows, [_load_audio(r["audio"]) for r in rows]

        def transcripts(self, of=None) -> list[str]:
            of = of or model
            of.eval()
            engine = _engine_over(of, job.parent_dir, device, encoder_cache, int8_encoder, s.freeze_encoder)
            texts = []
            for i in range(0, len(self.audio), 8):
                texts += [t.text for t in engine.transcribe(self.audio[i : i + 8], job.decode)]
            of.train()
            return texts

    cached = encode_all(train_audio, "training") if s.freeze_encoder else None
    validation = HeldOut(valid_rows)

    def validation_wer(of=None) -> float:
        return score([r["text"] for r in valid_rows], validation.transcripts(of)).wer

    step, best, bad_evals, resumed_from, history = 0, None, 0, None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / STATE_FILE, map_location=device, weights_only=False)
        _base(model).load_state_dict(state["model"]) if not s.lora else model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best, bad_evals, history = state["step"], state["best"], state["bad_evals"], state["history"]
        resumed_from = step
        log.info("resumed from the checkpoint at step %d (best validation WER %s)", step, best)
    if best is None:
        best = validation_wer()
        log.info("parent's validation WER: %.2f %%", best)
        history.append({"step": 0, "validation_wer": best})
        _save_best(model, processor, job.output_dir, s)

    rng = random.Random(s.max_steps * 1000 + step)
    model.train()
    started, seen = time.monotonic(), 0
    while step < s.max_steps:
        batch = rng.sample(range(len(train_rows)), min(s.batch_size, len(train_rows)))
        audios = [train_audio[i] for i in batch] if cached is not None else \
            [_augment(train_audio[i], s, rng) for i in batch]
        labels = _labels(processor.tokenizer, [train_rows[i]["text"] for i in batch],
                         [len(a) / 16_000 for a in audios]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if cached is not None:
                out = model(encoder_outputs=(cached[batch],), labels=labels)
            else:
                out = model(input_features=_features(processor.feature_extractor, audios).to(device), labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += len(batch)
        elapsed = time.monotonic() - started
        rate = seen / elapsed if elapsed else 0.0
        eta = (s.max_steps - step) * len(batch) / rate if rate else float("nan")
        lr = scheduler.get_last_lr()[0]
        metrics = {"step": step, "loss": float(out.loss), "learning_rate": lr, "samples_per_second": rate,
                   "eta_seconds": eta}
        log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s ETA %.0f s", step, s.max_steps, metrics["loss"], lr,
                 rate, eta)
        evaluate = step % s.eval_every_steps == 0 or step == s.max_steps
        if evaluate:
            wer = validation_wer()
            metrics["validation_wer"] = wer
            improved = wer < best
            best, bad_evals = (wer, 0) if improved else (best, bad_evals + 1)
            if improved and rank == 0:
                _save_best(model, processor, job.output_dir, s)
            log.info("step %d: validation WER %.2f %% (best %.2f %%)%s", step, wer, best,
                     "" if bad_evals < s.early_stopping_patience else "; stopping early")
        for name, gauge in gauges.items():
            if name in metrics and math.isfinite(metrics[name]):
                gauge.set(metrics[name], tags={"job": job.name})
        history.append(metrics)
        stop = evaluate and bad_evals >= s.early_stopping_patience
        final = step >= s.max_steps or stop
        report = {**metrics, "best_validation_wer": best, "resumed_from_step": resumed_from, "final": final}
        if evaluate:
            with tempfile.TemporaryDirectory() as tmp:
                state = {"model": (model.state_dict() if s.lora else _base(model).state_dict()),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                         "best": best, "bad_evals": bad_evals, "history": history}
                torch.save(state, Path(tmp) / STATE_FILE)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        else:
            ray.train.report(report)
        if stop:
            break

    if retention_rows and rank == 0 and not (Path(job.output_dir) / GUARD_FILE).exists():
        retention = HeldOut(retention_rows)

        def retention_wers(of) -> tuple[float, dict[str, float]]:
            hyps = retention.transcripts(of)
            by_part = defaultdict(lambda: ([], []))
            for row, hyp in zip(retention_rows, hyps, strict=True):
                part = row.get("origin") or row.get("source", "retention")
                by_part[part][0].append(row["text"])
                by_part[part][1].append(hyp)
            return score([r["text"] for r in retention_rows], hyps).wer, \
                {source: score(refs, h).wer for source, (refs, h) in sorted(by_part.items())}

        guarded, guard = _forgetting_guard(job, s, device, validation_wer, retention_wers)
        _save_best(guarded, processor, job.output_dir, s.model_copy(update={"lora": False}))
        (Path(job.output_dir) / GUARD_FILE).write_text(guard.model_dump_json(indent=2))


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
