"""Shared helpers for the benchmark scripts: machine description, real photo crops, result files.

Benchmarks are run by hand (`python benchmarks/NAME.py`); each writes its table to
`benchmarks/results/NAME.md` (plus CSV / PNG where useful), headed with the exact command, the
machine and the date, and `benchmarks/RESULTS.md` collects them.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache"

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png"]


def machine() -> str:
    import onnxruntime

    return (f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}")


def header(title: str) -> str:
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    return (f"## {title}\n\n- command: `{cmd}`\n- machine: {machine()}\n"
            f"- date: {datetime.date.today().isoformat()}\n\n")


def write_result(name: str, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n")
    print(markdown)
    return path


def markdown_table(header_row: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header_row) + " |", "|" + "---|" * len(header_row)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def photo_crops(n: int, size: int = 224, seed: int = 0, files: list[str] | None = None) -> np.ndarray:
    """``n`` random crops (random scale, position and flip) of the real photographs shipped in
    scikit-image, as uint8 HWC RGB arrays of ``size x size``. Disjoint sets: use other seeds."""
    import importlib.util

    from PIL import Image

    base = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    imgs = []
    for f in files or PHOTOS:
        p = base / f
        if p.exists():
            imgs.append(Image.open(p).convert("RGB"))
    if not imgs:
        raise SystemExit("no scikit-image photographs found: pip install scikit-image==0.26.0")
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = imgs[rng.integers(len(imgs))]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        x0, y0 = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
        a = np.asarray(crop)
        out[i] = a[:, ::-1] if rng.random() < 0.5 else a
    return out


def method_spec(spec: str) -> tuple[str, bool]:
    """``(method, asymmetric)`` for a method named as on the command line: ``default`` (the tool's
    defaults: nonlinear + asymmetric) or CLI flags such as ``linear --no-asymmetric``."""
    method, asym = "nonlinear", True
    words = spec.replace("--method", "").split()
    for w in words:
        if w in ("linear", "nonlinear"):
            method = w
        elif w in ("--no-asymmetric", "--asymmetric"):
            asym = w == "--asymmetric"
        elif w != "default":
            raise SystemExit(f"bad method {spec!r}: write 'default' or flags like 'linear --no-asymmetric'")
    return method, asym


def activation_summary(layers) -> str:
    """Which activation target each factorisable Conv got, and any the tool did not know."""
    from collections import Counter

    cand = [lay for lay in layers if not lay.skip_reason]
    kinds = Counter(lay.activation if lay.activation != "identity" else "none (conv output)" for lay in cand)
    unknown = [f"{lay.name} ({lay.activation_unknown})" for lay in cand if lay.activation_unknown]
    return (f"activation targets of the {len(cand)} factorisable Convs: "
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            + f"; unknown activations: {', '.join(unknown) or 'none'}")


def versus(results: list[dict], key: str, label: str, lower_is_better: bool,
           a: str = "default", b: str = "linear --no-asymmetric") -> str:
    """One computed line per speed-up: method ``a`` against method ``b`` on ``key``."""
    lines = [f"### {a} vs {b} ({label}, computed)", ""]
    for s in sorted({r["speedup"] for r in results}):
        ra = next((r for r in results if r["speedup"] == s and r["method"] == a), None)
        rb = next((r for r in results if r["speedup"] == s and r["method"] == b), None)
        if ra is None or rb is None:
            continue
        better = ra[key] < rb[key] if lower_is_better else ra[key] > rb[key]
        lines.append(f"- {s:g}x: {a} {ra[key]:.4g}, {b} {rb[key]:.4g}: "
                     f"{a + ' better' if better else a + ' NOT better'}")
    return "\n".join(lines) + "\n"


def max_reachable(comp) -> float:
    """Largest reachable theoretical speed-up of a Compressor (every candidate at its smallest rank)."""
    from onnx_lowrank.solver.ranks import RankSelectionError

    try:
        comp.run(speedup=1e6, method="linear", asymmetric=False)
        return float("inf")
    except RankSelectionError as err:
        return err.max_speedup


def compress_grid(comp, speedups, methods: list[str], specs: dict, cache: Path, prefix: str, evaluate,
                  describe, max_speedup: float) -> tuple[list[dict], dict[str, str]]:
    """Compress at every (speed-up, method) under the reachable maximum, save each model in ``cache``
    and evaluate each distinct model once (``evaluate(model) -> dict`` of metrics).

    Returns the rows (metrics plus what the report says) and ``{"<s>x <method>": path}`` of the distinct
    models, for one interleaved latency run (:func:`bench_grid`). ``describe(row)`` prints a row.
    """
    import hashlib

    from onnx_lowrank.graph.loading import save_model_atomic

    results, paths, seen = [], {}, {}
    for s in speedups:
        if s >= max_speedup:
            print(f"skip {s}x: above the reachable {max_speedup:.3f}x")
            continue
        for m in methods:
            method, asym = specs[m]
            t0 = time.perf_counter()
            res = comp.run(speedup=s, method=method, asymmetric=asym)
            t_comp = time.perf_counter() - t0
            path = cache / f"{prefix}.{s:g}x.{m.replace(' ', '').replace('-', '_')}.onnx"
            save_model_atomic(res.model, path)
            digest = hashlib.sha256(res.model.SerializeToString()).hexdigest()
            if digest in seen:  # e.g. nonlinear == linear when no factorised layer has a known activation
                metrics, same_as = seen[digest]
            else:
                metrics, same_as = evaluate(res.model), m
                seen[digest] = (metrics, m)
            rep = res.report
            row = {"speedup": s, "method": m, "identical_to": same_as if same_as != m else None, **metrics,
                   "theoretical": rep["speedup_theoretical"], "conv_theoretical": rep["conv_speedup_theoretical"],
                   "factorised": sum(1 for lay in rep["layers"] if lay["status"] == "factorised"),
                   "nonlinear_layers": sum(1 for lay in rep["layers"] if lay["method"] == "nonlinear"),
                   "ranks": {lay["name"]: lay["rank"] for lay in rep["layers"] if lay["rank"] is not None},
                   "compress_s": t_comp, "path": str(path)}
            results.append(row)
            if same_as == m:
                paths[f"{s:g}x {m}"] = str(path)
            describe(row)
    return results, paths


def bench_grid(results: list[dict], paths: dict[str, str], feed: dict, runs: int, warmup: int) -> dict:
    """Time every distinct model and the original (``paths["original"]``) in the same interleaved rounds
    (batch of ``feed``, one thread); add ``latency_ms`` and ``latency_ratio`` (median of per-round ratios) to each row."""
    from onnx_lowrank import measure

    names = list(paths)
    b = measure.bench([paths[n] for n in names], feed, threads=1, runs=runs, warmup=warmup)
    lat = dict(zip(names, b["models"]))
    for row in results:
        entry = lat[f"{row['speedup']:g}x {row['identical_to'] or row['method']}"]
        row["latency_ms"] = entry["median_ms"]
        row["latency_ratio"] = b["speedup"][names.index(f"{row['speedup']:g}x {row['identical_to'] or row['method']}")]
    return lat
