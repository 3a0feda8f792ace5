"""The ONNX graphs a version carries, and the one transformation that makes its decoder.

optimum exports Whisper as an encoder and two decoders: `decoder_model.onnx` (the first pass,
which also yields the cross-attention keys and values) and `decoder_with_past_model.onnx` (one
token at a time). The two hold the same weights, and each holds the token embedding twice (the
input lookup and, transposed, the output projection it is tied to): 80 MB apiece. A version
keeps one decoder instead, `decoder_model_merged.onnx`: optimum's merge (an If node on
`use_cache_branch` over one set of weights), with the input lookup reading the output
projection's matrix by column. Same arithmetic, same tokens; the engine's resident memory went
from about 720 MB to 450 MB (measured in the commit that made this).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

ENCODER = "encoder_model.onnx"
DECODER = "decoder_model_merged.onnx"
"""The one decoder graph: inputs `input_ids`, `encoder_hidden_states`, `use_cache_branch` and
every `past_key_values.*`; outputs `logits` and every `present.*`."""
EXPORTED_DECODERS = ("decoder_model.onnx", "decoder_with_past_model.onnx")
"""What optimum writes, and what versions published before the merge still carry."""
FRAMES_INPUT = "input_features"


def accept_short_windows(encoder) -> bool:
    """Let an exported encoder take fewer than 3,000 log-mel frames (engines/engine.py decides
    how many): optimum's graph adds all 1,500 position embeddings to its frames; it now adds as
    many as there are frames, and its input's frame count is free. Returns False, changing
    nothing, where the position embedding is not found."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = encoder.graph
    frames = next(i for i in graph.input if i.name == FRAMES_INPUT).type.tensor_type.shape.dim[2]
    n_frames = frames.dim_value  # the convolutions halve them: one position per two frames
    positions = {t.name for t in graph.initializer if len(t.dims) == 2 and t.dims[0] * 2 == n_frames}
    add = next((n for n in graph.node if n.op_type == "Add" and any(i in positions for i in n.input)), None)
    if add is None:
        return False
    index = [i in positions for i in add.input].index(True)
    hidden, table = add.input[1 - index], add.input[index]
    zero, count, used = f"{table}/zero", f"{table}/count", f"{table}/used"
    graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), zero))
    at = list(graph.node).index(add)
    graph.node.insert(at, helper.make_node("Shape", [hidden], [count], name=count, start=1, end=2))
    graph.node.insert(at + 1, helper.make_node("Slice", [table, zero, count, zero], [used], name=used))
    add.input[index] = used
    frames.dim_param = "frames"
    for output in graph.output:
        for dim in output.type.tensor_type.shape.dim:
            if dim.dim_value * 2 == n_frames:
                dim.dim_param = "encoder_frames"
    del graph.value_info[:]  # shapes inferred for the full window
    return True


def accepts_short_windows(encoder: Path) -> bool:
    """Whether an encoder graph's frame count is free (`accept_short_windows`)."""
    import onnx

    graph = onnx.load(str(encoder), load_external_data=False).graph
    return not next(i for i in graph.input if i.name == FRAMES_INPUT).type.tensor_type.shape.dim[2].dim_value


def merge_decoders(decoder_dir: Path, out: Path) -> Path:
    """Write the merged decoder of the two exported ones in `decoder_dir` to `out`."""
    import onnx
    from optimum.onnx import merge_decoders as optimum_merge

    first, with_past = (onnx.load(str(Path(decoder_dir) / name)) for name in EXPORTED_DECODERS)
    # strict=False: the first pass also outputs the cross-attention keys/values, which the
    # with-past graph only reads; optimum gives that branch placeholder outputs for them.
    # optimum checks the merged model through a file: it needs a path to save to.
    merged = optimum_merge(first, with_past, strict=False, save_path=out)
    if _embed_by_output_projection(merged):
        onnx.save(merged, str(out))
    else:  # a checkpoint that unties them keeps both matrices (optimum's save above stands)
        log.info("the decoder's token embedding and output projection differ: both kept")
    return out


