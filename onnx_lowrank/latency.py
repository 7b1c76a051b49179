"""Timing on onnxruntime: layers alone, whole models, and two models against each other.

FLOPs are a poor guide to latency on onnxruntime's CPU provider: its NCHWc kernels need channel
counts in multiples of the block size, small 1 x 1 convolutions are memory-bound, and a layer
that leaves the blocked layout pays for reorders. So each candidate layer is timed as a small
ONNX model (graph/timing.py), unchanged and factorised at a handful of candidate ranks, at batch
1, with the user's thread count and the layer's real input size. Only
differences ``original - factorised`` are ever used (rank selection compares savings; the
whole-model prediction is ``measured original - sum of savings``), so that common part cancels.
What does not cancel (a layer saves a little more or less inside the whole network: caches,
fusions with neighbours, threads) is corrected by the pipeline, which times the whole model
factorised at the chosen ranks with stand-in weights (:func:`compare_models`) and rescales.
All timing goes through :mod:`onnx_lowrank.runtime` (sessions set up as deployed, interleaved rounds).

The timings are kept in a latency table and a cache (costs/table.py); the rank search that
uses them is costs/latency.py.
"""

from __future__ import annotations

import numpy as np
import onnx

from .runtime import time_models
from .runtime.timing import MIN_SECONDS

__all__ = ["time_layer", "measure_model", "compare_models", "timed_ranks"]

#: At most this many factorised ranks are timed per layer; the others are interpolated.
MAX_TIMED_RANKS = 8


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


def time_layer(models: list[onnx.ModelProto], input_shape, threads: int | None = None,
               seconds: float = 1.0) -> list[float]:
    """Fastest ms of each of ``models`` (one layer whole, then factorised: graph/timing.py) on one random input
    ``x`` of ``input_shape``, runs interleaved."""
    x = np.random.default_rng(0).random(tuple(input_shape), dtype=np.float32)
    return _fastest(models, [{"x": x}] * len(models), threads, seconds, min_rounds=3)


def measure_model(model: onnx.ModelProto, feed: dict, threads: int | None, seconds: float = 2.0) -> float:
    """Fastest ms of the whole model at batch 1 (see :func:`_fastest`)."""
    return _fastest([model], [feed], threads, seconds, min_rounds=5)[0]


def compare_models(original: onnx.ModelProto, candidate: onnx.ModelProto, feed: dict, threads: int | None,
                   seconds: float = 3.0) -> float:
    """Speed-up of ``candidate`` over ``original``: median of per-round ratios, rounds interleaved until that
    median is stable (runtime.timing; as ``bench``: at least its ``MIN_ROUNDS`` and ``MIN_SECONDS``), at most
    ``10 * seconds``. The stability test, not a fixed duration, says when the ratio is known: a fast model is
    known after the floor (a 3 s floor made every check of a 1 ms model take 3 s), a slow one runs longer."""
    return time_models([original, candidate], feed, threads, min_seconds=min(MIN_SECONDS, seconds),
                       seconds=10 * seconds).speedup(1).median
