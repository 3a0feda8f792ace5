"""Export a transformers Whisper checkpoint to ONNX (fp32) and quantise it (int8 weights).

Why optimum: it is the maintained Whisper exporter (encoder, first-pass decoder, and
decoder-with-past graphs with named key/value inputs), and it merges the two decoders into the
one a version keeps (engines/onnx_graphs.py). Why int8 for the encoder only: the
encoder is most of the compute (a 30-s window every time), and its int8 weights cost no
accuracy; int8 decoders were measured at +0.45 WER points on the 245 real clips for 7 % more
speed, a bad trade, so the decoders stay fp32.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from asrops.engines.onnx_graphs import DECODER, ENCODER, merge_decoders

log = logging.getLogger(__name__)


def export_optimum_graphs(model_dir: Path, out_dir: Path) -> Path:
    """optimum's three fp32 graphs of `model_dir` (encoder, first-pass decoder, decoder with past)
    in `out_dir`, as it writes them."""
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings are about branches Whisper never takes
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
    """Write the fp32 encoder and merged decoder of `model_dir` into `out_dir`."""
    started = time.monotonic()
    progress(f"exporting {model_dir.name} to ONNX (fp32, about 30 s on 2 cores)")
    with tempfile.TemporaryDirectory(prefix="asrops-onnx-") as tmp:
        export_optimum_graphs(model_dir, Path(tmp))
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / ENCODER), out_dir / ENCODER)
        progress("merging the two decoder graphs into one")
        merge_decoders(Path(tmp), out_dir / DECODER)
    progress(f"ONNX export done in {time.monotonic() - started:.0f} s")
    return out_dir


def quantize_int8(fp32_dir: Path, out_dir: Path, progress: Callable[[str], None] = log.info) -> Path:
    """Dynamic int8 quantisation of the encoder's MatMul weights (activations stay fp32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    quantize_dynamic(fp32_dir / ENCODER, out_dir / ENCODER, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"])
    progress(f"quantised {ENCODER} to int8 in {time.monotonic() - started:.0f} s")
    return out_dir
