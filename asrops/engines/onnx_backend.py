"""The ONNX Runtime backend, over a version's encoder graph and its one merged decoder
(engines/onnx_graphs.py): the first pass also yields the cross-attention keys/values; every
later step feeds the cache back with `use_cache_branch` set."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from asrops.engines.onnx_graphs import DECODER, EXPORTED_DECODERS, merge_decoders

log = logging.getLogger(__name__)

_FIRST_PASS, _WITH_CACHE = np.array([False]), np.array([True])
"""The merged decoder's `use_cache_branch`, made once rather than at every token."""


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(model: Path | bytes, device: str, threads: int, *, prepack: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle intra-op threads must sleep, not spin: our decoding loop runs Python between ONNX
    # calls, and spinning threads steal its core (measured: 20 % slower on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=opts,
                                providers=_providers(device))


def _decoder_graph(decoder_dir: Path) -> Path | bytes:
    """The merged decoder; a version published before the merge gets it built in memory."""
    if (decoder_dir / DECODER).exists() or not all((decoder_dir / n).exists() for n in EXPORTED_DECODERS):
        return decoder_dir / DECODER
    log.warning("%s holds the two decoder graphs of an older asrops: merging them in memory (about 10 s "
                "and 1.5 GB of memory while loading); re-publish the version to skip this", decoder_dir)
    with tempfile.TemporaryDirectory(prefix="asrops-decoder-") as tmp:
        return merge_decoders(decoder_dir, Path(tmp) / DECODER).read_bytes()


def _encode_function(encoder: Path, device: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Features (batch, mels, frames) to hidden states. An int8 encoder quantises its activations
    with one scale per tensor (DynamicQuantizeLinear), so in a batch a clip's encoding would depend
    on its batch-mates (a loud one coarsens a quiet one's scale): it encodes one clip at a time,
    which on CPU is also faster (measured on 2 cores, 8 clips over 15 s: 315 ms one by one, 384 ms
    as a batch; over 20 s: 602 and 643 ms)."""
    import onnx

    session = _session(encoder, device, threads)
    graph = onnx.load(str(encoder), load_external_data=False).graph
    if not any(node.op_type == "DynamicQuantizeLinear" for node in graph.node):
        return lambda mel: session.run(None, {"input_features": mel})[0]
    return lambda mel: np.concatenate([session.run(None, {"input_features": mel[i : i + 1]})[0]
                                       for i in range(len(mel))])


def onnx_encoder(encoder: Path, device: str = "cpu", threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """An encoder graph alone, as an encode function (a slice gate's parent encoder)."""
    return _encode_function(Path(encoder), device, threads)


class OnnxWhisperBackend:
    """`encoder` is the encoder graph's path (fp32 or int8); `decoder_dir` holds the decoder.
    `decoder_threads`: the decoder's intra-op threads, 0 for `threads` (engines `decoder_threads`).

    `prepack_decoder`: the int8 decoder's MatMulNBits needs its weights prepacked (unpacked at
    every call otherwise: 100 ms a step instead of 3). The fp32 decoder steps faster without
    (6.2 against 7.8 ms) and keeps no packed copy of its 80-MB projection (all measured on 2 cores)."""

    def __init__(self, encoder: Path, decoder_dir: Path, device: str = "cpu", threads: int = 0,
                 decoder_threads: int = 0, prepack_decoder: bool = True):
        self.encode = _encode_function(Path(encoder), device, threads)
        """Features (batch, mels, frames) to the encoder's hidden states."""
        self.decoder = _session(_decoder_graph(Path(decoder_dir)), device, decoder_threads or threads,
                                prepack=prepack_decoder)
        inputs = self.decoder.get_inputs()
        self._past_in = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        _, self._heads, _, self._head_dim = next(i.shape for i in inputs if i.name in self._past_in)
        self._width = next(i.shape for i in inputs if i.name == "encoder_hidden_states")[2]
        self._present = [o.name.replace("present.", "past_key_values.") for o in self.decoder.get_outputs()][1:]

    def start(self, encoded: np.ndarray, tokens: np.ndarray):
        empty = np.zeros((len(tokens), self._heads, 0, self._head_dim), np.float32)
        logits, *present = self.decoder.run(None, {
            "input_ids": tokens, "encoder_hidden_states": encoded, "use_cache_branch": _FIRST_PASS,
            **{name: empty for name in self._past_in}})
        return logits, dict(zip(self._present, present))

    def step(self, tokens: np.ndarray, cache: dict[str, np.ndarray]):
        logits, *present = self.decoder.run(None, {
            "input_ids": tokens, "encoder_hidden_states": np.zeros((len(tokens), 0, self._width), np.float32),
            "use_cache_branch": _WITH_CACHE, **{name: cache[name] for name in self._past_in}})
        for name, value in zip(self._present, present):
            if ".decoder." in name:  # self-attention grows; the cross-attention's stays (this
                cache[name] = value  # branch outputs placeholders for it)
        return logits[:, -1], cache

    def reorder(self, cache: dict[str, np.ndarray], index: np.ndarray):
        return {name: value[index] for name, value in cache.items()}
