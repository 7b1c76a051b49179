"""Measure what a factorisation buys: ``bench`` times models on onnxruntime's CPU provider the way
they will be deployed (what it costs in output fidelity: fidelity.py). Plain functions: the CLI
prints their dicts with ``report.format_bench``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnx_lowrank import runtime
from onnx_lowrank.runtime import timing
from onnx_lowrank.errors import LowRankError

__all__ = ["synthetic_feeds", "bench"]

_DTYPES: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}

# Integer inputs are often indices (Gather, Embedding); small non-negative values stay in range.
_INT_HIGH = 10
# Probabilities are clipped here before the log so that a zero in the candidate gives a large, finite KL.


def _session(model, threads: int | None = None, profile_prefix: str | None = None) -> ort.InferenceSession:
    """A session set up like a deployment (``runtime.TIMING``); ``model`` is a path or an in-memory ModelProto."""
    return runtime.session(model, runtime.TIMING, threads, profile_prefix)


def _run(sess: ort.InferenceSession, path, feed: dict[str, np.ndarray], names: list[str] | None = None) -> list:
    return runtime.run(sess, names, feed, _label(path))


def _label(model) -> str:
    return "<in-memory model>" if isinstance(model, onnx.ModelProto) else str(model)


def _feed_for(sess: ort.InferenceSession, path: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Restrict a shared feed to this model's inputs, so models with extra/fewer optional inputs still compare."""
    if not isinstance(feed, dict):
        raise LowRankError(f"a feed must be a dict of input name -> array, got {type(feed).__name__}")
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feed]
    if missing:
        raise LowRankError(
            f"{_label(path)} needs input(s) {', '.join(missing)} that the feeds do not provide "
            f"(given: {', '.join(feed) or 'none'}); feed every model input"
        )
    return {n: np.asarray(feed[n]) for n in names}


def _progress_bar(enabled: bool, total: int | None, desc: str, unit: str = "run") -> tqdm:
    """A tqdm bar that stays silent when asked or when stderr is redirected (logs, CI)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and sys.stderr.isatty()), leave=False)


def synthetic_feeds(
    model_path: str,
    batch: int = 1,
    seed: int = 0,
    shape_overrides: dict[str, list[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs matching the model's inputs, for benchmarking when no real data is at hand.

    A symbolic first dimension becomes ``batch``; other symbolic dimensions must be given in
    ``shape_overrides`` (input name -> full shape). Floats are U(0, 1), integers in [0, 10).
    """
    if batch < 1:
        raise LowRankError(f"batch must be at least 1, got {batch}")
    overrides = dict(shape_overrides or {})
    sess = _session(model_path)
    inputs = sess.get_inputs()
    unknown = sorted(set(overrides) - {i.name for i in inputs})
    if unknown:
        raise LowRankError(
            f"shape override for unknown input(s) {', '.join(unknown)}; "
            f"the model's inputs are {', '.join(i.name for i in inputs)}"
        )
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in inputs:
        dtype = _DTYPES.get(inp.type)
        if dtype is None:
            raise LowRankError(
                f"input {inp.name} has type {inp.type}, which synthetic inputs do not support; "
                f"provide real data instead"
            )
        shape = _resolve_shape(inp.name, list(inp.shape), batch, overrides.get(inp.name))
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.random(shape, dtype=np.float64).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.random(shape) < 0.5
        else:
            feeds[inp.name] = rng.integers(0, _INT_HIGH, size=shape).astype(dtype)
    return feeds


def _resolve_shape(name: str, dims: list, batch: int, override: list[int] | None) -> tuple[int, ...]:
    def symbolic(d: Any) -> bool:
        return not isinstance(d, int) or d < 0

    if override is not None:
        override = [int(d) for d in override]
        if len(override) != len(dims):
            raise LowRankError(
                f"shape override for {name} has {len(override)} dims but the input has {len(dims)} ({_dims_str(dims)})"
            )
        for model_dim, want in zip(dims, override):
            if want < 1:
                raise LowRankError(f"shape override for {name} must have positive dims, got {override}")
            if not symbolic(model_dim) and model_dim != want:
                raise LowRankError(
                    f"shape override {override} for {name} conflicts with the model's fixed shape {_dims_str(dims)}"
                )
        return tuple(override)
    shape = []
    for axis, d in enumerate(dims):
        if not symbolic(d):
            shape.append(d)
        elif axis == 0:
            shape.append(batch)
        else:
            raise LowRankError(
                f"input {name} has symbolic dim {d!r} at axis {axis} ({_dims_str(dims)}); "
                f"give its full shape in shape_overrides"
            )
    return tuple(shape)


