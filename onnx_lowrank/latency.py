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
All timing goes through :mod:`onnx_lowrank.runtime` (sessions set up as deployed, interleaved rounds).

Results are cached as JSON under ``$ONNX_LOWRANK_CACHE`` or ``$XDG_CACHE_HOME/onnx-lowrank``
(``~/.cache/onnx-lowrank``), keyed by layer shape, threads, onnxruntime version and CPU. A
latency table file holds exactly the entries one compression used: given back, it makes the
choice of ranks (and so the output file) reproducible byte for byte, on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from . import progress
from .errors import LowRankError
from .files import atomic_path
from .graph.external import identity_bytes
from .runtime import time_models
from .solver.spatial import split_conv_attributes

__all__ = ["LayerSpec", "LatencyTable", "environment", "cache_dir", "time_layer", "interpolate",
           "measure_model", "TABLE_FORMAT"]

TABLE_FORMAT = "onnx-lowrank latency table 1"
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(threads: int | None) -> str:
    """What the timings depend on besides the layer: threads, onnxruntime, CPU (model, cores, arch)."""
    t = "default" if threads is None else str(int(threads))
    return f"threads={t}; onnxruntime={ort.__version__}; cpu={_cpu_model()} x{os.cpu_count()}; {platform.machine()}"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override)
    if os.environ.get("ONNX_LOWRANK_CACHE"):
        return Path(os.environ["ONNX_LOWRANK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnx-lowrank"


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


def _fastest(models: list[onnx.ModelProto], feeds: list[dict], threads: int | None, seconds: float,
             min_rounds: int) -> list[float]:
    """Fastest ms of each model, runs interleaved for about ``seconds`` (runtime.timing).

    The minimum, not the median: on a shared machine the noise only ever adds time, in spikes that
    a median of a handful of rounds does not reject, and one spike in a layer's original time
    would inflate every saving computed from it. The whole model is timed the same way, so the
    prediction compares like with like.
    """
    rounds = time_models(models, feeds, threads, min_rounds=min_rounds, max_rounds=50, seconds=seconds,
                         tolerance=None)
    return [rounds.fastest(i) for i in range(len(models))]


def timed_ranks(candidates: list[int], limit: int = MAX_TIMED_RANKS) -> list[int]:
    """At most ``limit`` of the candidates, evenly spread, always the smallest and largest."""
    if len(candidates) <= limit:
        return list(candidates)
    idx = np.unique(np.round(np.linspace(0, len(candidates) - 1, limit)).astype(int))
    return [candidates[i] for i in idx]


def time_layer(spec: LayerSpec, ranks: list[int], threads: int | None = None, seconds: float = 1.0) -> dict:
    """``{"original_ms": t, "ranks_ms": {"r": t, ...}}``: fastest of interleaved runs, batch 1."""
    models = [layer_model(spec, None)] + [layer_model(spec, r) for r in ranks]
    x = np.random.default_rng(0).random((1, spec.c, spec.h, spec.w), dtype=np.float32)
    ms = _fastest(models, [{"x": x}] * len(models), threads, seconds, min_rounds=3)
    return {"original_ms": ms[0], "ranks_ms": {str(r): t for r, t in zip(ranks, ms[1:])}}


def measure_model(model: onnx.ModelProto, feed: dict, threads: int | None, seconds: float = 2.0) -> float:
    """Fastest ms of the whole model at batch 1 (see :func:`_fastest`)."""
    return _fastest([model], [feed], threads, seconds, min_rounds=5)[0]


def compare_models(original: onnx.ModelProto, candidate: onnx.ModelProto, feed: dict, threads: int | None,
                   seconds: float = 3.0) -> float:
    """Speed-up of ``candidate`` over ``original``: median of per-round ratios, rounds interleaved for at
    least ``seconds`` and until that median is stable (runtime.timing; as ``bench``), at most ``10 * seconds``."""
    return time_models([original, candidate], feed, threads, min_seconds=seconds, seconds=10 * seconds).speedup(1).median


def model_key(model: onnx.ModelProto, feed: dict) -> str:
    h = hashlib.sha256(identity_bytes(model))
    for name in sorted(feed):
        h.update(f"{name}:{list(np.shape(feed[name]))}".encode())
    return "model_" + h.hexdigest()[:20]


def interpolate(entry: dict, ranks: list[int]) -> dict[int, float]:
    """Times at ``ranks`` from the timed ones: linear between timed ranks, ``None`` outside them."""
    timed = sorted((int(r), float(t)) for r, t in entry["ranks_ms"].items())
    xs = [r for r, _ in timed]
    ys = [t for _, t in timed]
    out = {}
    for r in ranks:
        if xs and xs[0] <= r <= xs[-1]:
            out[r] = float(np.interp(r, xs, ys))
    return out


class LatencyTable:
    """Layer timings for one environment: ``{"format", "environment", "entries": {key: entry}}``.

    Entry keys are :meth:`LayerSpec.key` plus the rank multiple (the timed ranks depend on it);
    the whole model's time is stored under :func:`model_key`.
    """

    def __init__(self, env: str, entries: dict | None = None):
        self.env = env
        self.entries = dict(entries or {})

    @staticmethod
    def layer_key(spec: LayerSpec, multiple: int) -> str:
        return f"{spec.key()}_m{int(multiple)}"

    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, "environment": self.env,
                "entries": {k: self.entries[k] for k in sorted(self.entries)}}

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike, what: str = "latency table") -> "LatencyTable":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise LowRankError(f"cannot read {what} {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("entries"), dict):
            raise LowRankError(f"{path} is not an onnx-lowrank latency table (expected \"format\": \"{TABLE_FORMAT}\")")
        return cls(str(data.get("environment", "")), data["entries"])


def _cache_file(directory: Path, env: str) -> Path:
    return directory / f"latency-{hashlib.sha256(env.encode()).hexdigest()[:16]}.json"


def load_cache(directory: Path, env: str) -> LatencyTable:
    path = _cache_file(directory, env)
    if path.exists():
        try:
            table = LatencyTable.load(path, "latency cache")
            if table.env == env:
                return table
        except LowRankError:
            progress.log(f"warning: ignoring unreadable latency cache {path}")
    return LatencyTable(env)


def save_cache(directory: Path, table: LatencyTable) -> None:
    """Merge into the cache file (another run may have added entries meanwhile)."""
    on_disk = load_cache(directory, table.env)
    on_disk.entries.update(table.entries)
    try:
        on_disk.save(_cache_file(directory, table.env))
    except OSError as exc:
        progress.log(f"warning: could not write the latency cache in {directory}: {exc}")
