"""Compress at several speed-ups and measure each: the accuracy / latency trade-off as a table and a plot."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

from . import progress
from .budget import Budget, evaluate_against
from .files import atomic_path
from .graph.loading import load_model, save_model_atomic
from .measure import bench, synthetic_feeds
from .pipeline import Compressor, input_specs
from .solver.ranks import RankSelectionError

FIELDS = ["speedup_target", "objective", "speedup_theoretical", "speedup_predicted", "speedup_measured",
          "speedup_measured_q1", "speedup_measured_q3", "latency_rounds", "latency_ms", "latency_original_ms", "top1_agreement", "top5_overlap", "nmse", "accuracy_reference", "accuracy_candidate",
          "accuracy_drop_points", "layers_factorised", "status"]


def sweep(model, calib, eval_data, speedups: list[float], config, labels: str | None = None,
          runs: int | None = None, threads: int | None = None, batch: int = 1) -> list[dict]:
    """One row per speed-up: theoretical and measured speed-up, fidelity (and accuracy with labels)."""
    source = load_model(model) if isinstance(model, (str, Path)) else model
    specs = input_specs(source)
    budget = Budget(eval_data, labels, preprocess=config.preprocess)
    budget.check_model(source)   # the evaluation data and labels are checked before calibration, not after it
    budget.inputs(specs)
    compressor = Compressor(source, calib, config)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-sweep-") as tmp:
        original = os.path.join(tmp, "original.onnx")
        save_model_atomic(compressor.source_model, original)
        feeds = synthetic_feeds(original, batch=batch, shape_overrides=config.input_shapes or None)
        for s in speedups:
            progress.log(f"sweep: --speedup {s:g}")
            try:
                res = compressor.run(speedup=s)
            except RankSelectionError as err:
                rows.append({"speedup_target": s, "status": f"unreachable (at most {err.max_speedup:.3g}x)"})
                continue
            path = os.path.join(tmp, f"s{s:g}.onnx")
            save_model_atomic(res.model, path)
            ev = evaluate_against(original, path, specs, budget)
            b = bench([original, path], feeds, threads=threads, runs=runs)
            rows.append({
                "speedup_target": s,
                "objective": res.report["objective"],
                "speedup_theoretical": res.report["speedup_theoretical"],
                "speedup_predicted": res.report["predicted_latency_speedup"],
                "speedup_measured": b["speedup"][1],
                "speedup_measured_q1": b["speedup_spread"][1]["iqr"][0],
                "speedup_measured_q3": b["speedup_spread"][1]["iqr"][1],
                "latency_rounds": b["rounds"],
                "latency_ms": b["models"][1]["median_ms"],
                "latency_original_ms": b["models"][0]["median_ms"],
                **{k: ev[k] for k in ("top1_agreement", "top5_overlap", "nmse", "accuracy_reference",
                                      "accuracy_candidate", "accuracy_drop_points") if k in ev},
                "layers_factorised": sum(1 for lay in res.report["layers"] if lay["status"] == "factorised"),
                "status": "ok",
            })
    return rows


def write_csv(rows: list[dict], path: str | Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Fidelity against theoretical and measured speed-up, so the FLOPs-vs-latency gap is visible.

    Both series are labelled with the target each point was compressed for.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    metric = "accuracy_candidate" if ok and "accuracy_candidate" in ok[0] else "top1_agreement"
    label = "accuracy (%)" if metric == "accuracy_candidate" else "top-1 agreement with original (%)"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    y = [100 * r[metric] for r in ok]
    ax.plot([r["speedup_theoretical"] for r in ok], y, "o-", label="theoretical (FLOPs)")
    ax.plot([r["speedup_measured"] for r in ok], y, "s--", label="measured (onnxruntime CPU)")
    for r, yy in zip(ok, y):
        for x, dy in ((r["speedup_theoretical"], 4), (r["speedup_measured"], -10)):
            ax.annotate(f"{r['speedup_target']:g}x", (x, yy), textcoords="offset points", xytext=(4, dy), fontsize=8)
    if metric == "accuracy_candidate" and ok:
        ax.axhline(100 * ok[0]["accuracy_reference"], color="grey", lw=0.8, ls=":", label="original accuracy")
    ax.set_xlabel("speed-up (x)")
    ax.set_ylabel(label)
    ax.set_title(title or "onnx-lowrank sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
