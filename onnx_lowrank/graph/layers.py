"""Finding the Conv layers to compress and what follows them.

The nonlinear solver needs to know the activation that follows each Conv (its target is taken
after it) and, for residual blocks, the shortcut tensor added before that activation. This
module reads those patterns off a normalised graph. Exporters write the same activation in many
node orders (GELU as ``x * 0.5 * (1 + Erf(x / sqrt 2))`` with Div or Mul, operands swapped, ...), so
multi-node forms are recognised by evaluating the small elementwise subgraph on a grid of values and
comparing it with the solver's own activation functions, not by listing node orders.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import onnx
from scipy.special import erf, expit

from ..solver.activations import REGISTRY, RUNTIME, Activation, OpNode
from .external import tensor_array
from .subgraph import consumers


def _by_op() -> dict:
    """The activation kinds the solver knows, by the ONNX op type that is each (read from the registry
    at each call, so a kind registered later is found too)."""
    return {op: cls for cls in REGISTRY.values() for op in cls.op_types}


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
    in_shape: list[int] | None = None      # [N, c, H, W] for batch 1, when shape inference knows it
    activation: str = "identity"
    activation_params: dict = field(default_factory=dict)
    target: str | None = None              # tensor the reconstruction aims at (after the activation)
    shortcut: str | None = None            # residual tensor added before the activation
    skip_reason: str | None = None
    activation_unknown: str | None = None  # an elementwise nonlinearity the solver does not know
    head: bool = False                     # writes the model's outputs (graph/heads.py): automatic ranks keep it

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
    def response_rank(self) -> int | None:
        """The rank of the layer's centred responses at most: its inputs per output position (``y = W x + beta``,
        x of c k_h k_w values); None where the weights are not known."""
        return self.in_channels * int(np.prod(self.kernel)) if self.weight is not None else None

    @property
    def positions(self) -> int:
        return int(np.prod(self.out_shape[2:])) if self.out_shape else 0

    @property
    def target_description(self) -> str:
        if self.activation_unknown:
            where = "residual add" if self.shortcut is not None else "conv output"
            return f"{where} (unknown activation {self.activation_unknown})"
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


def graph_maps(g: onnx.GraphProto) -> tuple[dict, dict, set, dict]:
    """What layer discovery looks things up in: initializers by name, readers of each tensor, the graph
    outputs and each node's position (by id)."""
    return ({t.name: t for t in g.initializer}, consumers(g), {o.name for o in g.output},
            {id(n): i for i, n in enumerate(g.node)})


def find_conv_layers(model: onnx.ModelProto, value_types: dict) -> list[ConvLayer]:
    """Every Conv of a normalised model, with its activation / residual pattern and skip reason."""
    g = model.graph
    inits, cons, graph_outputs, order = graph_maps(g)
    layers = []
    for idx, node in enumerate(g.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.output[0]
        w_name = node.input[1]
        weight = tensor_array(inits[w_name]) if w_name in inits else None
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = tensor_array(inits[node.input[2]]) if node.input[2] in inits else None
        layer = ConvLayer(name=name, node_index=idx, input=node.input[0], output=node.output[0],
                          weight=weight, bias=bias, attrs=conv_attrs(node), group=int(_attr(node, "group", 1)))
        shape = value_types.get(node.output[0], (None, None))[1]
        if shape and all(isinstance(v, int) and v > 0 for v in shape[1:]):  # the batch may stay symbolic
            layer.out_shape = [1] + list(shape[1:])
        shape = value_types.get(node.input[0], (None, None))[1]
        if shape and len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[1:]):
            layer.in_shape = [1] + list(shape[1:])
        layer.skip_reason = _skip_reason(layer, node, inits)
        if layer.skip_reason is None and layer.out_shape is None:
            layer.skip_reason = "output shape unknown (give --input-shape NAME:DIMS for symbolic inputs)"
        _find_activation(layer, g, cons, graph_outputs, inits, order)
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


def _find_activation(layer: ConvLayer, g, cons, graph_outputs, inits, order) -> None:
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
                _match_activation(layer, add.output[0], cons, inits, graph_outputs, order)
        return
    _match_activation(layer, y, cons, inits, graph_outputs, order)


def _match_activation(layer: ConvLayer, t: str, cons, inits, graph_outputs, order) -> None:
    users = cons.get(t, [])
    if len(users) == 1 and _match_single_op(layer, users[0], inits):
        return
    first_unknown = None
    for out, nodes in _elementwise_regions(t, cons, inits, graph_outputs, order):
        f = _evaluate(nodes, t, inits)
        if f is None:
            continue
        match = next((act for act in _written_out() if _close(f, act.apply(_GRID))), None)
        if match is not None:
            layer.activation, layer.activation_params, layer.target = match.kind, dict(match.params), out
            return
        if first_unknown is None and not _is_affine(f):
            first_unknown = _describe(nodes)
    layer.activation_unknown = first_unknown


