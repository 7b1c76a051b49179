"""FLOP-chosen vs latency-chosen ranks: measured speed-up on onnxruntime at 1 and 2 threads (issue 7).

Variants per model and target: ``flops/1`` (FLOP objective, any rank: the behaviour before issue 7),
``flops/16`` (FLOP objective, ranks multiples of 16) and ``latency/16`` (measured-latency objective,
the default). For each (model, target, threads) the original and all variants are timed together,
interleaved (``measure.bench``), so noise hits all alike; the table shows the median-based speed-ups
side by side, the latency objective's predicted speed-up and the prediction error. On the demo model
the held-out accuracy and top-1 agreement are measured as well, and the accuracy of FLOP-chosen ranks
is interpolated at the measured speed-up of the latency-chosen ones ("at equal measured speed-up").

Light zoo models (random He weights) use synthetic calibration and the linear solver: only latency
matters for them. Latency tables are written to .cache/latency_tables/ (a rerun reuses them).

    python benchmarks/latency_objective.py                   # full: about 20-30 min on 2 quiet cores
    python benchmarks/latency_objective.py --quick           # smoke test: demo model, 1 thread, short runs
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import light_models  # noqa: E402
from common import CACHE, RESULTS, ROOT, header, markdown_table, write_result  # noqa: E402

from onnx_lowrank import CompressConfig, Compressor  # noqa: E402
from onnx_lowrank.fidelity import evaluate  # noqa: E402
from onnx_lowrank.measure import bench  # noqa: E402
from onnx_lowrank.solver.ranks import RankSelectionError  # noqa: E402

DEMO = ROOT / "models" / "mnist_vgg"
VARIANTS = [("flops", 1), ("flops", 16), ("latency", 16)]
FULL = {"demo": [1.5, 2, 3, 4], "resnet50": [2, 3], "vgg19": [3]}


def vname(objective: str, multiple: int) -> str:
    return f"{objective}/{multiple}"


def _compressor(model: str, threads: int, latency_seconds: float) -> tuple[Compressor, dict | None]:
    tables = CACHE / "latency_tables"
    tables.mkdir(parents=True, exist_ok=True)
    if model == "demo":
        cfg = CompressConfig(threads=threads, latency_seconds=latency_seconds,
                             latency_table=str(tables / f"demo_t{threads}.json"))
        comp = Compressor(str(DEMO / "mnist_vgg.onnx"), str(DEMO / "calib.npz"), cfg)
        with np.load(DEMO / "heldout.npz") as z:
            held = ([{"input": z["input"][i:i + 500]} for i in range(0, len(z["input"]), 500)], z["label"])
        return comp, held
    path = light_models.materialise(model, CACHE)
    from onnx_lowrank import runtime

    name = runtime.session(path, runtime.TIMING).get_inputs()[0].name
    data = [{name: light_models.random_input(1, seed=i)} for i in range(8)]
    cfg = CompressConfig(threads=threads, method="linear", asymmetric=False, samples_per_image=20,
                         latency_seconds=latency_seconds, latency_table=str(tables / f"{model}_t{threads}.json"))
    return Compressor(str(path), data, cfg), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="Smoke test: demo model at 2x, 1 thread, few runs.")
    ap.add_argument("--models", default=None, help="Comma-separated subset of demo,resnet50,vgg19.")
    ap.add_argument("--threads", default=None, help="Comma-separated thread counts [1,2; quick: 1].")
    ap.add_argument("--runs", type=int, default=None, help="Interleaved rounds per comparison [30].")
    args = ap.parse_args()
    models = args.models.split(",") if args.models else (["demo"] if args.quick else list(FULL))
    threads_list = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    runs = args.runs or 30
    latency_seconds = 0.2 if args.quick else 1.0
    rows = []
    for model in models:
        targets = [2.0] if args.quick else FULL[model]
        for threads in threads_list:
            t0 = time.perf_counter()
            comp, held = _compressor(model, threads, latency_seconds)
            setup_s = time.perf_counter() - t0
            feed = comp.timing_feed()
            for s in targets:
                results = {}
                for objective, multiple in VARIANTS:
                    try:
                        results[vname(objective, multiple)] = comp.run(speedup=s, objective=objective,
                                                                       rank_multiple=multiple)
                    except RankSelectionError as err:
                        rows.append({"model": model, "threads": threads, "target": s,
                                     "variant": vname(objective, multiple),
                                     "status": f"unreachable (at most {err.max_speedup:.2f}x)"})
                        print(rows[-1], flush=True)
                names = list(results)
                if not names:
                    continue
                b = bench([comp.model] + [results[n].model for n in names], feed, threads=threads, runs=runs,
                          warmup=2)
                for k, n in enumerate(names, 1):
                    rep = results[n].report
                    row = {"model": model, "threads": threads, "target": s, "variant": n,
                           "flops_x": rep["speedup_theoretical"], "measured_x": b["speedup"][k],
                           "predicted_x": rep["predicted_latency_speedup"],
                           "table_x": rep["table_latency_speedup"],
                           "checks": len(rep["latency_checks"] or []),
                           "original_ms": b["models"][0]["median_ms"], "ms": b["models"][k]["median_ms"],
                           "factorised": sum(1 for lay in rep["layers"] if lay["status"] == "factorised"),
                           "setup_s": setup_s, "status": "ok"}
                    for err, x in (("prediction_error", "predicted_x"), ("table_error", "table_x")):
                        row[err] = row["measured_x"] / row[x] - 1 if row[x] else None
                    if held is not None:
                        ev = evaluate(comp.source_model, results[n].model, held[0], labels=held[1])
                        row["accuracy"] = 100 * ev["accuracy_candidate"]
                        row["accuracy_ref"] = 100 * ev["accuracy_reference"]
                        row["agreement"] = ev["top1_agreement"]
                    rows.append(row)
                    print(row, flush=True)
    _write(rows, args, runs)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _write(rows, args, runs):
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "latency_objective" + ("_quick" if args.quick else "") + \
        ("_" + "_".join(args.models.split(",")) if args.models else "") + \
        ("_t" + "_".join(args.threads.split(",")) if args.threads else "")
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    table_rows = []
    for r in rows:
        if r["status"] != "ok":
            table_rows.append([r["model"], r["threads"], f"{r['target']:g}x", r["variant"]] + ["-"] * 12
                              + [r["status"]])
            continue
        table_rows.append([r["model"], r["threads"], f"{r['target']:g}x", r["variant"], f"{r['flops_x']:.2f}",
                           _fmt(r["table_x"], ".2f"), _fmt(r["predicted_x"], ".2f"), f"{r['measured_x']:.2f}",
                           f"{r['measured_x'] / r['target']:.2f}", _fmt(r["table_error"], "+.1%"),
                           _fmt(r["prediction_error"], "+.1%"), r["checks"] or "-",
                           f"{r['original_ms']:.2f} -> {r['ms']:.2f}", r["factorised"],
                           _fmt(r.get("accuracy"), ".2f"), _fmt(r.get("agreement"), ".4f"), "ok"])
    threads = ",".join(str(t) for t in sorted({r["threads"] for r in rows}))
    md = header(f"Latency objective vs FLOP objective (issue 7), threads {threads}") + (
        f"Variants: objective/rank multiple. Speed-ups are medians of per-round ratios over {runs} interleaved rounds (original and "
        "the three variants timed together, batch 1, `measure.bench`). table = the latency objective's "
        "prediction from the timed layers alone (measured original minus the per-layer savings); predicted = "
        "the whole-model check of the ranks kept (stand-in weights, see `costs/latency.py`; checks = "
        "how many were run); errors = measured / predicted speed-up - 1. Light models: synthetic calibration, linear solver "
        "(random weights: fidelity meaningless).\n\n"
        + markdown_table(["model", "threads", "target", "variant", "FLOPs x", "table x", "predicted x", "measured x",
                          "measured / target", "table error", "prediction error", "checks", "ms", "layers",
                          "accuracy %", "agreement", "status"],
                         table_rows))
    md += "\n\n" + _equal_speedup(rows)
    write_result(name, md)


def _equal_speedup(rows) -> str:
    """Demo fidelity of FLOP-chosen ranks, interpolated at the measured speed-up of latency-chosen ones."""
    out = []
    for threads in sorted({r["threads"] for r in rows if r["model"] == "demo"}):
        demo = [r for r in rows if r["model"] == "demo" and r["threads"] == threads and r["status"] == "ok"]
        lat = sorted((r["measured_x"], r["accuracy"], r["agreement"]) for r in demo if r["variant"] == "latency/16")
        flo = sorted((r["measured_x"], r["accuracy"], r["agreement"]) for r in demo if r["variant"] == "flops/1")
        if len(flo) < 2 or not lat:
            continue
        xs = [p[0] for p in flo]
        for x, acc, agr in lat:
            if not xs[0] <= x <= xs[-1]:
                out.append(f"- demo, {threads} thread(s): latency ranks at measured {x:.2f}x lie outside the FLOP "
                           f"ranks' measured range {xs[0]:.2f}-{xs[-1]:.2f}x: no comparison")
                continue
            acc_f = float(np.interp(x, xs, [p[1] for p in flo]))
            agr_f = float(np.interp(x, xs, [p[2] for p in flo]))
            out.append(f"- demo, {threads} thread(s), measured {x:.2f}x: accuracy {acc:.2f}% (latency ranks) vs "
                       f"{acc_f:.2f}% (FLOP ranks, interpolated); top-1 agreement {agr:.4f} vs {agr_f:.4f}")
    return ("At equal measured speed-up (demo model):\n\n" + "\n".join(out) + "\n") if out else ""


if __name__ == "__main__":
    main()
