"""Measure what a factorisation buys (latency) and what it costs (output fidelity).

``bench`` times models on onnxruntime's CPU provider the way they will be deployed;
``evaluate`` compares a candidate against its reference on the same batches.
Both are plain functions: the CLI formats their dicts with ``format_bench`` / ``format_eval``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnx_lowrank import runtime
from onnx_lowrank.runtime import timing
from onnx_lowrank.errors import LowRankError

__all__ = ["synthetic_feeds", "bench", "evaluate", "format_bench", "format_eval"]

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
_PROB_EPS = 1e-12


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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _looks_like_probabilities(x: np.ndarray) -> bool:
    return bool(np.all(x >= 0.0) and np.all(x <= 1.0) and np.allclose(x.sum(axis=1), 1.0, rtol=0.0, atol=1e-3))


def _kl_rows(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """KL(p_r || p_c) per row; logits go through log-softmax, probabilities are used as they are."""
    if _looks_like_probabilities(r) and _looks_like_probabilities(c):
        p = r
        log_p = np.log(np.clip(r, _PROB_EPS, None))
        log_q = np.log(np.clip(c, _PROB_EPS, None))
    else:
        log_p = _log_softmax(r)
        log_q = _log_softmax(c)
        p = np.exp(log_p)
    kl = np.where(p > 0, p * (log_p - log_q), 0.0).sum(axis=1)
    return np.maximum(kl, 0.0)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-x, k - 1, axis=1)[:, :k]


def evaluate(
    reference_path: str,
    candidate_path: str,
    feeds: Iterable[dict[str, np.ndarray]],
    labels: np.ndarray | None = None,
    output: str | None = None,
    progress: bool = False,
) -> dict:
    """How far the candidate's output drifts from the reference's on the same batches.

    Always reports NMSE and max |diff|; for a classifier output (N, K), K >= 2, also top-1
    agreement, top-5 overlap and KL divergence, and with ``labels`` the accuracy of both.
    """
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise LowRankError(
                f"labels must be a 1-D array of integer class ids, got shape {labels.shape} dtype {labels.dtype}"
            )
    ref_sess = _session(reference_path)
    cand_sess = _session(candidate_path)
    ref_outputs = [o.name for o in ref_sess.get_outputs()]
    cand_outputs = [o.name for o in cand_sess.get_outputs()]
    name = output if output is not None else ref_outputs[0]
    for path, names in ((reference_path, ref_outputs), (candidate_path, cand_outputs)):
        if name not in names:
            raise LowRankError(f"{path} has no output named {name!r}; its outputs are {', '.join(names)}")

    samples = 0
    batches = 0
    err_sq = 0.0
    ref_sq = 0.0
    max_abs = 0.0
    classifier: bool | None = None
    top1_hits = 0
    top5_sum = 0.0
    kl_sum = 0.0
    ref_correct = 0
    cand_correct = 0
    with _progress_bar(progress, None, "eval", unit="sample") as bar:
        for feed in feeds:
            (r,) = _run(ref_sess, reference_path, _feed_for(ref_sess, reference_path, feed), [name])
            (c,) = _run(cand_sess, candidate_path, _feed_for(cand_sess, candidate_path, feed), [name])
            if not isinstance(r, np.ndarray) or not isinstance(c, np.ndarray):
                raise LowRankError(f"output {name!r} is not a tensor; choose a tensor output with output=")
            if r.shape != c.shape:
                raise LowRankError(
                    f"output {name!r} has shape {r.shape} in {reference_path} but {c.shape} in {candidate_path}; "
                    f"the models must produce the same output"
                )
            r = r.astype(np.float64)
            c = c.astype(np.float64)
            n = int(r.shape[0]) if r.ndim else 1
            is_clf = r.ndim == 2 and r.shape[1] >= 2
            if classifier is None:
                classifier = is_clf
                if labels is not None and not classifier:
                    raise LowRankError(
                        f"labels need a classifier output of shape (N, K), but {name!r} has shape {r.shape}; "
                        f"pick the logits output with output="
                    )
            elif classifier != is_clf:
                raise LowRankError(f"output {name!r} changes rank across batches; feed batches of one shape")
            batches += 1
            diff = c - r
            err_sq += float(np.sum(diff * diff))
            ref_sq += float(np.sum(r * r))
            if diff.size:
                max_abs = max(max_abs, float(np.max(np.abs(diff))))
            if is_clf and n:
                ra = r.argmax(axis=1)
                ca = c.argmax(axis=1)
                top1_hits += int(np.sum(ra == ca))
                k = min(5, r.shape[1])
                tr, tc = _top_k(r, k), _top_k(c, k)
                top5_sum += float(np.sum((tr[:, :, None] == tc[:, None, :]).sum(axis=(1, 2)) / k))
                kl_sum += float(np.sum(_kl_rows(r, c)))
                if labels is not None:
                    if samples + n > len(labels):
                        raise LowRankError(
                            f"got {len(labels)} labels but the feeds hold more samples; give one label per sample"
                        )
                    y = labels[samples : samples + n]
                    ref_correct += int(np.sum(ra == y))
                    cand_correct += int(np.sum(ca == y))
            samples += n
            bar.update(n)

    if batches == 0:
        raise LowRankError("no input batches to evaluate; give at least one feed")
    if labels is not None and len(labels) != samples:
        raise LowRankError(f"got {len(labels)} labels for {samples} samples; give exactly one label per sample")

    if ref_sq > 0:
        nmse = err_sq / ref_sq
    else:
        nmse = 0.0 if err_sq == 0 else float("inf")
    result: dict[str, Any] = {"samples": samples, "output": name, "nmse": nmse, "max_abs_diff": max_abs}
    if classifier and samples:
        result["top1_agreement"] = top1_hits / samples
        result["top5_overlap"] = top5_sum / samples
        result["kl_divergence"] = kl_sum / samples
        if labels is not None:
            acc_r = ref_correct / samples
            acc_c = cand_correct / samples
            result["accuracy_reference"] = acc_r
            result["accuracy_candidate"] = acc_c
            result["accuracy_drop_points"] = 100.0 * (acc_r - acc_c)
    return result


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Columns padded to width; the first ``left`` columns left-aligned (names), the rest right-aligned (numbers)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(cell).ljust(w) if j < left else str(cell).rjust(w) for j, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def format_bench(result: dict) -> str:
    """Terminal table of a ``bench`` result, plus one per-op table per profiled model."""
    threads = result.get("threads")
    lines = [
        f"threads: {threads if threads is not None else 'onnxruntime default'}   "
        f"batch: {result.get('batch') if result.get('batch') is not None else '-'}"
    ]
    spreads = result.get("speedup_spread") or [None] * len(result["models"])
    rows = [
        [
            m["path"],
            f"{m['median_ms']:.3f}",
            f"{m['min_ms']:.3f}",
            f"{m['max_ms']:.3f}",
            f"{m['mean_ms']:.3f}",
            str(m["runs"]),
            f"{s:.2f}x",
            _interval(sp, "iqr"),
            _interval(sp, "ci95"),
        ]
        for m, s, sp in zip(result["models"], result["speedup"], spreads)
    ]
    lines += _table(["model", "median ms", "min ms", "max ms", "mean ms", "runs", "speedup", "IQR", "95% CI"], rows)
    if result.get("rounds") is not None:
        how = {True: "stopped when every median was known within the tolerance",
               False: "stopped at the time cap before the medians were stable: rerun on a quieter machine",
               None: "fixed count"}[result.get("stable")]
        lines.append(f"{result['rounds']} interleaved rounds ({how}); speed-up = median of per-round ratios")
    for m in result["models"]:
        if "profile" not in m:
            continue
        lines += ["", f"profile: {m['path']} (per run)"]
        prows = [
            [p["op_type"], f"{p['total_ms']:.3f}", f"{p['percent']:.1f}", str(p["count"])] for p in m["profile"]
        ]
        lines += _table(["op type", "ms", "%", "count"], prows)
    return "\n".join(lines)


def _interval(spread: dict | None, key: str) -> str:
    if not spread:
        return "-"
    lo, hi = spread[key]
    return f"{lo:.2f}-{hi:.2f}" if np.isfinite(lo) and np.isfinite(hi) else "?"


def format_eval(result: dict) -> str:
    """Terminal key/value table of an ``evaluate`` result; classifier and accuracy rows only when present."""
    rows = [
        ["samples", str(result["samples"])],
        ["output", str(result["output"])],
        ["NMSE", f"{result['nmse']:.3e}"],
        ["max |diff|", f"{result['max_abs_diff']:.3e}"],
    ]
    if "top1_agreement" in result:
        rows += [
            ["top-1 agreement", f"{100 * result['top1_agreement']:.2f} %"],
            ["top-5 overlap", f"{100 * result['top5_overlap']:.2f} %"],
            ["KL divergence", f"{result['kl_divergence']:.3e}"],
        ]
    if "accuracy_reference" in result:
        rows += [
            ["accuracy (reference)", f"{100 * result['accuracy_reference']:.2f} %"],
            ["accuracy (candidate)", f"{100 * result['accuracy_candidate']:.2f} %"],
            ["accuracy drop", f"{result['accuracy_drop_points']:.2f} points"],
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
