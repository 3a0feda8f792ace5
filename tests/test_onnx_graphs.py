"""The decoder graph a version keeps (asrops/engines/onnx_graphs.py): the token lookup reads the
output projection it is tied to, with the same arithmetic; untied weights are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from asrops.engines.onnx_graphs import _embed_by_output_projection

VOCAB, WIDTH = 10, 4


def _decoder(projection: np.ndarray, embedding: np.ndarray) -> onnx.ModelProto:
    """ids -> embedding lookup -> output projection: the two ends of Whisper's decoder."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["model.decoder.embed_tokens.weight", "input_ids"], ["hidden"],
                          name="/model/decoder/embed_tokens/Gather"),
         helper.make_node("MatMul", ["hidden", "projection"], ["logits"], name="/proj_out/MatMul")],
        "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "tokens", VOCAB])],
        [numpy_helper.from_array(embedding, "model.decoder.embed_tokens.weight"),
         numpy_helper.from_array(projection, "projection")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _logits(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0]


def test_the_lookup_reads_the_tied_projection_and_gives_the_same_logits():
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
    model = _decoder(embedding.T.copy(), embedding)
    ids = np.array([[1, 7, 3], [0, 9, 9]], dtype=np.int64)
    before = _logits(model, ids)
    assert _embed_by_output_projection(model)
    onnx.checker.check_model(model)
    assert [t.name for t in model.graph.initializer] == ["projection"]  # one copy of the matrix
    np.testing.assert_array_equal(_logits(model, ids), before)


def test_untied_weights_are_left_as_they_were():
    rng = np.random.default_rng(1)
    embedding = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
    model = _decoder(rng.standard_normal((WIDTH, VOCAB)).astype(np.float32), embedding)
    original = model.SerializeToString()
    assert not _embed_by_output_projection(model)
    assert model.SerializeToString() == original


def test_only_the_quantisers_advice_is_kept_off_the_root_logger(caplog):
    """`quantize_dynamic` warns the same advice on the root logger at every import; other root
    warnings meanwhile still show."""
    import logging

    from asrops.models.onnx_export import PREPROCESSING_ADVICE, _without_root_message

    with caplog.at_level(logging.WARNING), _without_root_message(PREPROCESSING_ADVICE):
        logging.warning(PREPROCESSING_ADVICE + ". Refer to example: ...")
        logging.warning("disk almost full")
    logging.warning(PREPROCESSING_ADVICE + " (after)")
    assert [r.getMessage() for r in caplog.records] == ["disk almost full", PREPROCESSING_ADVICE + " (after)"]
