"""Export a transformers Whisper checkpoint to ONNX (fp32) and quantise it (int8 weights).

Why optimum: it is the maintained Whisper exporter (encoder, first-pass decoder, and
decoder-with-past graphs with named key/value inputs), and it merges the two decoders into the
one a version keeps (engines/onnx_graphs.py).

Two int8 schemes, one per graph. The encoder runs a 30-s window of 1,500 frames at once: ONNX
Runtime's dynamic quantisation (one scale per weight matrix, activations quantised on the fly)
costs it no accuracy. The decoder runs one token at a time, reading every weight for one row of
activations: its step is bound by memory, and 80 of its 113 MB are the vocabulary projection. Its
weights are quantised in blocks of 32 (one scale each, ONNX Runtime's MatMulNBits with int8
arithmetic; the token lookup reads the same blocks, engines/onnx_graphs.py). That kept the core
set's WER (6.53 % fp32, 6.49 % int8 on the 245 real clips) while a step went from 6.2 to 3 ms on 2
cores and the graph from 118 to 35 MB; per-matrix int8 had cost +0.45 WER points.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from asrops.engines.onnx_graphs import (
    DECODER,
    ENCODER,
    accept_short_windows,
    embed_by_quantized_projection,
    merge_decoders,
)

log = logging.getLogger(__name__)


def export_optimum_graphs(model_dir: Path, out_dir: Path) -> Path:
    """optimum's three fp32 graphs of `model_dir` (encoder, first-pass decoder, decoder with past)
    in `out_dir`, as it writes them."""
    from optimum.exporters.onnx import main_export

    # The tracer's warnings are about branches Whisper never takes; transformers' are about the
    # arguments optimum passes it (`torch_dtype`, a slow image processor), nothing a user can act on.
    with warnings.catch_warnings(), _quiet("transformers", logging.ERROR):
        warnings.simplefilter("ignore")
        main_export(
            str(model_dir),
            output=str(out_dir),
            task="automatic-speech-recognition-with-past",
            no_post_process=True,  # we merge the two decoders ourselves (engines/onnx_graphs.py)
            do_validation=False,
            device="cpu",
        )
    return out_dir


def export_onnx(model_dir: Path, out_dir: Path, progress: Callable[[str], None] = log.info) -> Path:
    """Write the fp32 encoder (taking windows shorter than 30 s) and merged decoder of
    `model_dir` into `out_dir`."""
    import onnx

    started = time.monotonic()
    progress(f"exporting {model_dir.name} to ONNX (fp32, about 30 s on 2 cores)")
    with tempfile.TemporaryDirectory(prefix="asrops-onnx-") as tmp:
        export_optimum_graphs(model_dir, Path(tmp))
        out_dir.mkdir(parents=True, exist_ok=True)
        encoder = onnx.load(str(Path(tmp) / ENCODER))
        if not accept_short_windows(encoder):
            log.warning("%s: the encoder's position embedding was not found; it takes 30-s windows only", model_dir)
        onnx.save(encoder, str(out_dir / ENCODER))
        progress("merging the two decoder graphs into one")
        merge_decoders(Path(tmp), out_dir / DECODER)
    progress(f"ONNX export done in {time.monotonic() - started:.0f} s")
    return out_dir


DECODER_BLOCK = 32
"""Decoder weights per int8 scale."""


def quantize_int8(fp32_dir: Path, out_dir: Path, progress: Callable[[str], None] = log.info) -> Path:
    """The int8 encoder and decoder of the fp32 graphs in `fp32_dir` (see the module's docstring)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _without_root_message(PREPROCESSING_ADVICE):
        quantize_dynamic(fp32_dir / ENCODER, out_dir / ENCODER, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    # MatMulNBits' own quantiser, because it walks the merged decoder's If branches (quantize_dynamic
    # leaves them fp32). accuracy_level 4: int8 arithmetic, the fast kernel (fp32 arithmetic
    # dequantises every weight at every call: 40 times slower).
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_dir / DECODER)), bits=8, block_size=DECODER_BLOCK,
                                     is_symmetric=True, accuracy_level=4)
    with _quiet("onnxruntime.quantization"):  # it logs a line per node
        quantizer.process()
    decoder = quantizer.model.model
    if not embed_by_quantized_projection(decoder):
        log.info("the decoder's token lookup keeps its fp32 matrix")
    onnx.save(decoder, str(out_dir / DECODER))
    progress(f"quantised {ENCODER} and {DECODER} to int8 in {time.monotonic() - started:.0f} s")
    return out_dir


@contextlib.contextmanager
def _quiet(logger_name: str, level: int = logging.WARNING):
    logger = logging.getLogger(logger_name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


PREPROCESSING_ADVICE = "Please consider to run pre-processing before quantization"
"""What `quantize_dynamic` warns on the root logger every time: its shape-inference pre-pass,
which the int8 encoder does without (the engine benchmark measures its WER)."""


@contextlib.contextmanager
def _without_root_message(prefix: str):
    """Drop one library's advice logged straight on the root logger, and nothing else."""
    def other(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    root = logging.getLogger()
    root.addFilter(other)
    try:
        yield
    finally:
        root.removeFilter(other)
