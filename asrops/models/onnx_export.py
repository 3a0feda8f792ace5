"""Export a transformers Whisper checkpoint to ONNX (fp32) and quantise it (int8 weights).

Why optimum: it is the maintained Whisper exporter (encoder, first-pass decoder, and
decoder-with-past graphs with named key/value inputs). Why dynamic int8: on CPU it is what
makes ONNX Runtime as fast as CTranslate2's int8, for a change of about one word in a
thousand (see the engine benchmark).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

GRAPHS = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


def export_onnx(model_dir: Path, out_dir: Path, progress: Callable[[str], None] = log.info) -> Path:
    """Write the three fp32 graphs of `model_dir` into `out_dir`."""
    from optimum.exporters.onnx import main_export

    started = time.monotonic()
    progress(f"exporting {model_dir.name} to ONNX (fp32, about 30 s on 2 cores)")
    with tempfile.TemporaryDirectory(prefix="asrops-onnx-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings are about branches Whisper never takes
        main_export(
            str(model_dir),
            output=tmp,
            task="automatic-speech-recognition-with-past",
            no_post_process=True,  # keep the two decoders separate; we drive them ourselves
            do_validation=False,
            device="cpu",
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GRAPHS:
            shutil.move(str(Path(tmp) / name), out_dir / name)
    progress(f"ONNX export done in {time.monotonic() - started:.0f} s")
    return out_dir


def quantize_int8(fp32_dir: Path, out_dir: Path, progress: Callable[[str], None] = log.info) -> Path:
    """Dynamic int8 quantisation of every graph's MatMul weights (activations stay fp32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(GRAPHS, 1):
        started = time.monotonic()
        quantize_dynamic(
            fp32_dir / name,
            out_dir / name,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
        progress(f"quantised {name} ({i}/{len(GRAPHS)}) in {time.monotonic() - started:.0f} s")
    return out_dir
