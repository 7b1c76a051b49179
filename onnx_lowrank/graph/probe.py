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
    _splice(g, {y: (lambda raw, y, m=m: _probe_nodes(m[0], raw, y, m[1], m[2])) for y, m in maps.items()})
    if layer is not None:
        d = layer.out_channels
        w_shape = [d, d] if is_dense(layer) else [d, d, 1, 1]
        g.input.extend([helper.make_tensor_value_info(PROBE_W, TensorProto.FLOAT, w_shape),
                        helper.make_tensor_value_info(PROBE_B, TensorProto.FLOAT, [d])])
    return new


def map_inputs(layer: ConvLayer) -> tuple[str, str, str]:
    """Names of one layer's inputs in :func:`probe_layers`: the two factors and the bias."""
    return f"{layer.output}__map_A", f"{layer.output}__map_B", f"{layer.output}__map_b"


def probe_layers(model: onnx.ModelProto, layers: list[ConvLayer]) -> onnx.ModelProto:
    """Copy of ``model`` with a factored channel map ``P (Q^T y) + b`` after *each* of ``layers``, its factors
    inputs of any rank (named by :func:`map_inputs`): one session evaluates any choice of ranks, at the cost
    of the factorised layers' second stage rather than of a d x d map. A Conv layer takes ``A = Q^T`` as
    (r, d, 1, 1) and ``B = P`` as (d, r, 1, 1); a dense layer ``A = Q`` (d, r) and ``B = P^T`` (r, d)."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    g = new.graph
    _splice(g, {lay.output: (lambda raw, y, lay=lay: _factor_nodes(lay, raw, y)) for lay in layers})
    for lay in layers:
        d, r = lay.out_channels, f"{lay.output}__rank"
        a, b, bias = map_inputs(lay)
        shapes = ([d, r], [r, d]) if is_dense(lay) else ([r, d, 1, 1], [d, r, 1, 1])
        g.input.extend([helper.make_tensor_value_info(a, TensorProto.FLOAT, shapes[0]),
                        helper.make_tensor_value_info(b, TensorProto.FLOAT, shapes[1]),
                        helper.make_tensor_value_info(bias, TensorProto.FLOAT, [d])])
    return new


def _factor_nodes(layer: ConvLayer, raw: str, y: str) -> list[onnx.NodeProto]:
    a, b, bias = map_inputs(layer)
    mid = f"{y}__map_mid"
    if is_dense(layer):
        return [helper.make_node("MatMul", [raw, a], [mid], name=f"{y}__map_1"),
                helper.make_node("MatMul", [mid, b], [f"{mid}2"], name=f"{y}__map_2"),
                helper.make_node("Add", [f"{mid}2", bias], [y], name=f"{y}__map_bias")]
    return [helper.make_node("Conv", [raw, a], [mid], name=f"{y}__map_1", kernel_shape=[1, 1]),
            helper.make_node("Conv", [mid, b, bias], [y], name=f"{y}__map_2", kernel_shape=[1, 1])]


def _splice(g: onnx.GraphProto, maps: dict) -> None:
    """After the node producing each tensor of ``maps``, the nodes its builder makes from (its renamed
    output, the tensor name): ``{tensor: builder}``."""
    nodes, found = [], set()
    for node in g.node:
        nodes.append(node)
        for y in [o for o in node.output if o in maps]:
            found.add(y)
            raw = f"{y}__probe_in"
            node.output[list(node.output).index(y)] = raw
            nodes.extend(maps[y](raw, y))
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
