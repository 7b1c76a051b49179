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