def _match_single_op(layer: ConvLayer, act: onnx.NodeProto, inits) -> bool:
    """One ONNX op that is an activation the solver knows (the registry reads its parameters)."""
    cls = _by_op().get(act.op_type)
    if cls is None or act.domain not in ("", "ai.onnx"):
        return False
    params = cls.from_op(_op_node(act, inits), layer.out_channels)
    if params is None:
        return False
    layer.activation, layer.activation_params, layer.target = cls.name, params, act.output[0]
    return True


def _op_node(node: onnx.NodeProto, inits) -> OpNode:
    """The node as the activation registry reads it (attributes decoded, constant inputs as arrays)."""
    attrs = {a.name: _text(v) if isinstance(v := onnx.helper.get_attribute_value(a), bytes) else v
             for a in node.attribute}
    inputs = tuple(None if not name else tensor_array(inits[name]) if name in inits else RUNTIME
                   for name in node.input)
    return OpNode(node.op_type, attrs, inputs)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _written_out() -> list[Activation]:
    """What written-out activations are compared with on _GRID (the solver's own definitions)."""
    return [Activation(name, p) for name, cls in REGISTRY.items() for p in cls.written_out]


_GRID = np.concatenate([np.linspace(-8.0, 8.0, 641), [-30.0, -12.0, 12.0, 30.0]])
_MAX_REGION = 16


def _close(f: np.ndarray, ref: np.ndarray) -> bool:
    """Equal up to float32 rounding of the exporter's constants (erf vs tanh GELU differ by ~1e-3)."""
    return bool(np.all(np.abs(f - ref) <= 1e-5 * (1.0 + np.abs(ref))))


def _is_affine(f: np.ndarray) -> bool:
    d2 = np.diff(f[:641], 2)
    return bool(np.all(np.abs(d2) <= 1e-9 * (1.0 + np.abs(f[:641]).max())))


def _describe(nodes: list[onnx.NodeProto]) -> str:
    return nodes[0].op_type if len(nodes) == 1 else "(" + " -> ".join(n.op_type for n in nodes) + ")"


def _elementwise_regions(t: str, cons, inits, graph_outputs, order):
    """Yield ``(exit, nodes)`` for each growing set of elementwise nodes computed from ``t`` alone
    (other operands: scalar constants) at which only ``exit`` is read outside the set."""
    avail, nodes, seen = {t}, [], set()
    heap = [(order[id(n)], id(n), n) for n in cons.get(t, [])]
    heapq.heapify(heap)
    while heap and len(nodes) < _MAX_REGION:
        _, nid, n = heapq.heappop(heap)
        if nid in seen:
            continue
        seen.add(nid)
        if (n.op_type not in _EVAL or n.domain not in ("", "ai.onnx") or len(n.output) != 1
                or not all(i in avail or _scalar_const(i, inits) for i in n.input if i)):
            continue  # read from outside: graph order guarantees no later node makes it computable
        nodes.append(n)
        out = n.output[0]
        avail.add(out)
        for u in cons.get(out, []):
            heapq.heappush(heap, (order[id(u)], id(u), u))
        inside = {id(m) for m in nodes}
        if all(v not in graph_outputs and all(id(u) in inside for u in cons.get(v, []))
               for v in avail if v != out):
            yield out, list(nodes)


def _scalar_const(name: str, inits) -> bool:
    return name in inits and int(np.prod(inits[name].dims)) == 1


def _evaluate(nodes: list[onnx.NodeProto], t: str, inits) -> np.ndarray | None:
    """The region's function of ``t`` on _GRID (float64), or None if it is not finite there."""
    env = {t: _GRID}

    def val(name):
        return env[name] if name in env else float(tensor_array(inits[name]).reshape(-1)[0])

    with np.errstate(all="ignore"):
        for n in nodes:
            args = [val(i) if i else None for i in n.input]
            env[n.output[0]] = np.broadcast_to(_EVAL[n.op_type](n, *args), _GRID.shape).astype(np.float64)
        f = env[nodes[-1].output[0]]
    return f if np.all(np.isfinite(f)) else None


def _clip(n, x, lo=None, hi=None):
    lo = _attr(n, "min") if lo is None and len(n.input) < 2 else lo
    hi = _attr(n, "max") if hi is None and len(n.input) < 3 else hi
    return np.clip(x, -np.inf if lo is None else lo, np.inf if hi is None else hi)


def _registered(n, x):
    """An op the activation registry knows, evaluated with the solver's own definition (NaN where the
    registry cannot use the node: then the region is not recognised)."""
    cls = _by_op()[n.op_type]
    params = cls.from_op(_op_node(n, {}), 1)
    return np.full_like(x, np.nan) if params is None else Activation(cls.name, params).apply(x)


