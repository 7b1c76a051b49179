"""Layer timings kept for reuse: the latency table file and the per-machine cache.

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
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .. import progress
from ..errors import LowRankError
from ..files import atomic_path
from ..graph.external import identity_bytes

TABLE_FORMAT = "onnx-lowrank latency table 1"


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

    Entry keys are the layer's timing key (graph/timing.py, plus the scheme's ``timing_tag``) and the rank multiple (the timed ranks depend on it);
    the whole model's time is stored under :func:`model_key`.
    """

    def __init__(self, env: str, entries: dict | None = None):
        self.env = env
        self.entries = dict(entries or {})

    @staticmethod
    def layer_key(layer_key: str, multiple: int) -> str:
        return f"{layer_key}_m{int(multiple)}"

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
