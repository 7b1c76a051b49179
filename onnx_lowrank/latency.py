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

The timings are kept in a latency table and a cache (costs/table.py); the rank search that
uses them is costs/latency.py.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["time_layer", "measure_model", "compare_models", "timed_ranks"]

#: At most this many factorised ranks are timed per layer; the others are interpolated.
MAX_TIMED_RANKS = 8


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


def time_layer(models: list[onnx.ModelProto], input_shape, threads: int | None = None,
               seconds: float = 1.0) -> list[float]:
    """Fastest ms of each of ``models`` (one layer whole, then factorised: graph/timing.py) on one random input
    ``x`` of ``input_shape``, runs interleaved."""
    sessions = [_session(m, threads) for m in models]
    x = np.random.default_rng(0).random(tuple(input_shape), dtype=np.float32)
    return _interleaved(sessions, [{"x": x}] * len(sessions), seconds)


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
