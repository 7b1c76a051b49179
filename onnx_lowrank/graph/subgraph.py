"""Cutting a model into pieces that onnxruntime can run on their own.

Calibration runs the model with intermediate tensors exposed; asymmetric reconstruction runs it
segment by segment, feeding each segment the cached tensors of the one before. Both are built
here, from the normalised model, so the calibration code never edits graphs itself.
"""

from __future__ import annotations

import copy

import onnx
from onnx import TensorProto, helper


def with_outputs(model: onnx.ModelProto, names: list[str], value_types: dict) -> onnx.ModelProto:
    """Copy of the model that also returns the named intermediate tensors."""
    m = copy.deepcopy(model)
    present = {o.name for o in m.graph.output}
    for name in names:
        if name not in present:
            m.graph.output.append(helper.make_tensor_value_info(name, _elem_type(name, value_types), None))
            present.add(name)
    return m


def _elem_type(name: str, value_types: dict) -> int:
    return value_types.get(name, (TensorProto.FLOAT, None))[0] or TensorProto.FLOAT


def producers(model: onnx.ModelProto) -> dict[str, int]:
    return {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor directly (as a node input)."""
    cons: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                cons.setdefault(i, []).append(n)
    return cons


def last_use(model: onnx.ModelProto) -> dict[str, int]:
    """Index of the last node that reads each tensor (graph outputs count as read at the end)."""
    last: dict[str, int] = {}
    nodes = model.graph.node
    for i, n in enumerate(nodes):
        for name in node_reads(n):
            last[name] = i
    for o in model.graph.output:
        last[o.name] = len(nodes)
    return last


def node_reads(node: onnx.NodeProto) -> set[str]:
    reads = {i for i in node.input if i}
    for a in node.attribute:  # outer-scope tensors read inside If / Loop / Scan bodies
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for sg in graphs:
            for sn in sg.node:
                reads |= node_reads(sn)
    return reads


def segment(model: onnx.ModelProto, start: int, stop: int, inputs: list[str], outputs: list[str],
            value_types: dict, input_types: dict[str, int]) -> onnx.ModelProto:
    """Model made of nodes [start, stop) that reads ``inputs`` and returns ``outputs``."""
    g = model.graph
    nodes = list(g.node[start:stop])
    reads = set().union(*(node_reads(n) for n in nodes)) if nodes else set()
    inits = [t for t in g.initializer if t.name in reads]
    graph = helper.make_graph(
        nodes, f"segment_{start}_{stop}",
        [helper.make_tensor_value_info(n, input_types[n], None) for n in inputs],
        [helper.make_tensor_value_info(n, _elem_type(n, value_types), None) for n in outputs],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m
