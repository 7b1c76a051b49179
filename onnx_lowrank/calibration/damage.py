"""Measured accuracy cost of each candidate: the model's outputs on held-back images, one layer changed.

For each layer, one onnxruntime session of the model with a channel-map probe after that layer
(graph/probe.py) runs the held-back calibration images once per candidate rank; the damage is the
distance of its outputs to the original model's (:data:`METRICS`). Results are cached on disk per
model, data and settings, next to the latency tables.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from ..graph.dense import is_dense
from ..graph.layers import ConvLayer
from ..graph.probe import PROBE_B, PROBE_W, probe_model
from ..solver.reconstruction import Factorisation
from ..runtime import CALIBRATION, run, session

__all__ = ["METRICS", "held_back_feeds", "measure_damage", "DamageCache", "DamageMeter", "factor_weights",
           "resolve_metric"]


class Metric:
    """A distance between original and changed outputs, accumulated over batches as ``sum num / sum den``."""

    name = ""

    def parts(self, ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
        raise NotImplementedError


class NMSE(Metric):
    """Squared error of the outputs relative to their energy."""

    name = "nmse"

    def parts(self, ref, out):
        return float(np.sum((out - ref) ** 2)), float(np.sum(ref ** 2))


class KL(Metric):
    """KL divergence of the changed distribution from the original, per row of the last axis.

    The last axis holds probabilities (used as they are) or logits (through a softmax)."""

    name = "kl"

    def parts(self, ref, out):
        k = ref.shape[-1]
        r, c = ref.reshape(-1, k), out.reshape(-1, k)
        if _probabilities(r) and _probabilities(c):
            log_p, log_q, p = np.log(np.clip(r, 1e-12, None)), np.log(np.clip(c, 1e-12, None)), r
        else:
            log_p, log_q = _log_softmax(r), _log_softmax(c)
            p = np.exp(log_p)
        kl = np.maximum((p * (log_p - log_q)).sum(axis=1), 0.0)
        return float(kl.sum()), float(len(kl))


def _probabilities(x: np.ndarray) -> bool:
    return bool(x.size and np.all(x >= 0) and np.all(x <= 1) and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


METRICS: dict[str, Metric] = {m.name: m for m in (NMSE(), KL())}


def resolve_metric(name: str, reference: np.ndarray) -> Metric:
    """``auto``: KL for an output whose last axis holds probabilities (>= 2 classes), else NMSE."""
    if name == "auto":
        two = reference.ndim >= 2 and reference.shape[-1] >= 2
        return METRICS["kl" if two and _probabilities(reference.astype(np.float64)) else "nmse"]
    return METRICS[name]


def held_back_feeds(batches, holdout_every: int, most: int, batch: int, fixed: bool) -> list[dict]:
    """The held-back images (every ``holdout_every``-th, as in the report) regrouped in batches of ``batch``;
    at most ``most`` of them (a fixed-batch model: whole batches only)."""
    picked: list[dict] = []
    seen = 0
    for feed in batches:
        n = len(next(iter(feed.values())))
        idx = np.arange(seen, seen + n)
        keep = np.nonzero(idx % holdout_every == holdout_every - 1)[0] if holdout_every >= 2 else np.arange(n)
        if len(keep):
            picked.append({k: v[keep] for k, v in feed.items()})
        seen += n
    if not picked:
        return []
    allx = {k: np.concatenate([f[k] for f in picked])[:most] for k in picked[0]}
    total = len(next(iter(allx.values())))
    if fixed:
        total = total // batch * batch
    return [{k: v[i:i + batch] for k, v in allx.items()} for i in range(0, total, batch)]


def factor_weights(layer: ConvLayer, f: Factorisation | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """graph/probe.py ``probe_layers``' (A, B, bias) inputs for ``f`` after ``layer`` (None: the identity, the
    layer kept whole)."""
    d = layer.out_channels
    p, q, b = (np.eye(d), np.eye(d), np.zeros(d)) if f is None else (f.P, f.Q, f.b)
    a, m = (q, p.T) if is_dense(layer) else (q.T[:, :, None, None], p[:, :, None, None])
    return tuple(np.ascontiguousarray(x, dtype=np.float32) for x in (a, m, b))


def _probe_weights(layer: ConvLayer, f: Factorisation | None) -> dict[str, np.ndarray]:
    d = layer.out_channels
    m = np.eye(d) if f is None else f.M
    b = np.zeros(d) if f is None else f.b
    w = m.T if is_dense(layer) else m[:, :, None, None]
    return {PROBE_W: np.ascontiguousarray(w, dtype=np.float32), PROBE_B: np.ascontiguousarray(b, dtype=np.float32)}


class DamageMeter:
    """The whole model's output damage on fixed feeds: ``meter(extra feed)`` runs ``probe`` (a model with
    inputs beyond the original's, e.g. graph/probe.py's channel maps) and compares its outputs with those of
    ``model`` (computed once); :meth:`damage` compares any other session's with the same references."""

    def __init__(self, model: onnx.ModelProto, probe: onnx.ModelProto | None, feeds: list[dict],
                 metric: str = "auto", threads: int | None = None):
        ref_sess = session(model, CALIBRATION, threads)
        self.out_name = ref_sess.get_outputs()[0].name
        self.feeds = feeds
        self.refs = [run(ref_sess, [self.out_name], feed)[0].astype(np.float64) for feed in feeds]
        self.metric = resolve_metric(metric, self.refs[0])
        self.sess = session(probe, CALIBRATION, threads) if probe is not None else None
        self.calls = 0

    def __call__(self, extra: dict[str, np.ndarray]) -> float:
        self.calls += 1
        return self.damage(self.sess, extra)

    def damage(self, sess, extra: dict[str, np.ndarray]) -> float:
        """Damage of ``sess``'s outputs (fed the feeds plus ``extra``) against the references."""
        num = den = 0.0
        for feed, ref in zip(self.feeds, self.refs):
            (out,) = run(sess, [self.out_name], {**feed, **extra})
            a, b = self.metric.parts(ref, out.astype(np.float64))
            num, den = num + a, den + b
        return num / den if den > 0 else 0.0


