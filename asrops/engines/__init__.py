"""Inference engines behind one interface (`WhisperEngine.transcribe`).

A version directory holds a transformers checkpoint at its root, its fp32 ONNX export in
`onnx/fp32/` (an encoder and one merged decoder, engines/onnx_graphs.py) and their int8
quantisations in `onnx/int8/` (models/onnx_export.py); `load_engine` picks the backend that runs
them. A version published before the int8 decoder has only the fp32 one, which `onnx-int8` then
reads. A retrained version may also carry a slice gate and its parent's encoder
(engines/slice_gate.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

from asrops.engines.engine import WhisperEngine
from asrops.engines.onnx_graphs import DECODER, ENCODER, accepts_short_windows
from asrops.engines.slice_gate import PARENT_DIR, TORCH_ENCODER, gate_dir, gated
from asrops.engines.types import DecodeOptions, Segment, Transcription
from asrops.errors import ModelImportError

log = logging.getLogger(__name__)

EngineKind = Literal["torch", "onnx", "onnx-int8"]
ENCODERS = {"onnx": f"onnx/fp32/{ENCODER}", "onnx-int8": f"onnx/int8/{ENCODER}"}
DECODERS = {"onnx": "onnx/fp32", "onnx-int8": "onnx/int8"}

__all__ = ["DecodeOptions", "EngineKind", "Segment", "Transcription", "WhisperEngine", "engine_lanes", "load_engine",
           "resolve_device"]


def resolve_device(device: str, kind: str = "torch") -> str:
    """`auto` → `cuda` when the engine's runtime sees a GPU (torch for `torch`, onnxruntime's
    CUDA provider for the ONNX kinds), else `cpu`. Only the torch kind imports torch: it costs
    an ONNX engine's process about 230 MB."""
    if device != "auto":
        return device
    if kind == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def engine_lanes(lanes: int, device: str, kind: str) -> int:
    """How many batches a model replica decodes side by side on its one engine: `lanes`, or by
    default 2 on CPU (one decodes while the other runs Python between ONNX calls) and 1 on GPU."""
    if lanes:
        return lanes
    return 1 if resolve_device(device, kind) == "cuda" else 2


def engine_threads(threads: int) -> int:
    """An engine's intra-op threads: `threads`, or with 0 one per core this process may use.
    Never ONNX Runtime's own default (0): that pins each of its pool threads to one core, so a
    pool thread waits whenever anything else runs on its core while another core sits idle, and
    the whole parallel step waits for it. In a model replica on 2 cores the encoder's pool thread
    was pinned to core 1, and in one service benchmark run the engine there took 1.18x the time of
    the same engine on 2 unpinned threads beside the same idle service (c=1, paired medians)."""
    return threads or len(os.sched_getaffinity(0))


def decoder_threads(threads: int, lanes: int) -> int:
    """The decoder's intra-op threads: the engine's cores shared among its lanes. A decoding
    step is a few small matrix products; split over two threads it waits for the slower one
    whenever another process takes a core. On 2 cores, one clip at a time (paired medians against
    2 threads alone): 1 thread alone 0.98x; beside four processes each burning 0.3 ms every 5 ms,
    1.11-1.12x against 1.18-1.20x on 2 threads; beside eight burning 0.05 ms every 4 ms, 1.14x
    both. Two lanes of batches ran as fast either way; one lane of batches of 8 was 14 % slower
    on 1 thread, so a lone caller keeps every core."""
    return max(1, engine_threads(threads) // lanes)


def single_threaded_blas() -> None:
    """NumPy's OpenBLAS runs on one thread in a process that holds an engine. The engine's
    parallel work is ONNX Runtime's (or torch's) own threads; OpenBLAS's (one per core) only
    speed up the small log-mel projection, then spin-wait and take a core from them. On 2
    cores the onnx-int8 engine took 1.27x its time with them (24 clips, 3 passes, interleaved).
    Ray sets OMP_NUM_THREADS=1 for an actor under one CPU, yet our model replicas ran more than
    one (their transcripts changed with this), so it is not left to the environment."""
    from threadpoolctl import ThreadpoolController

    ThreadpoolController().select(internal_api="openblas").limit(limits=1)


def load_engine(model_dir: Path, kind: EngineKind = "onnx-int8", device: str = "auto",
                threads: int = 0, short_windows: bool = True, lanes: int = 1) -> WhisperEngine:
    """Build an engine over a (verified) version directory. `short_windows`: encode a short
    clip's window over less than 30 s where every encoder graph of the version allows it
    (engines/engine.py); off, every window is 30 s. `lanes`: how many calls will run on it side
    by side; an ONNX engine's decoder gets its share of the cores (`decoder_threads`). `threads`:
    0 for one per core (`engine_threads`). The process's BLAS goes single-threaded
    (`single_threaded_blas`)."""
    model_dir = Path(model_dir)
    threads = engine_threads(threads)
    single_threaded_blas()
    device = resolve_device(device, kind)
    if kind == "torch":
        from asrops.engines.torch_backend import TorchWhisperBackend

        backend = TorchWhisperBackend(model_dir, device=device, threads=threads)

        def parent_encoder(root: Path):
            return backend.encoder_from(root / TORCH_ENCODER)
    else:
        from asrops.engines.onnx_backend import OnnxWhisperBackend, onnx_encoder

        encoder = model_dir / ENCODERS[kind]
        if not encoder.exists():
            raise ModelImportError(f"{model_dir} has no {ENCODERS[kind]}; re-publish it (publishing exports ONNX).")
        decoders = model_dir / DECODERS[kind]
        if not (decoders / DECODER).exists():
            log.info("%s has no %s: its fp32 decoder is used", model_dir.name, decoders / DECODER)
            decoders = model_dir / DECODERS["onnx"]
        backend = OnnxWhisperBackend(encoder, decoders, device=device, threads=threads,
                                     decoder_threads=decoder_threads(threads, lanes),
                                     prepack_decoder=decoders == model_dir / DECODERS["onnx-int8"])

        def parent_encoder(root: Path):
            return onnx_encoder(root / ENCODERS[kind], device, threads)
    backend = gated(backend, model_dir, parent_encoder)
    short_windows = short_windows and kind != "torch" and all(accepts_short_windows(e)
                                                               for e in _encoders(model_dir, kind))
    gen = json.loads((model_dir / "generation_config.json").read_text())
    log.info("loaded %s engine (%s) from %s", kind, device, model_dir)
    return WhisperEngine(
        name=kind,
        backend=backend,
        model_dir=model_dir,
        suppress_tokens=gen["suppress_tokens"],
        begin_suppress_tokens=gen["begin_suppress_tokens"],
        short_windows=short_windows,
    )


def _encoders(model_dir: Path, kind: str):
    """The ONNX encoder graphs an engine over `model_dir` runs: its own and its gates' parents'."""
    yield model_dir / ENCODERS[kind]
    if (directory := gate_dir(model_dir)) is not None:
        yield from _encoders(directory / PARENT_DIR, kind)
