"""The ONNX Runtime backend, over the three graphs optimum exports for Whisper:
`encoder_model.onnx`, `decoder_model.onnx` (first pass, also yields the cross-attention
keys/values) and `decoder_with_past_model.onnx` (one token at a time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path: Path, device: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle intra-op threads must sleep, not spin: our decoding loop runs Python between ONNX
    # calls, and spinning threads steal its core (measured: 20 % slower on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=_providers(device))


def onnx_encoder(encoder: Path, device: str = "cpu", threads: int = 0):
    """An encoder graph alone, as an encode function (a slice gate's parent encoder)."""
    session = _session(Path(encoder), device, threads)
    return lambda mel: session.run(None, {"input_features": mel})[0]


class OnnxWhisperBackend:
    """`encoder` is the encoder graph's path (fp32 or int8); `decoder_dir` holds the decoders."""

    def __init__(self, encoder: Path, decoder_dir: Path, device: str = "cpu", threads: int = 0):
        def session(path: Path):
            return _session(path, device, threads)

        self.encoder = session(Path(encoder))
        self.decoder = session(Path(decoder_dir) / "decoder_model.onnx")
        self.decoder_past = session(Path(decoder_dir) / "decoder_with_past_model.onnx")
        self._present = [o.name for o in self.decoder.get_outputs()][1:]
        self._past_in = [i.name for i in self.decoder_past.get_inputs() if i.name.startswith("past_key_values.")]
        self._past_out = [o.name for o in self.decoder_past.get_outputs()][1:]

    def encode(self, mel: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"input_features": mel})[0]

    def start(self, encoded: np.ndarray, tokens: np.ndarray):
        logits, *present = self.decoder.run(None, {"input_ids": tokens, "encoder_hidden_states": encoded})
        cache = {name.replace("present.", "past_key_values."): v for name, v in zip(self._present, present)}
        return logits, cache

    def step(self, tokens: np.ndarray, cache: dict[str, np.ndarray]):
        feeds = {"input_ids": tokens, **{name: cache[name] for name in self._past_in}}
        logits, *present = self.decoder_past.run(None, feeds)
        for name, value in zip(self._past_out, present):  # self-attention grows; cross stays
            cache[name.replace("present.", "past_key_values.")] = value
        return logits[:, -1], cache

    def reorder(self, cache: dict[str, np.ndarray], index: np.ndarray):
        return {name: value[index] for name, value in cache.items()}
