"""The output head kept whole or cut by the energy allocation: PP-OCRv4 recogniser, defaults (issue 15).

The same compression twice from one calibration file: the tool's default (automatic ranks keep the model's
output head whole, graph/heads.py) and ``--factorise-head`` (the head is allocated like any other layer, as
before). Each is evaluated on 300 held-out rendered lines (CER without spaces, as benchmarks/ppocr_rec.py),
and the original and both models are timed interleaved in the same rounds (batch 1, one thread).

    python benchmarks/head_layer.py                  # --speedup 1.5, latency objective, --threads 1

Writes ``benchmarks/results/head_layer.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import ppocr_rec as rec  # noqa: E402

SETTINGS = {"default (head kept)": {}, "--factorise-head": {"factorise_head": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speedup", type=float, default=1.5)
    ap.add_argument("--objective", default="latency", choices=["latency", "flops"])
    ap.add_argument("--calib", type=int, default=300)
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--runs", type=int, default=40, help="at least this many interleaved latency rounds")
    args = ap.parse_args()
    from onnx_lowrank import compress, progress
    from onnx_lowrank.measure import bench

    progress.set_enabled(False)
    model = rec.package_dir() / rec.MODEL_FILE
    chars = rec.character_list(model)
    _, calib = rec.make_lines(args.calib, seed=1, charset=set(chars[1:]))
    texts, eval_x = rec.make_lines(args.eval, seed=2, charset=set(chars[1:]))

    def cer(path) -> float:
        return rec.model_cer(path, eval_x, texts, chars)

    rows, tmp = [], Path(tempfile.mkdtemp())
    for label, extra in SETTINGS.items():
        t0 = time.perf_counter()
        res = compress(str(model), {"x": calib}, speedup=args.speedup, objective=args.objective, threads=1, **extra)
        seconds = time.perf_counter() - t0
        path = tmp / f"{len(rows)}.onnx"
        onnx.save(res.model, str(path))
        r = res.report
        head = [lay for lay in r["layers"] if lay["name"] == "p2o.MatMul.24"][0]
        rows.append({"setting": label, "cer": cer(path), "path": str(path), "compress_s": seconds,
                     "head_rank": head["rank"], "head_energy": head["energy_kept"], "head_rel_error": head["rel_error"],
                     "checked": r.get("predicted_latency_speedup"), "factorised": sum(
                         lay["status"] == "factorised" for lay in r["layers"]),
                     "ranks": {lay["name"]: lay["rank"] for lay in r["layers"] if lay["rank"]}})
    cer_orig = cer(model)
    b = bench([str(model)] + [row["path"] for row in rows], {"x": eval_x[:1]}, threads=1, min_runs=args.runs)
    for i, row in enumerate(rows):
        row["latency_ratio"] = b["speedup"][i + 1]
    md = common.header(f"Output head kept or cut: PP-OCRv4 recogniser, {args.speedup}x {args.objective}")
    md += (f"- {args.calib} calibration lines (seed 1), {args.eval} held-out lines (seed 2); tool defaults (energy "
           f"allocation, rank multiple 16, nonlinear asymmetric) at `--speedup {args.speedup} --objective "
           f"{args.objective} --threads 1`; original CER {cer_orig:.4f} (no spaces); original "
           f"{b['models'][0]['median_ms']:.2f} ms median, {b['rounds']} interleaved rounds, batch 1, 1 thread; load "
           f"average {os.getloadavg()[0]:.1f}\n\n")
    md += common.markdown_table(
        ["setting", "CER (no spaces)", "CER increase (points)", "head p2o.MatMul.24 rank", "head energy kept",
         "head rel. error (held back)", "checked x (whole model, stand-in weights)", "latency ratio (interleaved)",
         "factorised layers", "compress s"],
        [[r["setting"], f"{r['cer']:.4f}", f"{100 * (r['cer'] - cer_orig):.2f}", r["head_rank"] or "kept",
          "-" if r["head_energy"] is None else f"{r['head_energy']:.4f}",
          "-" if r["head_rel_error"] is None else f"{r['head_rel_error']:.4f}",
          "-" if r["checked"] is None else f"{r['checked']:.2f}", f"{r['latency_ratio']:.2f}", r["factorised"],
          f"{r['compress_s']:.0f}"] for r in rows])
    md += "\n\nRanks:\n\n" + "\n".join(f"- {r['setting']}: {r['ranks']}" for r in rows) + "\n"
    common.write_result("head_layer", md)
    (common.RESULTS / "head_layer.json").write_text(json.dumps({"cer_original": cer_orig, "rows": rows}, indent=1,
                                                               default=float))


if __name__ == "__main__":
    main()
