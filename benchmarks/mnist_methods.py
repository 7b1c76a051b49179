"""Method comparison on the demo MNIST model: linear / nonlinear, symmetric / asymmetric.

For each target speed-up and method: held-out accuracy (1500 real digits) and the NMSE of the
final logits against the original model. Calibration runs once (Compressor) and is shared.

    python benchmarks/mnist_methods.py [--speedups 2,4,6,10]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, header, markdown_table, write_result  # noqa: E402

from onnx_lowrank import CompressConfig, Compressor  # noqa: E402
from onnx_lowrank.fidelity import evaluate  # noqa: E402

DEMO = ROOT / "models" / "mnist_vgg"
METHODS = [("linear", False), ("linear", True), ("nonlinear", False), ("nonlinear", True)]


def name(method, asym):
    return method + ("+asym" if asym else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--speedups", default="2,4,6,10")
    args = ap.parse_args()
    speedups = [float(s) for s in args.speedups.split(",")]
    with np.load(DEMO / "heldout.npz") as z:
        x, labels = z["input"], z["label"]
    t0 = time.perf_counter()
    comp = Compressor(str(DEMO / "mnist_vgg.onnx"), str(DEMO / "calib.npz"), CompressConfig(objective="flops", rank_multiple=1))
    calib_s = time.perf_counter() - t0
    rows = []
    for s in speedups:
        for method, asym in METHODS:
            t = time.perf_counter()
            res = comp.run(speedup=s, method=method, asymmetric=asym)
            solve_s = time.perf_counter() - t
            ev = evaluate(comp.source_model, res.model, [{"input": x[i:i + 500]} for i in range(0, len(x), 500)],
                          labels=labels)
            rows.append({"speedup": s, "method": name(method, asym),
                         "theoretical": res.report["speedup_theoretical"],
                         "acc_ref": 100 * ev["accuracy_reference"], "acc": 100 * ev["accuracy_candidate"],
                         "drop": ev["accuracy_drop_points"], "nmse": ev["nmse"],
                         "agreement": ev["top1_agreement"], "solve_s": solve_s})
            print(rows[-1], flush=True)
    with open(RESULTS / "mnist_methods.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = markdown_table(
        ["target", "method", "theoretical x", "accuracy %", "drop (points)", "logit NMSE", "NMSE / linear NMSE",
         "top-1 agreement", "solve s"],
        [[f"{r['speedup']:g}x", r["method"], f"{r['theoretical']:.2f}", f"{r['acc']:.2f}", f"{r['drop']:.2f}",
          f"{r['nmse']:.3g}", f"{r['nmse'] / _linear(rows, r['speedup']):.3f}", f"{r['agreement']:.4f}",
          f"{r['solve_s']:.1f}"] for r in rows])
    target = []
    for s in speedups:
        if s >= 4:
            ratio = next(r["nmse"] for r in rows if r["speedup"] == s and r["method"] == "nonlinear+asym") / _linear(rows, s)
            target.append(f"{s:g}x: nonlinear+asym NMSE = {ratio:.3f} x linear NMSE "
                          f"({'meets' if ratio <= 0.2 else 'misses'} the <= 1/5 target)")
    md = header("Demo MNIST model: linear vs nonlinear, symmetric vs asymmetric") + (
        f"Original held-out accuracy {rows[0]['acc_ref']:.2f}% on 1500 digits; calibration: 500 digits, "
        f"10 positions per image, seed 0 (one calibration pass, {calib_s:.1f} s, shared by all rows). "
        "NMSE = sum||logits_c - logits_o||^2 / sum||logits_o||^2 over the held-out set.\n\n"
        + table + "\n\n" + "\n".join(f"- {t}" for t in target) + "\n")
    write_result("mnist_methods", md)


def _linear(rows, s):
    return next(r["nmse"] for r in rows if r["speedup"] == s and r["method"] == "linear")


if __name__ == "__main__":
    main()