_EVAL = {
    "Add": lambda n, a, b: a + b, "Sub": lambda n, a, b: a - b, "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: a / b, "Pow": lambda n, a, b: np.power(a, b),
    "Max": lambda n, *a: np.maximum.reduce(np.broadcast_arrays(*a)),
    "Min": lambda n, *a: np.minimum.reduce(np.broadcast_arrays(*a)),
    "Sum": lambda n, *a: np.add.reduce(np.broadcast_arrays(*a)),
    "Neg": lambda n, x: -x, "Abs": lambda n, x: np.abs(x), "Exp": lambda n, x: np.exp(x),
    "Log": lambda n, x: np.log(x), "Sqrt": lambda n, x: np.sqrt(x), "Reciprocal": lambda n, x: 1.0 / x,
    "Erf": lambda n, x: erf(x), "Tanh": lambda n, x: np.tanh(x), "Sigmoid": lambda n, x: expit(x),
    "Relu": lambda n, x: np.maximum(x, 0.0), "Softplus": lambda n, x: np.logaddexp(0.0, x),
    "Softsign": lambda n, x: x / (1.0 + np.abs(x)),
    "Elu": lambda n, x: np.where(x > 0, x, _attr(n, "alpha", 1.0) * np.expm1(x)),
    "Celu": lambda n, x: np.maximum(x, 0) + np.minimum(0, _attr(n, "alpha", 1.0) * np.expm1(x / _attr(n, "alpha", 1.0))),
    "Selu": lambda n, x: _attr(n, "gamma", 1.0507009873554805) * np.where(
        x > 0, x, _attr(n, "alpha", 1.6732632423543772) * np.expm1(x)),
    "Mish": lambda n, x: x * np.tanh(np.logaddexp(0.0, x)),
    "LeakyRelu": lambda n, x: np.where(x >= 0, x, _attr(n, "alpha", 0.01) * x),
    "ThresholdedRelu": lambda n, x: np.where(x > _attr(n, "alpha", 1.0), x, 0.0),
    "HardSigmoid": lambda n, x: np.clip(_attr(n, "alpha", 0.2) * x + _attr(n, "beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda n, x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Clip": _clip, "Gelu": _registered,
}


# Ops that only move or reshape data, or compute shapes: no arithmetic.
_NO_FLOPS = {"Reshape", "Transpose", "Concat", "Identity", "Shape", "Size", "Squeeze", "Unsqueeze", "Flatten",
             "Gather", "GatherElements", "GatherND", "Slice", "Split", "Cast", "CastLike", "Constant",
             "ConstantOfShape", "Expand", "Tile", "Pad", "Range", "Dropout", "DepthToSpace", "SpaceToDepth",
             "NonZero", "If", "Loop", "Scan"}
# Ops that read every input element once: reductions, softmax, global pooling.
_PER_INPUT = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Softmax", "LogSoftmax", "ArgMax", "ArgMin",
              "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "TopK"}
_POOLS = {"MaxPool", "AveragePool", "LpPool"}


def node_flops(model: onnx.ModelProto, value_types: dict) -> dict[str, int]:
    """FLOPs per image of every node, by node name, all counted the same way.

    Conv / ConvTranspose / Gemm / MatMul: 2 x multiply-accumulates. Pooling: output elements x
    kernel size. Reductions and Softmax: input elements. Shape-only ops: 0. Every other op (the
    elementwise ones, Resize, normalisations): output elements. The first axis is the batch and is
    left out, so a symbolic batch does not drop a node. A node whose shapes are unknown is left out
    (the pipeline measures such shapes first).
    """
    inits = {t.name: t for t in model.graph.initializer}

    def shape(name):
        if name in inits:
            return list(inits[name].dims)
        s = value_types.get(name, (None, None))[1]
        return s if s is not None and all(isinstance(v, int) for v in s[1:]) else None

    def per_image(name):
        s = shape(name)
        if s is None or (len(s) == 1 and not isinstance(s[0], int)):
            return None
        return int(np.prod(s[1:])) if len(s) > 1 else int(np.prod(s))

    flops: dict[str, int] = {}
    for node in model.graph.node:
        name = node.name or node.output[0]
        op = node.op_type
        n = None
        if op in _NO_FLOPS:
            n = 0
        elif op in ("Conv", "ConvTranspose"):
            w, o, x = shape(node.input[1]), shape(node.output[0]), shape(node.input[0])
            if w is not None and o is not None and op == "Conv":
                n = 2 * int(np.prod(w)) * int(np.prod(o[2:]))
            elif w is not None and x is not None and op == "ConvTranspose":
                n = 2 * int(np.prod(w)) * int(np.prod(x[2:]))
        elif op == "Gemm":
            a, o = shape(node.input[0]), shape(node.output[0])
            if a is not None and o is not None:
                k = a[0] if _attr(node, "transA", 0) else a[1]
                n = 2 * (o[1] * k)  # per image: one row of the batch
        elif op == "MatMul":
            a, b = shape(node.input[0]), shape(node.input[1])
            if a is not None and b is not None and len(b) >= 2 and len(a) >= 1:
                rows = int(np.prod(a[1:-1])) if len(a) > 2 else 1
                n = 2 * rows * a[-1] * b[-1]
        elif op in _PER_INPUT:
            n = per_image(node.input[0])
        elif op in _POOLS:
            out = per_image(node.output[0])
            n = None if out is None else out * int(np.prod(_attr(node, "kernel_shape", [1])))
        elif node.output and node.output[0]:
            n = per_image(node.output[0])
        if n is not None:
            flops[name] = n
    return flops