def _dims_str(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _batch_of(feed: dict[str, np.ndarray]) -> int | None:
    for value in feed.values():
        arr = np.asarray(value)
        return int(arr.shape[0]) if arr.ndim else None
    return None


def bench(
    model_paths: list,
    feeds: dict[str, np.ndarray] | list[dict],
    threads: int | None = None,
    runs: int | None = None,
    warmup: int = 5,
    profile: bool = False,
    progress: bool = False,
    min_runs: int = timing.MIN_ROUNDS,
    min_seconds: float = timing.MIN_SECONDS,
    tolerance: float = timing.TOLERANCE,
    max_seconds: float = timing.MAX_SECONDS,
) -> dict:
    """Latency of each model on the CPU provider, interleaved so that machine noise hits all alike.

    Each round runs every model once, the order rotated per round (runtime.timing). ``feeds`` is
    one feed dict (synthetic) or a list of them (real data, cycled). ``runs``: exactly that many
    rounds; ``None``: rounds until each speed-up (a lone model: its time) has its median known
    within ``tolerance`` on either side at 95 % confidence, at least ``min_runs`` rounds and
    ``min_seconds``, and then at most ``max_seconds`` in all. ``speedup[i]`` is the median over rounds of model 0's time / model
    i's time; ``speedup_spread[i]`` its quartiles and confidence interval. ``model_paths`` may hold
    in-memory ModelProtos.
    """
    if not model_paths:
        raise LowRankError("no models to benchmark; give at least one model path")
    if runs is not None and runs < 1:
        raise LowRankError(f"runs must be at least 1, got {runs}")
    if min_runs < 1 or not max_seconds > 0 or not tolerance > 0:
        raise LowRankError("min_runs must be at least 1, max_seconds and tolerance positive")
    if warmup < 0:
        raise LowRankError(f"warmup must be 0 or more, got {warmup}")
    if threads is not None and threads < 1:
        raise LowRankError(f"threads must be at least 1, got {threads}; omit it to use onnxruntime's default")
    feed_list = [feeds] if isinstance(feeds, dict) else list(feeds)
    if not feed_list:
        raise LowRankError("no input batches to benchmark with; give a feed dict or a non-empty list of them")

    sessions = [_session(p, threads) for p in model_paths]
    per_model_feeds = [[_feed_for(s, p, f) for f in feed_list] for s, p in zip(sessions, model_paths)]
    labels = [_label(p) for p in model_paths]
    runners = [lambda r, s=s, f=f, w=w: runtime.run(s, None, f[r % len(f)], w)
               for s, f, w in zip(sessions, per_model_feeds, labels)]
    n = len(model_paths)
    fixed = dict(min_rounds=runs, max_rounds=runs, tolerance=None) if runs is not None else \
        dict(min_rounds=min_runs, min_seconds=min_seconds, seconds=max_seconds, tolerance=tolerance)
    total = n * (warmup + runs) * (2 if profile else 1) if runs is not None else None
    with _progress_bar(progress, total, "bench") as bar:
        rounds = timing.interleave(runners, warmup=warmup, on_run=lambda: bar.update(1), **fixed)
        del sessions, runners
        profiles = None
        if profile:
            profiles = [
                _profile_model(path, threads, per_model_feeds[i], rounds.rounds, warmup, bar)
                for i, path in enumerate(model_paths)
            ]

    models = []
    for i, label in enumerate(labels):
        t = rounds.ms[i]
        entry = {
            "path": label,
            "median_ms": float(statistics.median(t)),
            "min_ms": float(min(t)),
            "max_ms": float(max(t)),
            "mean_ms": float(statistics.fmean(t)),
            "runs": len(t),
            "times_ms": list(t),
        }
        if profiles is not None:
            entry["profile"] = profiles[i]
        models.append(entry)
    spreads = [None] + [rounds.speedup(i).as_dict() for i in range(1, n)]
    speedup = [1.0] + [s["median"] for s in spreads[1:]]
    return {"models": models, "speedup": speedup, "speedup_spread": spreads, "rounds": rounds.rounds,
            "stable": rounds.stable if runs is None else None, "seconds": rounds.seconds,
            "threads": threads, "batch": _batch_of(feed_list[0])}


def _profile_model(
    path: str, threads: int | None, feeds: list[dict], runs: int, warmup: int, bar: tqdm
) -> list[dict]:
    """Per-op-type time from onnxruntime's profiler, in a separate session so profiling doesn't skew ``bench``."""
    with tempfile.TemporaryDirectory(prefix="onnx_lowrank_profile_") as tmp:
        sess = _session(path, threads, profile_prefix=os.path.join(tmp, "profile"))
        for r in range(warmup + runs):
            _run(sess, path, feeds[r % len(feeds)])
            bar.update(1)
        trace_path = sess.end_profiling()
        with open(trace_path, encoding="utf-8") as fh:
            events = json.load(fh)
        del sess
    return _summarise_trace(events, warmup, runs)


def _summarise_trace(events: list[dict], warmup: int, runs: int) -> list[dict]:
    """Aggregate kernel events by op type, skipping those of the warm-up runs."""
    if isinstance(events, dict):
        events = events.get("traceEvents", [])
    starts = sorted(e.get("ts", 0) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    cutoff = starts[warmup] if len(starts) == warmup + runs else None
    measured_runs = runs if cutoff is not None else max(len(starts), warmup + runs)
    nodes = [e for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})]
    # Older onnxruntime versions also emit zero-length fence events; only kernel events carry the time.
    if any(e.get("name", "").endswith("_kernel_time") for e in nodes):
        nodes = [e for e in nodes if e.get("name", "").endswith("_kernel_time")]
    if cutoff is not None:
        nodes = [e for e in nodes if e.get("ts", 0) >= cutoff]
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in nodes:
        op = e["args"]["op_name"]
        totals[op] = totals.get(op, 0.0) + float(e.get("dur", 0))
        counts[op] = counts.get(op, 0) + 1
    grand = sum(totals.values())
    rows = [
        {
            "op_type": op,
            "total_ms": totals[op] / 1000.0 / measured_runs,
            "percent": 100.0 * totals[op] / grand if grand > 0 else 0.0,
            "count": int(round(counts[op] / measured_runs)),
        }
        for op in totals
    ]
    rows.sort(key=lambda row: (-row["total_ms"], row["op_type"]))
    return rows
