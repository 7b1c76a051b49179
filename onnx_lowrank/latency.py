"""Measured cost model: what each Conv layer costs on onnxruntime, unchanged and factorised.

FLOPs are a poor guide to latency on onnxruntime's CPU provider: its NCHWc kernels need channel
counts in multiples of the block size, small 1 x 1 convolutions are memory-bound, and a layer
that leaves the blocked layout pays for reorders. So each candidate layer is timed as a small
ONNX model, unchanged and factorised at a handful of candidate ranks, at batch 1, with the
user's thread count and the layer's real input size.

Reorder overhead: a one-layer model starts and ends in plain NCHW, so onnxruntime adds layout
reorders that the layer never pays inside the whole model. Each timed model is therefore
``MaxPool 1x1 -> layer -> ReLU -> MaxPool 1x1``: the pools are blocked ops, so the layer (and both
stages of a factorised one) run inside the blocked layout as in the real network, and the
boundary reorders and pools are the same in the original and every factorised model. Only
differences ``original - factorised`` are ever used (rank selection compares savings; the
whole-model prediction is ``measured original - sum of savings``), so that common part cancels.
What does not cancel (a layer saves a little more or less inside the whole network: caches,
fusions with neighbours, threads) is corrected by the pipeline, which times the whole model
factorised at the chosen ranks with stand-in weights (:func:`compare_models`) and rescales.

The timings are kept in a latency table and a cache (costs/table.py); the rank search that
uses them is costs/latency.py.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .solver.spatial import split_conv_attributes

__all__ = ["LayerSpec", "time_layer", "measure_model", "compare_models", "timed_ranks"]
#: At most this many factorised ranks are timed per layer; the others are interpolated.
MAX_TIMED_RANKS = 8


@dataclass(frozen=True)
class LayerSpec:
    """Everything about a Conv layer that its run time depends on (weights values aside)."""

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
    #: The factorised chain timed: "channel" (k x k, 1 x 1) or "3d" (k x 1, 1 x k, 1 x 1; explicit pads only).
    scheme: str = "channel"

    def key(self) -> str:
        j = lambda v: "x".join(map(str, v))  # noqa: E731
        return (f"c{self.c}_d{self.d}_k{self.kh}x{self.kw}_in{self.h}x{self.w}_s{j(self.strides)}"
                f"_p{j(self.pads)}_dil{j(self.dilations)}" + ("" if self.auto_pad == "NOTSET" else f"_{self.auto_pad}")
                + ("" if self.scheme == "channel" else f"_{self.scheme}"))

    @classmethod
    def from_attrs(cls, c: int, d: int, kernel, input_hw, attrs: dict, scheme: str = "channel") -> "LayerSpec":
        return cls(int(c), int(d), int(kernel[0]), int(kernel[1]), int(input_hw[0]), int(input_hw[1]),
                   tuple(int(v) for v in attrs.get("strides", (1, 1))),
                   tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0))),
                   tuple(int(v) for v in attrs.get("dilations", (1, 1))),
                   str(attrs.get("auto_pad", "NOTSET") or "NOTSET"), scheme)


def _conv(name, x, y, w_name, attrs):
    return helper.make_node("Conv", [x, w_name], [y], name=name, **attrs)


def layer_model(spec: LayerSpec, rank: int | None, seed: int = 0) -> onnx.ModelProto:
    """``MaxPool 1x1 -> Conv (or its factorised chain at rank) -> ReLU -> MaxPool 1x1``, random weights."""
    rng = np.random.default_rng(seed)
    attrs = {"kernel_shape": [spec.kh, spec.kw], "strides": list(spec.strides), "dilations": list(spec.dilations)}
    if spec.auto_pad != "NOTSET":
        attrs["auto_pad"] = spec.auto_pad
    else:
        attrs["pads"] = list(spec.pads)
    pool = {"kernel_shape": [1, 1]}
    nodes = [helper.make_node("MaxPool", ["x"], ["a"], name="pre", **pool)]
    inits = []

    def weight(name, shape):
        fan_in = int(np.prod(shape[1:]))
        w = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, name))
        return name

    if rank is None:
        nodes.append(_conv("conv", "a", "b", weight("w", (spec.d, spec.c, spec.kh, spec.kw)), attrs))
    elif spec.scheme == "3d":
        vertical, horizontal = split_conv_attributes(spec.strides, spec.pads, spec.dilations)
        r2 = min(rank, spec.c * spec.kh, spec.d * spec.kw)
        nodes.append(_conv("conv0", "a", "v", weight("w0", (r2, spec.c, spec.kh, 1)),
                           {"kernel_shape": [spec.kh, 1], **vertical}))
        nodes.append(_conv("conv1", "v", "m", weight("w1", (rank, r2, 1, spec.kw)),
                           {"kernel_shape": [1, spec.kw], **horizontal}))
        nodes.append(_conv("conv2", "m", "b", weight("w2", (spec.d, rank, 1, 1)), {"kernel_shape": [1, 1]}))
    else:
        nodes.append(_conv("conv0", "a", "m", weight("w0", (rank, spec.c, spec.kh, spec.kw)), attrs))
        nodes.append(_conv("conv1", "m", "b", weight("w1", (spec.d, rank, 1, 1)), {"kernel_shape": [1, 1]}))
    nodes.append(helper.make_node("Relu", ["b"], ["r"], name="relu"))
    nodes.append(helper.make_node("MaxPool", ["r"], ["y"], name="post", **pool))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [1, spec.c, spec.h, spec.w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _session(model: onnx.ModelProto, threads: int | None) -> ort.InferenceSession:
    from .measure import _session as bench_session

    return bench_session(model, threads)


def _interleaved(sessions: list, feeds: list[dict], seconds: float, min_rounds: int = 3,
                 max_rounds: int = 50) -> list[float]:
    """Fastest ms of each session, runs interleaved (order rotated per round) for about ``seconds``.

    The minimum, not the median: on a shared machine the noise only ever adds time, in spikes that
    a median of a handful of rounds does not reject, and one spike in a layer's original time
    would inflate every saving computed from it. The whole model is timed the same way, so the
    prediction compares like with like.
    """
    for s, f in zip(sessions, feeds):
        s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    n = len(sessions)
    t_end = time.perf_counter() + seconds
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() < t_end):
        for k in range(n):
            i = (rounds + k) % n
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
    return [float(min(t)) for t in times]


def timed_ranks(candidates: list[int], limit: int = MAX_TIMED_RANKS) -> list[int]:
    """At most ``limit`` of the candidates, evenly spread, always the smallest and largest."""
    if len(candidates) <= limit:
        return list(candidates)
    idx = np.unique(np.round(np.linspace(0, len(candidates) - 1, limit)).astype(int))
    return [candidates[i] for i in idx]


def time_layer(spec: LayerSpec, ranks: list[int], threads: int | None = None, seconds: float = 1.0) -> dict:
    """``{"original_ms": t, "ranks_ms": {"r": t, ...}}``: fastest of interleaved runs, batch 1."""
    models = [layer_model(spec, None)] + [layer_model(spec, r) for r in ranks]
    sessions = [_session(m, threads) for m in models]
    x = np.random.default_rng(0).random((1, spec.c, spec.h, spec.w), dtype=np.float32)
    ms = _interleaved(sessions, [{"x": x}] * len(sessions), seconds)
    return {"original_ms": ms[0], "ranks_ms": {str(r): t for r, t in zip(ranks, ms[1:])}}


def measure_model(model: onnx.ModelProto, feed: dict, threads: int | None, seconds: float = 2.0) -> float:
    """Fastest ms of the whole model at batch 1 (see :func:`_interleaved`)."""
    return _interleaved([_session(model, threads)], [feed], seconds, min_rounds=5)[0]


def compare_models(original: onnx.ModelProto, candidate: onnx.ModelProto, feed: dict, threads: int | None,
                   seconds: float = 3.0) -> float:
    """Speed-up of ``candidate`` over ``original``: ratio of medians of interleaved runs (as ``bench``)."""
    sessions = [_session(original, threads), _session(candidate, threads)]
    for s in sessions:
        s.run(None, feed)
    times: list[list[float]] = [[], []]
    t_end = time.perf_counter() + seconds
    rounds = 0
    while rounds < 5 or (rounds < 200 and time.perf_counter() < t_end):
        for k in range(2):
            i = (rounds + k) % 2
            t0 = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append(time.perf_counter() - t0)
        rounds += 1
    return float(statistics.median(times[0]) / statistics.median(times[1]))
