"""Fitting a candidate's slice gate, and putting it and the parent's encoder into the version.

The classifier learns, from the retrain's own training split, which windows are the drift (new
corrections, curated and acoustic clips) and which are known-good speech the parent serves
(replayed and self-labelled clips); it is kept only when it sorts the validation split right.
The engine side (how a gated version serves) is asrops/engines/slice_gate.py.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from asrops.audio import decode_audio
from asrops.clip_manifest import read_rows, write_rows
from asrops.engines import ENCODERS
from asrops.engines.decoding import N_SAMPLES
from asrops.engines.log_mel import LogMel
from asrops.engines.slice_gate import (
    ENCODER_PREFIX,
    GATE_DIR,
    GATE_FILE,
    PARENT_DIR,
    TORCH_ENCODER,
    SliceGate,
    gate_dir,
    window_features,
)
from asrops.retrain.dataset import DRIFT_SOURCES, REPLAYED_SOURCES
from asrops.settings import SliceGateSettings

log = logging.getLogger(__name__)

FEATURE_BATCH = 16
CHECK_EVERY = 5
"""Every fifth training clip checks a first fit of the gate that left it out."""
MIN_CLIPS_PER_CLASS = 20
"""With fewer training clips of either kind there is no gate: too few to fit one and check it."""


def _features(rows: list[dict], log_mel: LogMel, say: Callable[[str], None], what: str) -> np.ndarray:
    """Each clip's first window's features (a clip's first 30 s is what its windows sound like)."""
    out = []
    for start in range(0, len(rows), FEATURE_BATCH):
        batch = rows[start : start + FEATURE_BATCH]
        chunks = [decode_audio(Path(r["audio"]).read_bytes()).samples[:N_SAMPLES] for r in batch]
        out.append(window_features(log_mel(chunks)))
        if (start // FEATURE_BATCH) % 10 == 9 or start + FEATURE_BATCH >= len(rows):
            say(f"slice gate: features of {what}: {min(start + FEATURE_BATCH, len(rows))}/{len(rows)} clips")
    return np.concatenate(out) if out else np.zeros((0, 0))


def _labelled(manifest: Path) -> tuple[list[dict], np.ndarray]:
    rows = [r for r in read_rows(manifest) if r.get("source") in (*DRIFT_SOURCES, *REPLAYED_SOURCES)]
    return rows, np.asarray([r["source"] in DRIFT_SOURCES for r in rows], dtype=np.float64)


def _logistic_regression(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Class-balanced, L2-regularised logistic regression (torch's L-BFGS, float64)."""
    import torch

    weight = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    xt, yt, wt = (torch.tensor(a, dtype=torch.float64) for a in (x, y, weight))
    linear = torch.nn.Linear(x.shape[1], 1).double()
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(xt)[:, 0], yt, weight=wt)
        loss = loss + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return linear.weight.detach().numpy()[0], float(linear.bias.detach())


def _fit(x: np.ndarray, y: np.ndarray, parent: str, s: SliceGateSettings) -> SliceGate:
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    weights, bias = _logistic_regression((x - mean) / scale, y, s.l2)
    return SliceGate(feature_mean=mean.tolist(), feature_scale=scale.tolist(), weights=weights.tolist(), bias=bias,
                     threshold=s.threshold, parent=parent,
                     fitted_on={"drift": int(y.sum()), "known_good": int(len(y) - y.sum())})


def fit_slice_gate(train: Path, validation: Path, parent_dir: Path, parent: str, s: SliceGateSettings,
                   say: Callable[[str], None] = log.info) -> SliceGate | None:
    """The gate for a candidate trained on `train`, or None (with the reason logged) when there is
    too little of either kind to tell apart, or the clips it is checked on show it cannot."""
    if not s.enabled:
        say("slice gate: off (retrain.slice_gate.enabled); the candidate serves all audio")
        return None
    rows, y = _labelled(train)
    if min(y.sum(), len(y) - y.sum()) < MIN_CLIPS_PER_CLASS:
        say(f"slice gate: none ({int(y.sum())} drift and {int(len(y) - y.sum())} known-good training clips, "
            f"fewer than {MIN_CLIPS_PER_CLASS} of one); the candidate serves all audio")
        return None
    log_mel = LogMel(parent_dir)
    x = _features(rows, log_mel, say, "training clips")
    val_rows, val_y = _labelled(validation)
    val_x = _features(val_rows, log_mel, say, "validation clips") if val_rows else x[:0]
    # Checked on every CHECK_EVERY-th training clip, left out of a first fit, and on the
    # validation clips (often only new data, which says nothing about known-good speech).
    check = np.arange(len(y)) % CHECK_EVERY == 0
    trial = _fit(x[~check], y[~check], parent, s)
    routed = trial.to_retrained(np.concatenate([x[check], val_x]))
    truth = np.concatenate([y[check], val_y])
    gate = _fit(x, y, parent, s)
    drift_share = float(routed[truth == 1].mean()) if (truth == 1).any() else None
    good_share = float(1 - routed[truth == 0].mean()) if (truth == 0).any() else None
    gate.validation = {k: v for k, v in (("drift_to_retrained", drift_share), ("known_good_to_parent", good_share))
                       if v is not None}
    shares = ", ".join(f"{k} {v:.3f}" for k, v in gate.validation.items()) or "no validation clips of either kind"
    if drift_share is None or good_share is None or min(drift_share, good_share) < s.min_validation_share:
        say(f"slice gate: not kept: on the clips it was checked on {shares} (each must be >= {s.min_validation_share}; "
            f"fitted on {gate.fitted_on}); the candidate serves all audio")
        return None
    say(f"slice gate: kept: fitted on {gate.fitted_on}; on the clips it was checked on {shares}")
    return gate


def routed_manifest(manifest: Path, gate: SliceGate, parent_dir: Path, out: Path,
                    say: Callable[[str], None] = log.info) -> Path | None:
    """The rows of `manifest` the gate sends to the retrained layers (None when it sends none):
    the only ones a gated candidate can forget, so the only ones the forgetting guard needs."""
    rows = list(read_rows(manifest))
    if not rows:
        return None
    routed = gate.to_retrained(_features(rows, LogMel(parent_dir), say, manifest.name))
    kept = [r for r, r_routed in zip(rows, routed, strict=True) if r_routed]
    say(f"slice gate: {len(kept)} of {len(rows)} retention clips go to the retrained layers "
        "(the rest get the parent's answers exactly)")
    return write_rows(out, kept) if kept else None


def attach_slice_gate(candidate_dir: Path, parent_dir: Path, gate: SliceGate,
                      say: Callable[[str], None] = log.info) -> bool:
    """Put `gate` and the parent's encoder (with its own gate, if it had one) into the candidate's
    version directory. Refused (False) when the decoders differ: the gate shares one decoder."""
    from safetensors.torch import load_file, save_file

    weights = "model.safetensors"
    tuned, original = load_file(str(candidate_dir / weights)), load_file(str(parent_dir / weights))
    changed = [k for k in original if not k.startswith(ENCODER_PREFIX) and not _same(original[k], tuned.get(k))]
    if changed:
        say(f"slice gate: not attached: the candidate changed {len(changed)} tensors outside the encoder "
            f"(e.g. {changed[0]}), and a gated version shares the parent's decoder")
        return False
    root = candidate_dir / GATE_DIR
    shutil.rmtree(root, ignore_errors=True)
    parent_root = root / PARENT_DIR
    for encoder in ENCODERS.values():
        (parent_root / encoder).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(parent_dir / encoder, parent_root / encoder)
    save_file({k: v for k, v in original.items() if k.startswith(ENCODER_PREFIX)}, str(parent_root / TORCH_ENCODER))
    if (inherited := gate_dir(parent_dir)) is not None:
        shutil.copytree(inherited, parent_root / GATE_DIR)
    (root / GATE_FILE).write_text(gate.model_dump_json(indent=2))
    say(f"slice gate: attached to the candidate, with {gate.parent}'s encoder"
        + (" and its own gate" if inherited else ""))
    return True


def _same(a, b) -> bool:
    return b is not None and a.shape == b.shape and bool((a == b).all())