def _nodes(graph):
    """Every node of `graph` and of its subgraphs (the If node's two branches), with its graph."""
    for node in graph.node:
        yield graph, node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from _nodes(attribute.g)


def _embed_by_output_projection(model) -> bool:
    """Replace the token embedding's lookup `Gather(E, ids)` by `Gather(P, ids, axis=1)` then a
    transpose, where `P` (hidden x vocabulary) is the output projection's matrix, equal to `E`
    transposed (Whisper ties them); then drop `E`. Returns False, changing nothing, when the two
    are not one matrix (a checkpoint that unties them)."""
    import numpy as np
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    embedding = next(name for name in initializers if "embed_tokens" in name)
    projection = next(node.input[1] for _, node in _nodes(model.graph)
                      if node.op_type == "MatMul" and node.name.endswith("proj_out/MatMul"))
    if not np.array_equal(numpy_helper.to_array(initializers[embedding]).T,
                          numpy_helper.to_array(initializers[projection])):
        return False
    lookups = [(graph, node) for graph, node in _nodes(model.graph)
               if node.op_type == "Gather" and node.input[0] == embedding]
    for i, (graph, node) in enumerate(lookups):
        by_column = f"{node.output[0]}/by_column_{i}"
        at = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(at, helper.make_node("Gather", [projection, node.input[1]], [by_column],
                                               name=f"{node.name}/by_column_{i}", axis=1))
        graph.node.insert(at + 1, helper.make_node("Transpose", [by_column], [node.output[0]],
                                                   name=f"{node.name}/transpose_{i}", perm=[1, 2, 0]))
    model.graph.initializer.remove(initializers[embedding])
    return True


def embed_by_quantized_projection(model) -> bool:
    """In a decoder whose output projection was quantised by MatMulNBits (models/onnx_export.py),
    make the token lookup read the quantised matrix too (`GatherBlockQuantized` on its rows, the
    same blocks and scales) and drop the fp32 matrix it read: 80 of the decoder's 113 MB. Returns
    False, changing nothing, when the lookup does not read the projection's matrix."""
    import numpy as np
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    projection = next((node for _, node in _nodes(model.graph)
                       if node.op_type == "MatMulNBits" and node.name.startswith("/proj_out/")), None)
    if projection is None:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in projection.attribute}
    weights, scales = projection.input[1], projection.input[2]
    if len(projection.input) > 3 or attrs["bits"] != 8:
        return False  # only the symmetric 8-bit layout (implicit zero point 128) is handled
    fp32 = weights.removesuffix("_Q8")
    lookups = [(graph, node) for graph, node in _nodes(model.graph)
               if node.op_type == "Gather" and node.input[0] == fp32]
    if not lookups or fp32 not in initializers:
        return False
    rows, n, k = f"{weights}/rows", attrs["N"], attrs["K"]
    zero_points = numpy_helper.from_array(np.full((n, k // attrs["block_size"]), 128, np.uint8),
                                          f"{weights}/zero_points")
    shape = numpy_helper.from_array(np.array([n, k], np.int64), f"{rows}/shape")
    model.graph.initializer.extend([zero_points, shape])
    model.graph.node.insert(0, helper.make_node("Reshape", [weights, shape.name], [rows], name=rows))
    for i, (graph, gather) in enumerate(lookups):
        transpose = next(node for node in graph.node
                         if node.op_type == "Transpose" and node.input[0] == gather.output[0])
        at = list(graph.node).index(gather)
        graph.node.remove(gather)
        graph.node.remove(transpose)
        graph.node.insert(at, helper.make_node(
            "GatherBlockQuantized", [rows, gather.input[1], scales, zero_points.name], [transpose.output[0]],
            name=f"{gather.name}/quantized_{i}", domain="com.microsoft", gather_axis=0, quantize_axis=1,
            block_size=attrs["block_size"], bits=8))
    model.graph.initializer.remove(initializers[fp32])
    return True
