"""MatMul and Gemm layers with a constant weight: found, described like Conv layers, and rewritten.

A MatMul ``A (..., k) @ B (k, d)`` or a Gemm ``alpha A B' + beta C`` is a 1 x 1 convolution whose
channel axis is the *last* axis and whose positions are all the axes between the batch and it
(tokens, heads). So a :class:`DenseLayer` is a :class:`~onnx_lowrank.graph.layers.ConvLayer` with the
weight folded to ``(d, k, 1, 1)`` (alpha, transB applied) and ``out_shape`` written channel-first
(``[1, d, *positions]``): cost model, rank selection and the channel-step solver are the Conv ones.
Only sampling (``channels_last``) and the written nodes differ. A bias Add right after a MatMul
(what PyTorch exports for ``nn.Linear``) is folded into the layer, so an activation after it is found.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .external import tensor_array
from .layers import ConvLayer, _attr, _find_activation, graph_maps


@dataclass
class DenseLayer(ConvLayer):
    """A MatMul / Gemm by a constant matrix (channel axis last); ``add``: a folded bias Add node's output."""

    op: str = "MatMul"
    add: str | None = None

    channels_last = True


@dataclass
class DenseStage:
    """One matrix product of the factorised chain: ``x @ weight (in, out) + bias``.

    ``gemm``: written as one Gemm (2-D input), else MatMul (+ Add when there is a bias). ``replaces``
    (last stage): the output of the bias Add folded into the layer, which the chain then writes."""

    weight: np.ndarray
    bias: np.ndarray | None
    gemm: bool = False
    replaces: str | None = None


def is_dense(layer) -> bool:
    return isinstance(layer, DenseLayer)


def notional_shape(shape) -> list[int]:
    """``(N, ..., d)`` as the channel-first ``[1, d, ...]`` the Conv code reads positions from."""
    return [1, int(shape[-1])] + [int(v) for v in shape[1:-1]]


def find_dense_layers(model: onnx.ModelProto, value_types: dict) -> list[DenseLayer]:
    """Every MatMul / Gemm of a normalised model whose second operand is a constant matrix.

    MatMuls of two computed tensors (attention scores, attention times values) are not layers."""
    g = model.graph
    inits, cons, graph_outputs, order = graph_maps(g)
    layers = []
    for idx, node in enumerate(g.node):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
            continue
        b = tensor_array(inits[node.input[1]])
        layer = DenseLayer(name=node.name or node.output[0], node_index=idx, input=node.input[0],
                           output=node.output[0], weight=None, bias=None, attrs={}, op=node.op_type)
        layer.skip_reason = _read_weights(layer, node, b, inits, cons, graph_outputs)
        shape = value_types.get(layer.output, (None, None))[1]
        if shape and len(shape) >= 2 and all(isinstance(v, int) and v > 0 for v in shape[1:]):
            layer.out_shape = notional_shape(shape)
        a_shape = value_types.get(layer.input, (None, None))[1]
        if layer.skip_reason is None and a_shape is not None and len(a_shape) < 2:
            layer.skip_reason = "1-D input: no batch axis"
        if layer.skip_reason is None and layer.out_shape is None:
            layer.skip_reason = "output shape unknown (give --input-shape NAME:DIMS for symbolic inputs)"
        if layer.weight is not None:
            _find_activation(layer, g, cons, graph_outputs, inits, order)
        layers.append(layer)
    return layers


def _read_weights(layer: DenseLayer, node, b: np.ndarray, inits, cons, graph_outputs) -> str | None:
    """Set the folded weight (d, k, 1, 1) and bias; the reason the layer cannot be taken, if any."""
    if b.ndim != 2:
        return f"constant operand of rank {b.ndim} (only a matrix is a layer)"
    if b.dtype != np.float32:
        return f"weights are {b.dtype}, only float32 is supported"
    w, bias = b.astype(np.float64), None
    if node.op_type == "Gemm":
        if int(_attr(node, "transA", 0)):
            return "Gemm with transA=1"
        w = float(_attr(node, "alpha", 1.0)) * (w.T if int(_attr(node, "transB", 0)) else w)
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in inits:
                return "bias is computed at run time, not a constant"
            c = tensor_array(inits[node.input[2]]).astype(np.float64)
            if c.size not in (1, w.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
                return f"bias of shape {list(c.shape)} differs between rows"
            bias = float(_attr(node, "beta", 1.0)) * np.broadcast_to(c.reshape(-1), (w.shape[1],))
    else:
        users = cons.get(node.output[0], [])
        add = users[0] if len(users) == 1 and node.output[0] not in graph_outputs else None
        if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            c = tensor_array(inits[other]) if other in inits else None
            if c is not None and c.dtype == np.float32 and c.size in (1, w.shape[1]) and \
                    (c.ndim == 0 or c.shape[-1] == c.size):
                bias = np.broadcast_to(c.astype(np.float64).reshape(-1), (w.shape[1],))
                layer.add = layer.output = add.output[0]
    layer.weight = np.ascontiguousarray(w.T[:, :, None, None], dtype=np.float32)
    layer.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    return None


def write_dense(graph: gs.Graph, node: gs.Node, key: str, stages: list[DenseStage], unique) -> None:
    """Replace ``node`` (and the bias Add folded into its layer, if any) by MatMul / Gemm stages.

    The chain ends in the layer's output tensor (the Add's output when one was folded); ``unique``
    makes new names."""
    x, y = node.inputs[0], node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    if stages[-1].replaces:
        (add,) = [n for n in y.outputs if n.outputs and n.outputs[0].name == stages[-1].replaces]
        y = add.outputs[0]
        add.inputs.clear()
        add.outputs.clear()
    current = x
    for i, st in enumerate(stages):
        base = unique(f"{key}_lowrank{i}")
        w = gs.Constant(unique(base + "_W"), np.ascontiguousarray(st.weight, dtype=np.float32))
        b = None if st.bias is None else gs.Constant(unique(base + "_B"), np.ascontiguousarray(st.bias, dtype=np.float32))
        out = y if i == len(stages) - 1 else gs.Variable(unique(base + "_out"), dtype=np.float32)
        if st.gemm:
            graph.nodes.append(gs.Node(op="Gemm", name=base, inputs=[current, w] + ([b] if b is not None else []),
                                       outputs=[out]))
        elif b is None:
            graph.nodes.append(gs.Node(op="MatMul", name=base, inputs=[current, w], outputs=[out]))
        else:
            mid = gs.Variable(unique(base + "_mm"), dtype=np.float32)
            graph.nodes.append(gs.Node(op="MatMul", name=base, inputs=[current, w], outputs=[mid]))
            graph.nodes.append(gs.Node(op="Add", name=base + "_bias", inputs=[mid, b], outputs=[out]))
        current = out