def measure_damage(model: onnx.ModelProto, candidates: list[tuple[ConvLayer, dict[int, Factorisation]]],
                   feeds: list[dict], metric: str = "auto", threads: int | None = None,
                   update: Callable[[int], None] | None = None,
                   context: dict[str, Factorisation] | None = None) -> tuple[dict[str, dict[int, float]], str]:
    """``({layer name: {rank: damage}}, metric used)``: damage of each candidate factorisation.

    Without ``context`` each layer is changed alone. With ``context`` ({layer name: fit}) every other
    layer named there holds its fit while one layer takes its candidates, and the table gives the
    damage *added* by each candidate over keeping that layer whole (rank 0 is not used): the damage is
    then measured where the allocation will land, interactions between layers included to first order."""
    meter = DamageMeter(model, None, feeds, metric, threads)
    result: dict[str, dict[int, float]] = {}
    context = context or {}
    for layer, fits in candidates:
        others = [(lay, f.M, f.b) for lay, f in ((lay, context.get(lay.name)) for lay, _ in candidates)
                  if f is not None and lay.name != layer.name]
        sess = session(probe_model(model, layer, others), CALIBRATION, threads)
        table = {}
        for r, f in ([(0, None)] if context else []) + list(fits.items()):
            table[int(r)] = meter.damage(sess, _probe_weights(layer, f))
        if context:
            keep = table.pop(0)
            table = {r: v - keep for r, v in table.items()}
        result[layer.name] = table
        if update:
            update(1)
    return result, meter.metric.name


class DamageCache:
    """Damage tables on disk, one JSON file per model + data + settings key (atomic writes)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    @staticmethod
    def key(model: onnx.ModelProto, feeds: list[dict], settings: dict) -> str:
        h = hashlib.sha256(model.SerializeToString(deterministic=True))
        for feed in feeds:
            for name in sorted(feed):
                h.update(name.encode())
                h.update(np.ascontiguousarray(feed[name]).tobytes())
        h.update(json.dumps(settings, sort_keys=True).encode())
        return "damage_" + h.hexdigest()[:24]

    def load(self, key: str) -> dict | None:
        path = self.directory / f"{key}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def save(self, key: str, data: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, self.directory / f"{key}.json")
