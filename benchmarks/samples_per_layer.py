"""How many sampled rows per output channel an asymmetric fit needs (issue 9, samples per layer).

The demo MNIST model at 4x, defaults otherwise (nonlinear + asymmetric), with few calibration
images (where samples run short) and with all 500. Sampling: the old fixed 10 positions per image,
a fixed 40, and ``auto`` with ``ROWS_PER_CHANNEL`` = M for several M (the per-layer positions per
image are then ``max(10, ceil(M d / fitted images))``, capped by the layer's positions). The symmetric
fit on the same samples is the reference the asymmetric one must beat. Logit NMSE and accuracy
against the fp32 original on the 1500 held-out digits.

Each setting is run with every seed given (the seed draws the sampled positions); NMSE is the mean
over seeds, with the range.

    python benchmarks/samples_per_layer.py [--images 80,500] [--rows 8,16,32] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, header, markdown_table, write_result  # noqa: E402

import onnx_lowrank.sampling_plan as samples  # noqa: E402
from onnx_lowrank import CompressConfig, Compressor  # noqa: E402
from onnx_lowrank.graph.loading import load_model  # noqa: E402
from onnx_lowrank import progress  # noqa: E402

DEMO = ROOT / "models" / "mnist_vgg"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="80,500")
    ap.add_argument("--rows", default="8,16,32", help="values of ROWS_PER_CHANNEL for 'auto'")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--speedup", type=float, default=4.0)
    args = ap.parse_args()
    progress.set_enabled(False)
    from onnx_lowrank import runtime

    with np.load(DEMO / "heldout.npz") as h:
        x, labels = h["input"], h["label"]

    def run(model):
        sess = runtime.session(model, runtime.TIMING)
        return np.concatenate([sess.run(None, {"input": x[i:i + 500]})[0] for i in range(0, len(x), 500)])

    ref = run(load_model(str(DEMO / "mnist_vgg.onnx")))
    settings = [("fixed 10", 10, None), ("fixed 40", 40, None)] + \
        [(f"auto, M={m}", "auto", m) for m in map(int, args.rows.split(","))]
    rows = []
    default_m = samples.ROWS_PER_CHANNEL
    seeds = [int(v) for v in args.seeds.split(",")]
    for n in map(int, args.images.split(",")):
        for label, k, m in settings:
            nmse, acc, secs = {True: [], False: []}, {True: [], False: []}, []
            for seed in seeds:
                samples.ROWS_PER_CHANNEL = m or default_m
                t = time.perf_counter()
                comp = Compressor(str(DEMO / "mnist_vgg.onnx"), str(DEMO / "calib.npz"),
                                           CompressConfig(samples_per_image=k, max_images=n, seed=seed,
                                                                   objective="flops", rank_multiple=1))
                res = {asym: comp.run(speedup=args.speedup, asymmetric=asym) for asym in (True, False)}
                secs.append(time.perf_counter() - t)
                samples.ROWS_PER_CHANNEL = default_m
                lays = [lay for lay in res[True].report["layers"] if lay["rows"]]
                ratio = min(lay["rows"] / lay["out_channels"] for lay in lays)
                mem = sum(v.nbytes for v in comp.samples.rows.values())
                for a, r in res.items():
                    o = run(r.model)
                    nmse[a].append(float(np.sum((o - ref) ** 2) / np.sum(ref ** 2)))
                    acc[a].append(100 * float((o.argmax(1) == labels).mean()))

            def spread(v):
                return f"{np.mean(v):.2e} ({min(v):.1e}-{max(v):.1e})" if len(v) > 1 else f"{v[0]:.2e}"

            rows.append([n, label, f"{ratio:.1f}", f"{mem / 2**20:.1f}", spread(nmse[True]), spread(nmse[False]),
                         f"{np.mean(nmse[False]) / np.mean(nmse[True]):.2f}", f"{np.mean(acc[True]):.2f}",
                         f"{np.mean(acc[False]):.2f}", f"{np.mean(secs):.0f}"])
            print(rows[-1], flush=True)
    md = header("Samples per layer: fitted rows per output channel vs asymmetric fit quality") + (
        f"Demo model at {args.speedup:g}x, nonlinear solver; `asym` = default asymmetric fit, `sym` = symmetric fit "
        "on the same samples. `min rows/d` = smallest fitted rows per output channel over the factorised layers; "
        "`samples MiB` = float32 samples kept for all layers. NMSE of the logits and accuracy against the "
        "original on the 1500 held-out digits. `s` = wall seconds for calibration and both fits (shared machine). "
        f"Seeds: {args.seeds}; NMSE = mean (min-max) over seeds, accuracy = mean.\n\n")
    md += markdown_table(["images", "sampling", "min rows/d", "samples MiB", "NMSE asym", "NMSE sym",
                          "sym/asym", "acc asym %", "acc sym %", "s"], rows)
    write_result("samples_per_layer", md)


if __name__ == "__main__":
    main()
