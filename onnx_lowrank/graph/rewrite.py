"""Replacing a Conv by a factorised chain of Convs, with onnx-graphsurgeon.

The chain keeps the original output tensor name, so everything downstream (and the graph's
outputs) is unchanged; new node and tensor names derive from the original node's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .dense import write_dense
from .external import WeightFile, has_external_data, release_mapped_pages


@dataclass
class ConvStage:
    """One Conv of a factorised chain: weight (out, in, kh, kw), optional bias, ONNX attributes."""

    weight: np.ndarray
    bias: np.ndarray | None
    attrs: dict


def pointwise_attrs() -> dict:
    return {"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}


def first_stage_attrs(original: dict, kernel: tuple[int, int]) -> dict:
    """The k x k stage keeps the original stride, padding and dilation."""
    attrs = {k: v for k, v in original.items() if k in ("strides", "pads", "dilations", "auto_pad")}
    attrs["kernel_shape"] = list(kernel)
    attrs["group"] = 1
    if attrs.get("auto_pad") in ("NOTSET", "") or attrs.get("auto_pad") is None:
        attrs.pop("auto_pad", None)
    return attrs


def rewrite_convs(model: onnx.ModelProto, replacements: dict[str, list[ConvStage]]) -> onnx.ModelProto:
    """Return a new model where each named Conv node is replaced by its chain of stages (MatMul / Gemm
    nodes: by their DenseStage chain, see graph/dense.py)."""
    # A model whose weights are on disk gets its new weights there too (external.py), one at a time.
    release_mapped_pages()
    store = WeightFile() if has_external_data(model) else None

    def constant(name: str, values: np.ndarray) -> gs.Constant:
        if store is None:
            return gs.Constant(name, np.ascontiguousarray(values, dtype=np.float32))
        return gs.Constant(name, gs.ir.tensor.LazyValues(store.tensor(values, name)))

    graph = gs.import_onnx(model)
    taken = set(graph.tensors()) | {n.name for n in graph.nodes}
    found = set()
    for node in list(graph.nodes):
        if not node.outputs:  # a bias Add already folded into a dense chain
            continue
        key = node.name or node.outputs[0].name  # unnamed nodes go by their output, as in find_conv_layers
        if node.op not in ("Conv", "MatMul", "Gemm") or key not in replacements:
            continue
        found.add(key)
        if node.op != "Conv":  # a dense layer (graph/dense.py)
            write_dense(graph, node, key, replacements[key], lambda name: _unique(name, taken))
            continue
        stages = replacements[key]
        x, y = node.inputs[0], node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        current = x
        for i, st in enumerate(stages):
            base = _unique(f"{key}_lowrank{i}", taken)
            inputs = [current, constant(_unique(base + "_W", taken), st.weight)]
            if st.bias is not None:
                inputs.append(constant(_unique(base + "_B", taken), st.bias))
            out = y if i == len(stages) - 1 else gs.Variable(_unique(base + "_out", taken), dtype=np.float32)
            graph.nodes.append(gs.Node(op="Conv", name=base, attrs=dict(st.attrs), inputs=inputs, outputs=[out]))
            current = out
    missing = set(replacements) - found
    if missing:
        raise KeyError(f"no Conv node named {sorted(missing)}")
    graph.cleanup().toposort()
    new = gs.export_onnx(graph, do_type_check=False)
    new.ir_version = model.ir_version
    del new.opset_import[:]
    new.opset_import.extend(model.opset_import)
    new.producer_name, new.producer_version = model.producer_name, model.producer_version
    new.doc_string = model.doc_string
    del new.metadata_props[:]
    new.metadata_props.extend(model.metadata_props)
    del new.graph.value_info[:]
    return new


def add_branches(model: onnx.ModelProto, branches: list[tuple[str, str, list[ConvStage], str]]) -> onnx.ModelProto:
    """Copy of the model with extra chains of Convs, each ``(anchor, input, stages, output)``: from the
    tensor ``input`` through the stages to a new, unread tensor ``output``, inserted right after the node
    that produces ``anchor`` (so graph order stays topological when ``input`` is produced before it).
    A layer's two decompositions can then be sampled in one pass."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    g = new.graph
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in list(n.output) + list(n.input)} | \
        {n.name for n in g.node}
    nodes = []
    found = set()
    by_anchor: dict[str, list] = {}
    for anchor, *rest in branches:
        by_anchor.setdefault(anchor, []).append(rest)
    for node in g.node:
        nodes.append(node)
        anchors = [o for o in node.output if o in by_anchor]
        found.update(anchors)
        for current, stages, out in (b for a in anchors for b in by_anchor[a]):
            _chain(g, nodes, current, stages, out, taken)
    if set(by_anchor) - found:
        raise KeyError(f"no node produces {sorted(set(by_anchor) - found)}")
    del g.node[:]
    g.node.extend(nodes)
    return new


def _chain(g, nodes: list, current: str, stages: list[ConvStage], out: str, taken: set) -> None:
    for i, st in enumerate(stages):
        base = _unique(f"{out}_branch{i}", taken)
        inputs = [current, _unique(base + "_W", taken)]
        g.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(st.weight, dtype=np.float32),
                                                          inputs[1]))
        if st.bias is not None:
            inputs.append(_unique(base + "_B", taken))
            g.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(st.bias, dtype=np.float32),
                                                              inputs[2]))
        current = out if i == len(stages) - 1 else _unique(base + "_out", taken)
        nodes.append(onnx.helper.make_node("Conv", inputs, [current], name=base, **st.attrs))


def _unique(name: str, taken: set) -> str:
    cand, i = name, 1
    while cand in taken:
        cand, i = f"{name}_{i}", i + 1
    taken.add(cand)
    return cand
