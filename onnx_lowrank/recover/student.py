"""The student: the factorised ONNX model as a torch module, and its trained weights written back.

onnx2torch builds the module; each trainable ONNX initializer is *bound* to the torch tensor that
holds it, with the transform between the two (Gemm keeps ``alpha * B^T`` in an ``nn.Linear``). A
small registry of binders, one per way onnx2torch stores a weight, turns the bindings back into
initializer values, so the written graph keeps its nodes and ranks and only its numbers change.
"""

from __future__ import annotations

import copy
import re
import sys
import types
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import LowRankError

#: Node names the rewrite gives the stages of a factorised layer (graph/rewrite.py, graph/dense.py).
FACTORISED_NODE = re.compile(r"_lowrank\d+(_\d+)?(_bias)?$")
#: Ops whose constant inputs are weights; other float constants (Resize scales, Clip bounds) never train.
WEIGHT_OPS = {"Conv", "Gemm", "MatMul", "Add"}
STUDENT_SUFFIX = "__recover_out"


def _import_onnx2torch():
    """onnx2torch imports torchvision only for its NMS / RoiAlign converters. torchvision's PyPI wheels
    are CUDA builds that fail to load beside the CPU torch wheel, so when it cannot load, a stand-in
    that fails on use lets every other converter work."""
    try:
        import onnx2torch
        return onnx2torch
    except (ImportError, RuntimeError, OSError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for name in [m for m in sys.modules if m == "onnx2torch" or m.startswith("onnx2torch.")]:
            del sys.modules[name]
        stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

        def missing(*_a, **_k):
            raise LowRankError("this model needs torchvision ops (NMS / RoiAlign) that could not be loaded")

        ops.nms = ops.roi_align = ops.box_convert = ops.batched_nms = missing
        stub.ops = ops
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
        import onnx2torch
        return onnx2torch


@dataclass
class Binding:
    """Where one ONNX initializer lives in the student, and how to get it back."""

    initializer: str
    tensor: torch.Tensor          # the nn.Parameter trained
    binder: "Binder"
    module: nn.Module | None = None


class Binder:
    """One way onnx2torch stores a weight; ``to_onnx`` inverts it."""

    def to_onnx(self, binding: Binding) -> np.ndarray:
        return binding.tensor.detach().cpu().numpy()


class Identity(Binder):
    """Conv weights and biases, and initializers kept as buffers (MatMul, Add): stored as they are."""


class LinearWeight(Binder):
    """Gemm into nn.Linear: weight = alpha * (B if transB else B^T)."""

    def __init__(self, alpha: float, trans_b: bool):
        self.alpha, self.trans_b = alpha, trans_b

    def to_onnx(self, binding):
        w = super().to_onnx(binding) / np.float32(self.alpha)
        return w if self.trans_b else w.T


class LinearBias(Binder):
    """Gemm into nn.Linear: bias = beta * C."""

    def __init__(self, beta: float):
        self.beta = beta

    def to_onnx(self, binding):
        return super().to_onnx(binding) / np.float32(self.beta)


def trainable_initializers(model: onnx.ModelProto, which: str) -> list[str]:
    """Float initializers that are weights of the factorised stages (``which="factorised"``) or of any
    Conv / Gemm / MatMul / bias Add (``"all"``), in graph order."""
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        if which == "factorised" and not FACTORISED_NODE.search(node.name):
            continue
        if which == "all" and node.op_type == "Add" and not FACTORISED_NODE.search(node.name):
            continue   # a plain Add's constant may be anything (a positional table, an offset): left alone
        names += [i for i in node.input[1:] if i in floats and i not in names]
    return names


class Student:
    """The factorised model in torch, with its trainable initializers as parameters.

    ``outputs`` are the tensors the loss compares; each is routed through an Identity so the module
    returns exactly them, in order, even when a node has several outputs.
    """

    def __init__(self, model: onnx.ModelProto, outputs: list[str], which: str = "factorised"):
        o2t = _import_onnx2torch()
        self.model = model
        self.outputs = outputs
        probe = copy.deepcopy(model)
        del probe.graph.output[:]
        for name in outputs:
            probe.graph.node.append(onnx.helper.make_node("Identity", [name], [name + STUDENT_SUFFIX]))
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name + STUDENT_SUFFIX))
        try:
            self.module = o2t.convert(probe, attach_onnx_mapping=True)
        except Exception as err:   # onnx2torch raises NotImplementedError, KeyError, ... for what it lacks
            raise LowRankError(f"onnx2torch cannot convert the factorised model: {type(err).__name__}: "
                               f"{' '.join(str(err).split())[:200]}") from None
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        names = trainable_initializers(model, which)
        self.bindings = self._bind(set(names))
        unbound = [n for n in names if n not in self.bindings]
        if unbound:
            raise LowRankError(f"cannot find the weights {', '.join(unbound[:3])} in the converted model: "
                               "recovery does not support how onnx2torch converts their nodes")

    def _bind(self, wanted: set[str]) -> dict[str, Binding]:
        nodes = {n.output[0]: n for n in self.model.graph.node if n.output}
        bindings: dict[str, Binding] = {}
        for fx_node in self.module.graph.nodes:
            if fx_node.op != "call_module":
                continue
            mod = self.module.get_submodule(fx_node.target)
            mapping = getattr(mod, "onnx_mapping", None)
            node = nodes.get(mapping.outputs[0]) if mapping and mapping.outputs else None
            if node is None:
                continue
            for binding in _module_bindings(node, mod, wanted):
                bindings.setdefault(binding.initializer, binding)
            args = list(fx_node.args) + list(fx_node.kwargs.values())
            names = [n for n in mapping.inputs if n]
            for name, arg in zip(names, args):
                if name in wanted and name not in bindings and getattr(arg, "op", None) == "get_attr":
                    container, buf = self.module.get_submodule(arg.target.rsplit(".", 1)[0]), arg.target.rsplit(".", 1)[1]
                    param = nn.Parameter(container._buffers.pop(buf).clone(), requires_grad=False)
                    container.register_parameter(buf, param)
                    bindings[name] = Binding(name, param, Identity())
        for b in bindings.values():
            b.tensor.requires_grad_(True)
        return bindings

    def parameters(self) -> list[nn.Parameter]:
        return [b.tensor for b in self.bindings.values()]

    def __call__(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = self.module(*[feed[i.name] for i in _real_inputs(self.model)])
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def state(self) -> dict[str, torch.Tensor]:
        return {k: b.tensor.detach().clone() for k, b in self.bindings.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, b in self.bindings.items():
                b.tensor.copy_(state[k])

    def written(self) -> onnx.ModelProto:
        """A copy of the factorised model with the student's values in its initializers, nothing else changed."""
        out = copy.deepcopy(self.model)
        for init in out.graph.initializer:
            b = self.bindings.get(init.name)
            if b is not None:
                value = np.ascontiguousarray(b.binder.to_onnx(b).astype(np.float32).reshape(tuple(init.dims)))
                init.CopyFrom(numpy_helper.from_array(value, init.name))
        return out


def _module_bindings(node: onnx.NodeProto, mod: nn.Module, wanted: set[str]) -> list[Binding]:
    """Bindings for the weights onnx2torch copied into the module of ``node`` (Conv, Gemm as Linear)."""
    if isinstance(mod, nn.Sequential):   # a Conv with asymmetric padding: pad, then the conv
        mod = mod[-1]
    inputs = list(node.input)
    found = []
    if node.op_type == "Conv" and isinstance(mod, nn.modules.conv._ConvNd):
        pairs = [(1, mod.weight, Identity()), (2, mod.bias, Identity())]
    elif node.op_type == "Gemm" and isinstance(mod, nn.Linear):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        pairs = [(1, mod.weight, LinearWeight(attrs.get("alpha", 1.0), bool(attrs.get("transB", 0)))),
                 (2, mod.bias, LinearBias(attrs.get("beta", 1.0)))]
    else:
        return found
    for idx, tensor, binder in pairs:
        if idx < len(inputs) and inputs[idx] in wanted and tensor is not None:
            found.append(Binding(inputs[idx], tensor, binder, mod))
    return found


def _real_inputs(model: onnx.ModelProto):
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]
