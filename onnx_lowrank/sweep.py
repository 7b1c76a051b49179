"""Compress at several speed-ups and measure each: the accuracy / latency trade-off as a table and a plot."""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from . import progress
from .budget import Budget, evaluate_against
from .files import atomic_path, save_figure
from .graph.loading import load_model, save_model_atomic
from .measure import bench, synthetic_feeds
from .calibration.batching import input_specs
from .compressor import Compressor
from .costs import COST_MODELS
from .solver.ranks import RankSelectionError

FIELDS = ["speedup_target", "objective", "speedup_theoretical", "speedup_predicted", "speedup_measured",
          "speedup_measured_q1", "speedup_measured_q3", "latency_rounds", "latency_ms", "latency_original_ms", "top1_agreement", "top5_overlap", "nmse", "accuracy_reference", "accuracy_candidate",
          "accuracy_drop_points", "layers_factorised", "status"]


def sweep(model, calib, eval_data, speedups: list[float], config, labels: str | None = None,
          runs: int | None = None, threads: int | None = None, batch: int = 1, executor: str = "local",
          workers: int | None = None) -> list[dict]:
    """One row per speed-up: theoretical and measured speed-up, fidelity (and accuracy with labels).

    Calibration (and the latency table) happen here once. With ``workers`` > 1 or ``executor="ray"``, each
    speed-up is compressed by a worker from the shipped samples and table files (``calib`` must be readable
    there: the asymmetric pass reads it); evaluation and timing stay on this machine.
    """
    source = load_model(model) if isinstance(model, (str, Path)) else model
    specs = input_specs(source)
    budget = Budget(eval_data, labels, preprocess=config.preprocess)
    budget.check_model(source)   # the evaluation data and labels are checked before calibration, not after it
    budget.inputs(specs)
    compressor = Compressor(source, calib, config)
    remote = executor != "local" or (workers or 1) > 1
    results = _remote_results(compressor, calib, speedups, executor, workers) if remote else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-sweep-") as tmp:
        original = os.path.join(tmp, "original.onnx")
        save_model_atomic(compressor.source_model, original)
        feeds = synthetic_feeds(original, batch=batch, shape_overrides=config.input_shapes or None)
        for i, s in enumerate(speedups):
            progress.log(f"sweep: --speedup {s:g}")
            try:
                res = results[i] if remote else compressor.run(speedup=s)
            except RankSelectionError as err:
                res = err.max_speedup
            if isinstance(res, float):
                rows.append({"speedup_target": s, "status": f"unreachable (at most {res:.3g}x)"})
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


def _remote_results(compressor: Compressor, calib, speedups: list[float], executor: str,
                    workers: int | None) -> list:
    """Each speed-up compressed by a worker: the samples and the latency table travel as files' bytes."""
    from .executors import get_executor, worker_threads

    ex = get_executor(executor, workers)
    cfg = replace(compressor.config, threads=compressor.config.threads or worker_threads(workers or len(speedups)))
    files = {"samples.npz": _file_bytes(lambda p: _samples_for_workers(compressor).save(p))}
    if COST_MODELS[cfg.objective].measures:  # workers read the timings instead of measuring them again
        table = _latency_for_workers(compressor, speedups)
        files["latency.json"] = _file_bytes(table.save)
    if isinstance(calib, (str, os.PathLike)):
        calib = str(Path(calib).resolve())
    model = compressor.source_model.SerializeToString()
    progress.status(f"sweep: {len(speedups)} compression(s) on the {ex.name} executor")
    return ex.map(_compress_task, [(model, calib, cfg, s, files) for s in speedups])


def _samples_for_workers(compressor: Compressor):
    samples = compressor.samples
    if not samples.fingerprint:
        samples.fingerprint = compressor.samples_fingerprint()
    return samples


def _latency_for_workers(compressor: Compressor, speedups: list[float]):
    """Every timing the speed-ups need, measured here (layers and whole-model checks), as one table."""
    from threadpoolctl import threadpool_limits

    from .plan import make_plan
    from .rank_choice import choose_ranks

    lat = None
    for s in speedups:
        cfg = replace(compressor.config, speedup=s)
        plan = make_plan(compressor.layers, compressor.flops, cfg)
        lat = compressor.costs(plan, cfg)
        with threadpool_limits(limits=1, user_api="blas"):
            try:
                choose_ranks(plan, compressor.samples, compressor.flops, cfg, lat)
            except RankSelectionError:
                pass
    return lat.table


def _file_bytes(write) -> bytes:
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-ship-") as tmp:
        path = os.path.join(tmp, "f")
        write(path)
        return Path(path).read_bytes()


def _compress_task(args):
    """In a worker: compress at one speed-up from shipped samples (and latency table); never times anything."""
    import onnx

    from .calibration.samples import Samples
    from .executors import NO_TIMING

    model, calib, cfg, speedup, files = args
    os.environ[NO_TIMING] = "1"
    progress.set_enabled(False)
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-task-") as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        if "latency.json" in files:
            cfg = replace(cfg, latency_table=os.path.join(tmp, "latency.json"))
        samples = Samples.load(os.path.join(tmp, "samples.npz"))
        try:
            return Compressor(onnx.load_from_string(model), calib, cfg, samples=samples).run(speedup=speedup)
        except RankSelectionError as err:   # exceptions with their own arguments do not unpickle: a number
            return err.max_speedup


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
    save_figure(fig, path)
