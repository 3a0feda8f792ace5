"""The slice gate: a retrained version's encoder serves only the audio that sounds like its drift.

A drift-triggered retrain adapts the encoder's top layers to the drift's acoustics and keeps the
parent's decoder exactly. Tuned on two cores with a few hundred clips, those layers help the
drift and cost real speech a little everywhere else (issue 17: +10-20 % relative). So a retrained
version also carries its parent's encoder and a small classifier fitted on the retrain's own data
(the drift's clips against the replayed known-good ones): each 30-s window is encoded by the
retrained layers when the classifier says it is the drift, else by the parent's encoder, and the
shared decoder reads either. Audio unlike the drift gets the parent's answer, token for token.

Layout inside a version directory (the parent's part nests, so a gated parent stays gated):

    slice_gate/gate.json                          the classifier (`SliceGate`)
    slice_gate/parent/onnx/fp32/encoder_model.onnx
    slice_gate/parent/onnx/int8/encoder_model.onnx
    slice_gate/parent/encoder.safetensors         the parent's encoder for the torch engine
    slice_gate/parent/slice_gate/...              the parent's own gate, if it had one
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

log = logging.getLogger(__name__)

GATE_DIR = "slice_gate"
GATE_FILE = "gate.json"
PARENT_DIR = "parent"
TORCH_ENCODER = "encoder.safetensors"
ENCODER_PREFIX = "model.encoder."
"""Where a transformers Whisper checkpoint keeps the encoder's tensors."""

Encode = Callable[[np.ndarray], Any]


def window_features(mel: np.ndarray) -> np.ndarray:
    """[B, n_mels, frames] log-mel → [B, 3 n_mels]: each band's mean, spread and frame-to-frame
    change over the window's sounding frames (the padding after a short clip sits at the
    log-mel floor in every band and is left out). Noise, channel and voice show in these; the
    words do not."""
    out = []
    for window in mel:
        sounding = (window > window.min() + 1e-4).any(axis=0)
        frames = window[:, sounding] if sounding.sum() >= 10 else window
        change = np.abs(np.diff(frames, axis=1)).mean(axis=1)
        out.append(np.concatenate([frames.mean(axis=1), frames.std(axis=1), change]))
    return np.asarray(out, dtype=np.float64)


class SliceGate(BaseModel):
    """A logistic regression on `window_features`, standardised: P(window is the drift)."""

    feature_mean: list[float]
    feature_scale: list[float]
    weights: list[float]
    bias: float
    threshold: float = 0.5
    parent: str
    """The version whose encoder serves what the gate turns away."""
    fitted_on: dict[str, int] = {}
    """Clips per class the classifier was fitted on (drift, known-good)."""
    validation: dict[str, float] = {}
    """How a fit without them sorted the clips it was checked on (retrain/slice_gate.py): the share
    of the drift's sent to the retrained layers, and of the known-good ones to the parent's."""

    def drift_probability(self, features: np.ndarray) -> np.ndarray:
        """P(drift) of each row of `window_features`."""
        x = (features - np.asarray(self.feature_mean)) / np.asarray(self.feature_scale)
        return 1.0 / (1.0 + np.exp(-(x @ np.asarray(self.weights) + self.bias)))

    def to_retrained(self, features: np.ndarray) -> np.ndarray:
        """True where a window (a row of `window_features`) goes to the retrained layers."""
        return self.drift_probability(features) >= self.threshold


class GatedBackend:
    """A backend whose `encode` sends each window to the tuned or the parent's encoder; the
    decoder (the same weights in both) is the tuned backend's."""

    def __init__(self, tuned, parent_encode: Encode, gate: SliceGate):
        self.tuned = tuned
        self.parent_encode = parent_encode
        self.gate = gate
        self.on_route: Callable[[int, int], None] | None = None
        """Called with each batch's (windows to the retrained encoder, windows to the parent's)."""

    def encode(self, mel: np.ndarray):
        drift = self.gate.to_retrained(window_features(mel))
        if self.on_route is not None:
            self.on_route(int(drift.sum()), int((~drift).sum()))
        if drift.all():
            return self.tuned.encode(mel)
        if not drift.any():
            return self.parent_encode(mel)
        return _merge(drift, self.tuned.encode(mel[drift]), self.parent_encode(mel[~drift]))

    def start(self, encoded, tokens: np.ndarray):
        return self.tuned.start(encoded, tokens)

    def step(self, tokens: np.ndarray, cache):
        return self.tuned.step(tokens, cache)

    def reorder(self, cache, index: np.ndarray):
        return self.tuned.reorder(cache, index)


def _merge(drift: np.ndarray, tuned, parent):
    """The two encoders' outputs back in window order (numpy for ONNX, torch tensors for torch)."""
    if isinstance(tuned, np.ndarray):
        out = np.empty((len(drift), *tuned.shape[1:]), dtype=tuned.dtype)
        out[drift], out[~drift] = tuned, parent
        return out
    import torch

    order = np.argsort(np.concatenate([np.flatnonzero(drift), np.flatnonzero(~drift)]), kind="stable")
    return torch.cat([tuned, parent]).index_select(0, torch.from_numpy(order).to(tuned.device))


def gate_dir(model_dir: Path) -> Path | None:
    """The version's slice gate directory, when it has one."""
    path = Path(model_dir) / GATE_DIR
    return path if (path / GATE_FILE).exists() else None


def load_gate(directory: Path) -> SliceGate:
    return SliceGate.model_validate_json((Path(directory) / GATE_FILE).read_text())


def gated(backend, model_dir: Path, parent_encoder: Callable[[Path], Encode]) -> Any:
    """`backend` behind its version's slice gate (and the parent's, nested), or as it is.
    `parent_encoder(dir)` builds the encode function over a parent's encoder files in `dir`."""
    directory = gate_dir(model_dir)
    if directory is None:
        return backend
    parent_root = directory / PARENT_DIR
    parent = gated(_EncodeOnly(parent_encoder(parent_root)), parent_root, parent_encoder)
    gate = load_gate(directory)
    log.info("slice gate: windows like the drift go to %s's retrained encoder, the rest to %s's", model_dir.name,
             gate.parent)
    return GatedBackend(backend, parent.encode, gate)


class _EncodeOnly:
    def __init__(self, encode: Encode):
        self.encode = encode
