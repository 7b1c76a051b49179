"""Which layers are the model's output head: their output reaches the model's outputs only through ops that
mix in no other data (a constant bias or scale, Softmax, Sigmoid, reshapes).

Why the rank choice treats them apart: a head's error goes straight to the outputs, and response energy,
which ranks every other layer, says little about it. The few directions that decide a classifier's top
class carry little of its logits' energy: on the PP-OCRv4 recogniser (`--speedup 1.5`, defaults) the energy
allocation cut the 6,625-wide classifier to rank 16, keeping 96.8 % of its energy at 0.9 % relative error,
and that alone took the character error rate from 0.7 % to 32 % (benchmarks/head_layer.py). So automatic
ranks keep heads whole unless the user asks (``--factorise-head``); ``--ranks`` still sets them by hand.
"""

from __future__ import annotations

import onnx

from .subgraph import consumers

#: Ops that carry a tensor to the outputs without mixing in other data (their other inputs must be constants).
PASS_THROUGH = frozenset({"Add", "Sub", "Mul", "Div", "Softmax", "LogSoftmax", "Sigmoid", "Identity", "Cast",
                          "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})


def output_heads(model: onnx.ModelProto, outputs: dict[str, str]) -> set[str]:
    """The names in ``outputs`` ({layer name: the tensor it writes}) whose tensor reaches only graph outputs,
    each path through :data:`PASS_THROUGH` ops whose other inputs are constants."""
    g = model.graph
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    readers, graph_outputs = consumers(g), {o.name for o in g.output}
    memo: dict[str, bool] = {}

    def to_outputs(tensor: str) -> bool:
        if tensor not in memo:
            memo[tensor] = False  # a cycle (not in a valid graph) reads as "not a head"
            users = readers.get(tensor, [])
            memo[tensor] = (bool(users) or tensor in graph_outputs) and all(
                n.op_type in PASS_THROUGH and n.domain in ("", "ai.onnx")
                and all(i in constants or i == tensor or not i for i in n.input)
                and all(to_outputs(o) for o in n.output if o) for n in users)
        return memo[tensor]

    return {name for name, tensor in outputs.items() if to_outputs(tensor)}


def mark_heads(model: onnx.ModelProto, layers: list) -> None:
    """Set ``head`` on each layer (ConvLayer / DenseLayer) of ``model`` that :func:`output_heads` finds."""
    heads = output_heads(model, {lay.name: lay.output for lay in layers})
    for lay in layers:
        lay.head = lay.name in heads
