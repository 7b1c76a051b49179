"""Finding the Conv layers to compress and what follows them.

The nonlinear solver needs to know the activation that follows each Conv (its target is taken
after it) and, for residual blocks, the shortcut tensor added before that activation. This
module reads those patterns off a normalised graph; it computes nothing numerical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .subgraph import consumers

# Activations the solver knows, by ONNX op type.
_SIMPLE_ACTIVATIONS = {
    "Relu": "relu",
    "HardSwish": "hardswish",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
}


@dataclass
class ConvLayer:
    """One Conv node and the pattern around it, as found in the graph."""

    name: str
    node_index: int
    input: str
    output: str
    weight: np.ndarray | None
    bias: np.ndarray | None
    attrs: dict
    group: int = 1
    out_shape: list[int] | None = None     # [N, d, H', W'] for batch 1
    activation: str = "identity"
    activation_params: dict = field(default_factory=dict)
    target: str | None = None              # tensor the reconstruction aims at (after the activation)
    shortcut: str | None = None            # residual tensor added before the activation
    skip_reason: str | None = None

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.group if self.weight is not None else 0

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0]) if self.weight is not None else 0

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:]) if self.weight is not None else ()

    @property
    def positions(self) -> int:
        return int(np.prod(self.out_shape[2:])) if self.out_shape else 0

    @property
    def target_description(self) -> str:
        if self.shortcut is not None:
            return f"after residual add + {self.activation}" if self.activation != "identity" else "after residual add"
        return f"after {self.activation}" if self.activation != "identity" else "conv output"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def conv_attrs(node: onnx.NodeProto) -> dict:
    """The Conv attributes that the factorised first layer must copy."""
    attrs = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        attrs[a.name] = v.decode() if isinstance(v, bytes) else (list(v) if isinstance(v, (list, tuple)) else v)
    return attrs


def find_conv_layers(model: onnx.ModelProto, value_types: dict) -> list[ConvLayer]:
    """Every Conv of a normalised model, with its activation / residual pattern and skip reason."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    cons = consumers(g)
    graph_outputs = {o.name for o in g.output}
    layers = []
    for idx, node in enumerate(g.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.output[0]
        w_name = node.input[1]
        weight = numpy_helper.to_array(inits[w_name]) if w_name in inits else None
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(inits[node.input[2]]) if node.input[2] in inits else None
        layer = ConvLayer(name=name, node_index=idx, input=node.input[0], output=node.output[0],
                          weight=weight, bias=bias, attrs=conv_attrs(node), group=int(_attr(node, "group", 1)))
        shape = value_types.get(node.output[0], (None, None))[1]
        if shape and all(isinstance(v, int) and v > 0 for v in shape[1:]):  # the batch may stay symbolic
            layer.out_shape = [1] + list(shape[1:])
        layer.skip_reason = _skip_reason(layer, node, inits)
        if layer.skip_reason is None and layer.out_shape is None:
            layer.skip_reason = "output shape unknown (give --input-shape NAME:DIMS for symbolic inputs)"
        _find_activation(layer, g, cons, graph_outputs, inits)
        layers.append(layer)
    return layers


def _skip_reason(layer: ConvLayer, node: onnx.NodeProto, inits) -> str | None:
    if layer.weight is None:
        return "weight is computed at run time, not a constant"
    if len(node.input) > 2 and node.input[2] and layer.bias is None:
        return "bias is computed at run time, not a constant"
    if layer.weight.ndim != 4:
        return f"{layer.weight.ndim - 2}-D convolution (only 2-D is supported)"
    if layer.weight.dtype != np.float32:
        return f"weights are {layer.weight.dtype}, only float32 is supported"
    if layer.group != 1:
        if layer.weight.shape[1] == 1 and layer.group == layer.weight.shape[0]:
            return "depthwise convolution (group == channels): nothing to factorise"
        return f"grouped convolution (group={layer.group})"
    return None


def _find_activation(layer: ConvLayer, g, cons, graph_outputs, inits) -> None:
    """Set the activation, its output (the target) and the residual shortcut, if any."""
    y = layer.output
    layer.target = y
    users = cons.get(y, [])
    if y in graph_outputs or not users:
        return
    # Conv -> Add/Sum(shortcut) -> activation: the shortcut acts as an offset inside the activation.
    if len(users) == 1 and users[0].op_type in ("Add", "Sum") and len(users[0].input) == 2:
        add = users[0]
        other = add.input[1] if add.input[0] == y else add.input[0]
        if other != y and other not in inits:
            layer.shortcut = other
            layer.target = add.output[0]
            if add.output[0] not in graph_outputs:
                _match_activation(layer, add.output[0], cons, inits)
        return
    _match_activation(layer, y, cons, inits)


def _hardswish_written_out(t: str, users, cons, inits) -> str | None:
    """``x * Clip(x + 3, 0, 6) / 6`` (Paddle exports): the output tensor if the pattern matches."""
    add = next((u for u in users if u.op_type == "Add"), None)
    mul = next((u for u in users if u.op_type == "Mul"), None)
    if add is None or mul is None:
        return None
    three = add.input[1] if add.input[0] == t else add.input[0]
    clip_users = cons.get(add.output[0], [])
    if _const_scalar(three, inits) != 3.0 or len(clip_users) != 1 or clip_users[0].op_type != "Clip":
        return None
    clip = clip_users[0]
    if len(clip.input) != 3 or _const_scalar(clip.input[1], inits) != 0.0 or _const_scalar(clip.input[2], inits) != 6.0:
        return None
    if set(mul.input) != {t, clip.output[0]} or len(cons.get(clip.output[0], [])) != 1:
        return None
    after = cons.get(mul.output[0], [])
    if len(after) != 1 or after[0].input[0] != mul.output[0]:
        return None
    scale = _const_scalar(after[0].input[1], inits)
    if (after[0].op_type == "Div" and scale == 6.0) or (after[0].op_type == "Mul" and scale is not None
                                                       and abs(scale - 1 / 6) < 1e-6):
        return after[0].output[0]
    return None


def _match_activation(layer: ConvLayer, t: str, cons, inits) -> None:
    users = cons.get(t, [])
    if len(users) == 2 and (out := _hardswish_written_out(t, users, cons, inits)):
        layer.activation, layer.target = "hardswish", out
        return
    if len(users) == 2:  # x * Sigmoid(x)  (SiLU / Swish)
        sig = next((u for u in users if u.op_type == "Sigmoid"), None)
        mul = next((u for u in users if u.op_type == "Mul"), None)
        if sig is not None and mul is not None and set(mul.input) == {t, sig.output[0]} \
                and len(cons.get(sig.output[0], [])) == 1:
            layer.activation, layer.target = "silu", mul.output[0]
        return
    if len(users) != 1:
        return
    act = users[0]
    op = act.op_type
    params: dict = {}
    if op in _SIMPLE_ACTIVATIONS:
        kind = _SIMPLE_ACTIVATIONS[op]
    elif op == "LeakyRelu":
        kind, params = "leaky_relu", {"alpha": float(_attr(act, "alpha", 0.01))}
    elif op == "HardSigmoid":
        kind, params = "hardsigmoid", {"alpha": float(_attr(act, "alpha", 0.2)), "beta": float(_attr(act, "beta", 0.5))}
    elif op == "Clip":
        lo, hi = _attr(act, "min"), _attr(act, "max")
        if len(act.input) > 1 or lo is None and hi is None:
            lo = _const_scalar(act.input[1], inits) if len(act.input) > 1 and act.input[1] else None
            hi = _const_scalar(act.input[2], inits) if len(act.input) > 2 and act.input[2] else None
            if (len(act.input) > 1 and act.input[1] and lo is None) or (len(act.input) > 2 and act.input[2] and hi is None):
                return  # bounds computed at run time
        kind, params = "clip", {"min": lo, "max": hi}
    elif op == "PRelu":
        if act.input[1] not in inits:
            return
        slope = numpy_helper.to_array(inits[act.input[1]]).astype(np.float64).reshape(-1)
        if slope.size not in (1, layer.out_channels):
            return
        kind, params = "prelu", {"slope": slope if slope.size > 1 else float(slope[0])}
    elif op == "Gelu" and _attr(act, "approximate", "none") in ("none", b"none"):
        kind = "gelu"
    else:
        return
    layer.activation, layer.activation_params, layer.target = kind, params, act.output[0]


def _const_scalar(name: str, inits) -> float | None:
    if name in inits:
        return float(numpy_helper.to_array(inits[name]).reshape(-1)[0])
    return None


def node_flops(model: onnx.ModelProto, value_types: dict) -> dict[str, int]:
    """FLOPs (2 x multiply-accumulates) per image of every Conv, Gemm and MatMul node, by node name.

    Other ops (pooling, activations, adds) are cheap next to these and not counted.
    """
    inits = {t.name: t for t in model.graph.initializer}

    def shape(name):
        if name in inits:
            return list(inits[name].dims)
        s = value_types.get(name, (None, None))[1]
        return s if s and all(isinstance(v, int) for v in s) else None

    flops: dict[str, int] = {}
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.op_type in ("Conv", "ConvTranspose"):
            w, o, x = shape(node.input[1]), shape(node.output[0]), shape(node.input[0])
            if w is None or o is None:
                continue
            if node.op_type == "Conv":
                flops[name] = 2 * int(np.prod(w)) * int(np.prod(o[2:]))
            elif x is not None:
                flops[name] = 2 * int(np.prod(w)) * int(np.prod(x[2:]))
        elif node.op_type == "Gemm":
            a, o = shape(node.input[0]), shape(node.output[0])
            if a is None or o is None:
                continue
            k = a[0] if _attr(node, "transA", 0) else a[1]
            flops[name] = 2 * (o[1] * k)  # per image: one row of the batch
        elif node.op_type == "MatMul":
            a, b = shape(node.input[0]), shape(node.input[1])
            if a is None or b is None or len(b) < 2 or len(a) < 1:
                continue
            rows = int(np.prod(a[1:-1])) if len(a) > 2 else 1
            flops[name] = 2 * rows * a[-1] * b[-1]
    return flops
