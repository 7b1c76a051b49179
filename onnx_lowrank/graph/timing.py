"""One layer alone as a small ONNX model, for timing it on onnxruntime (latency.py).

A spec holds everything about a layer that its run time depends on (weight values aside) and
names it by :meth:`key`; :meth:`model` writes the layer alone. Factorised versions are that model
with the layer rewritten by a scheme's stand-in chain (costs/latency.py): no code here knows a scheme.

Reorder overhead: a one-Conv model starts and ends in plain NCHW, so onnxruntime adds layout
reorders that the layer never pays inside the whole model. A Conv is therefore timed as
``MaxPool 1x1 -> Conv -> ReLU -> MaxPool 1x1``: the pools are blocked ops, so the layer (and every
stage of a factorised one) runs inside the blocked layout as in the real network, and the boundary
reorders and pools are the same in the original and every factorised model. A MatMul / Gemm has no
blocked layout: it is timed alone, with its bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .dense import find_dense_layers, is_dense
from .layers import ConvLayer, find_conv_layers
from .loading import infer_value_types

OPSET = 13


def _weight(rng, name: str, shape, inits: list) -> str:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    inits.append(onnx.numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in))
                                              .astype(np.float32), name))
    return name


def _model(nodes, x_shape, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


@dataclass(frozen=True)
class LayerSpec:
    """A Conv layer, as far as its run time is concerned."""

    c: int
    d: int
    kh: int
    kw: int
    h: int  # input height
    w: int  # input width
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    auto_pad: str = "NOTSET"

    def key(self) -> str:
        j = lambda v: "x".join(map(str, v))  # noqa: E731
        return (f"c{self.c}_d{self.d}_k{self.kh}x{self.kw}_in{self.h}x{self.w}_s{j(self.strides)}"
                f"_p{j(self.pads)}_dil{j(self.dilations)}" + ("" if self.auto_pad == "NOTSET" else f"_{self.auto_pad}"))

    @classmethod
    def from_attrs(cls, c: int, d: int, kernel, input_hw, attrs: dict) -> "LayerSpec":
        return cls(int(c), int(d), int(kernel[0]), int(kernel[1]), int(input_hw[0]), int(input_hw[1]),
                   tuple(int(v) for v in attrs.get("strides", (1, 1))),
                   tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0))),
                   tuple(int(v) for v in attrs.get("dilations", (1, 1))),
                   str(attrs.get("auto_pad", "NOTSET") or "NOTSET"))

    @property
    def input_shape(self) -> list[int]:
        return [1, self.c, self.h, self.w]

    def model(self, seed: int = 0) -> onnx.ModelProto:
        """``MaxPool 1x1 -> Conv -> ReLU -> MaxPool 1x1``, random weights."""
        rng, inits = np.random.default_rng(seed), []
        attrs = {"kernel_shape": [self.kh, self.kw], "strides": list(self.strides), "dilations": list(self.dilations)}
        if self.auto_pad != "NOTSET":
            attrs["auto_pad"] = self.auto_pad
        else:
            attrs["pads"] = list(self.pads)
        pool = {"kernel_shape": [1, 1]}
        w = _weight(rng, "w", (self.d, self.c, self.kh, self.kw), inits)
        nodes = [helper.make_node("MaxPool", ["x"], ["a"], name="pre", **pool),
                 helper.make_node("Conv", ["a", w], ["b"], name="conv", **attrs),
                 helper.make_node("Relu", ["b"], ["r"], name="relu"),
                 helper.make_node("MaxPool", ["r"], ["y"], name="post", **pool)]
        return _model(nodes, self.input_shape, inits)


@dataclass(frozen=True)
class DenseSpec:
    """A MatMul / Gemm layer: ``positions`` rows of ``c`` channels (batch 1) times a ``c x d`` matrix."""

    c: int
    d: int
    positions: tuple[int, ...]
    op: str = "MatMul"
    bias: bool = False

    def key(self) -> str:
        return (f"{self.op.lower()}_c{self.c}_d{self.d}_in{'x'.join(map(str, self.positions)) or '1'}"
                + ("_bias" if self.bias else ""))

    @property
    def input_shape(self) -> list[int]:
        return [1, *self.positions, self.c] if self.op == "MatMul" else [int(np.prod(self.positions or (1,))), self.c]

    def model(self, seed: int = 0) -> onnx.ModelProto:
        rng, inits = np.random.default_rng(seed), []
        w = _weight(rng, "w", (self.c, self.d), inits)
        b = _weight(rng, "b", (self.d,), inits) if self.bias else None
        if self.op == "Gemm":
            nodes = [helper.make_node("Gemm", ["x", w] + ([b] if b else []), ["y"], name="dense")]
        elif b:
            nodes = [helper.make_node("MatMul", ["x", w], ["m"], name="dense"),
                     helper.make_node("Add", ["m", b], ["y"], name="bias")]
        else:
            nodes = [helper.make_node("MatMul", ["x", w], ["y"], name="dense")]
        return _model(nodes, self.input_shape, inits)


def spec_of(layer: ConvLayer, value_types: dict) -> LayerSpec | DenseSpec:
    """The timing spec of a layer of a model (its input size from ``value_types``, else from its output)."""
    if is_dense(layer):
        return DenseSpec(layer.in_channels, layer.out_channels, tuple(int(v) for v in layer.out_shape[2:]),
                         layer.op, layer.bias is not None)
    shape = value_types.get(layer.input, (None, None))[1]
    if shape and len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:]):
        hw = shape[2:]
    else:  # input size from the output size: exact up to the stride's remainder, enough for timing
        s = layer.attrs.get("strides", [1, 1])
        dil = layer.attrs.get("dilations", [1, 1])
        pads = layer.attrs.get("pads", [0, 0, 0, 0])
        hw = [(layer.out_shape[2 + a] - 1) * s[a] + dil[a] * (layer.kernel[a] - 1) + 1 - pads[a] - pads[a + 2]
              for a in range(2)]
    return LayerSpec.from_attrs(layer.in_channels, layer.out_channels, layer.kernel, hw, layer.attrs)


def layer_of(model: onnx.ModelProto) -> ConvLayer:
    """The one layer of a :meth:`LayerSpec.model` / :meth:`DenseSpec.model`, as the graph code reads it."""
    vt = infer_value_types(model)
    (layer,) = find_conv_layers(model, vt) + find_dense_layers(model, vt)
    return layer
