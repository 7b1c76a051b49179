"""A model with one layer's output passed through a channel map whose weights are inputs.

Every scheme ends in the channel step ``y ~ M yhat + b`` (``M = P Q^T``); for the channel pair the
written chain computes exactly ``M y + b`` from the original response ``y``. So the damage a
candidate rank does to the model's outputs, that layer alone changed, is measured by feeding ``M``
and ``b`` to one model with a 1 x 1 Conv (MatMul + Add for a dense layer) after the layer: one
onnxruntime session per layer serves all of its candidates.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .dense import is_dense
from .layers import ConvLayer

#: Names of the probe's weight and bias inputs.
PROBE_W, PROBE_B = "lowrank_probe_W", "lowrank_probe_B"


def probe_model(model: onnx.ModelProto, layer: ConvLayer | None,
                context: list[tuple[ConvLayer, np.ndarray, np.ndarray]] = ()) -> onnx.ModelProto:
    """Copy of ``model`` where ``layer.output`` becomes ``conv1x1(y, PROBE_W) + PROBE_B`` of the old one.

    ``PROBE_W``: (d, d, 1, 1) for a Conv layer (channel axis 1), (d, d) holding ``M^T`` for a dense layer
    (channel axis last); ``PROBE_B``: (d,). Feeding ``M = I``, ``b = 0`` gives the original outputs.
    ``context``: other layers' fixed maps ``(layer, M, b)``, written as constants the same way, so that a
    candidate is measured with the rest of the model already approximated."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    g = new.graph
    maps = {lay.output: (lay, f"{lay.output}__ctx_W", f"{lay.output}__ctx_B") for lay, _, _ in context}
    for lay, m, b in context:
        w = m.T if is_dense(lay) else m[:, :, None, None]
        g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), maps[lay.output][1]),
                              numpy_helper.from_array(np.ascontiguousarray(b, dtype=np.float32), maps[lay.output][2])])
    if layer is not None:
        maps[layer.output] = (layer, PROBE_W, PROBE_B)
    _splice(g, maps)
    if layer is not None:
        d = layer.out_channels
        w_shape = [d, d] if is_dense(layer) else [d, d, 1, 1]
        g.input.extend([helper.make_tensor_value_info(PROBE_W, TensorProto.FLOAT, w_shape),
                        helper.make_tensor_value_info(PROBE_B, TensorProto.FLOAT, [d])])
    return new


def map_inputs(layer: ConvLayer) -> tuple[str, str]:
    """Names of one layer's weight and bias inputs in :func:`probe_layers`."""
    return f"{layer.output}__map_W", f"{layer.output}__map_B"


def probe_layers(model: onnx.ModelProto, layers: list[ConvLayer]) -> onnx.ModelProto:
    """Copy of ``model`` with a channel map after *each* of ``layers``, its weights inputs named by
    :func:`map_inputs` (shaped as ``PROBE_W`` / ``PROBE_B``): one session evaluates any choice of maps."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    g = new.graph
    maps = {lay.output: (lay, *map_inputs(lay)) for lay in layers}
    _splice(g, maps)
    for lay in layers:
        d = lay.out_channels
        w_name, b_name = map_inputs(lay)
        g.input.extend([helper.make_tensor_value_info(w_name, TensorProto.FLOAT, [d, d] if is_dense(lay) else
                                                      [d, d, 1, 1]),
                        helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [d])])
    return new


def _splice(g: onnx.GraphProto, maps: dict) -> None:
    """After the node producing each tensor of ``maps`` ({output: (layer, W name, B name)}), its map."""
    nodes, found = [], set()
    for node in g.node:
        nodes.append(node)
        for y in [o for o in node.output if o in maps]:
            found.add(y)
            lay, w_name, b_name = maps[y]
            raw = f"{y}__probe_in"
            node.output[list(node.output).index(y)] = raw
            nodes.extend(_probe_nodes(lay, raw, y, w_name, b_name))
    if set(maps) - found:
        raise KeyError(f"no node produces {sorted(set(maps) - found)}")
    del g.node[:]
    g.node.extend(nodes)


def _probe_nodes(layer: ConvLayer, raw: str, y: str, w: str, b: str) -> list[onnx.NodeProto]:
    if is_dense(layer):
        mid = f"{y}__probe_mm"
        return [helper.make_node("MatMul", [raw, w], [mid], name=f"{y}__probe"),
                helper.make_node("Add", [mid, b], [y], name=f"{y}__probe_bias")]
    return [helper.make_node("Conv", [raw, w, b], [y], name=f"{y}__probe", kernel_shape=[1, 1])]
