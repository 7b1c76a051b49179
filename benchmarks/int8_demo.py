"""Static INT8 after factorisation, on the demo MNIST model (issue 9).

Models: the original in fp32 and INT8; the factorised model at each speed-up in fp32 and in INT8
with the intermediate channels balanced (the default), unbalanced (``balance=False``, the solver's
own scaling), deliberately skewed (each intermediate channel rescaled by a random 1e-3 .. 1e3,
the same function in fp32) and skewed then balanced. INT8 is onnxruntime's ``quantize_static`` (QDQ, per-channel int8
weights, int8 activations, MinMax calibration on the calibration digits). Accuracy on the 1500
held-out digits; latency ratios against the fp32 original from one interleaved run of all models
(medians), batch 1 and batch 16.

    python benchmarks/int8_demo.py [--speedups 2,4] [--quant-images 500] [--runs 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, header, markdown_table, write_result  # noqa: E402

import onnx_lowrank.solve as solve  # noqa: E402
from onnx_lowrank import CompressConfig, Compressor  # noqa: E402
from onnx_lowrank import progress  # noqa: E402
from onnx_lowrank.measure import bench  # noqa: E402
from onnx_lowrank.solver.balance import Balanced  # noqa: E402
from onnx_lowrank.solver.reconstruction import Factorisation  # noqa: E402

DEMO = ROOT / "models" / "mnist_vgg"
#: (activation type, calibration method) tried besides the main QInt8 / MinMax
OTHER_SETTINGS = [("QUInt8", "MinMax"), ("QInt8", "Percentile"), ("QInt8", "Entropy")]


def skew(f: Factorisation) -> Factorisation:
    rng = np.random.default_rng(f.rank)
    d = 10.0 ** rng.uniform(-3, 3, f.rank)
    return Factorisation(f.P * d, f.Q / d, f.b)


def quantise(src: Path, dst: Path, calib: np.ndarray, activations: str = "QInt8", method: str = "MinMax") -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 50]} for i in range(0, len(calib), 50)])

        def get_next(self):
            return next(self.it, None)

    logging.disable(logging.WARNING)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType[activations], weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod[method])
    logging.disable(logging.NOTSET)


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    from onnx_lowrank import runtime

    sess = runtime.session(path, runtime.TIMING)
    return np.concatenate([sess.run(None, {"input": x[i:i + 500]})[0] for i in range(0, len(x), 500)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--speedups", default="2,4")
    ap.add_argument("--quant-images", type=int, default=500, help="calibration digits for quantize_static")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    progress.set_enabled(False)
    with np.load(DEMO / "calib.npz") as c, np.load(DEMO / "heldout.npz") as h:
        calib, x, labels = c["input"][:args.quant_images], h["input"], h["label"]
    tmp = Path(tempfile.mkdtemp(prefix="int8_demo_"))
    models: list[tuple[str, str, Path]] = []      # (speed-up, variant, path)
    orig = DEMO / "mnist_vgg.onnx"
    models.append(("1 (original)", "fp32", orig))
    quantise(orig, tmp / "orig.int8.onnx", calib)
    models.append(("1 (original)", "int8", tmp / "orig.int8.onnx"))
    comp = Compressor(str(orig), str(DEMO / "calib.npz"), CompressConfig(objective="flops", rank_multiple=1))
    real_balance = solve.balance
    variants = [("balanced", real_balance), ("unbalanced", None),
                ("skewed", lambda f, yh: Balanced(skew(f), np.zeros(f.rank))),
                ("skewed, then balanced", lambda f, yh: real_balance(skew(f), yh))]
    for s in [float(v) for v in args.speedups.split(",")]:
        for name, fn in variants:
            solve.balance = fn or real_balance
            res = comp.run(speedup=s, balance=fn is not None)
            solve.balance = real_balance
            fp32 = tmp / f"s{s:g}_{name.replace(', ', '_')}.onnx"
            onnx.save(res.model, fp32)
            if name == "balanced":
                models.append((f"{s:g}", "fp32", fp32))
            int8 = fp32.with_suffix(".int8.onnx")
            quantise(fp32, int8, calib)
            models.append((f"{s:g}", f"int8 {name}", int8))
    ref = logits(orig, x)
    acc, nmse = {}, {}
    for _, _, p in models:
        out = logits(p, x)
        acc[p] = 100 * float((out.argmax(1) == labels).mean())
        nmse[p] = float(np.sum((out - ref) ** 2) / np.sum(ref ** 2))
    lat = {}
    for batch in (1, 16):
        feeds = [{"input": x[i:i + batch]} for i in range(0, 40 * batch, batch)]
        res = bench([str(p) for _, _, p in models], feeds, threads=args.threads, runs=args.runs, warmup=10)
        lat[batch] = res["speedup"]
    other = []
    last = [float(v) for v in args.speedups.split(",")][-1]
    for name in ("balanced", "unbalanced"):
        fp32 = tmp / f"s{last:g}_{name}.onnx"
        row = [f"{last:g}", name, f"{100 * float((logits(fp32, x).argmax(1) == labels).mean()):.2f}"]
        for act, method in OTHER_SETTINGS:
            dst = tmp / f"other_{name}_{act}_{method}.onnx"
            quantise(fp32, dst, calib, act, method)
            row.append(f"{100 * float((logits(dst, x).argmax(1) == labels).mean()):.2f}")
        other.append(row)
    rows = [[s, v, f"{acc[p]:.2f}", f"{nmse[p]:.2e}", f"{lat[1][i]:.2f}x", f"{lat[16][i]:.2f}x"]
            for i, (s, v, p) in enumerate(models)]
    md = header("INT8 after factorisation on the demo model") + (
        f"quantize_static: QDQ, per-channel int8 weights, int8 activations, MinMax over {len(calib)} calibration "
        f"digits. Accuracy on the 1500 held-out digits; NMSE of the logits against the fp32 original. Speed: "
        f"median latency of the fp32 original / median of the model, all models interleaved in one run "
        f"({args.runs} rounds, onnxruntime CPU, {args.threads} thread(s), real digits), batch 1 and batch 16. "
        "`skewed` = every intermediate channel of every factorised layer rescaled by 10^U(-3,3) "
        "(same function in fp32) and not balanced; `skewed, then balanced` = the same skew, then balanced.\n\n")
    md += markdown_table(["speed-up (FLOPs)", "model", "accuracy %", "logit NMSE", "speed b1", "speed b16"], rows)
    md += ("\n\nOther quantize_static settings (QDQ, per-channel int8 weights), held-out accuracy %, "
           "accuracy only:\n\n")
    md += markdown_table(["speed-up (FLOPs)", "factorised model", "fp32"] + [f"{a} {m}" for a, m in OTHER_SETTINGS],
                         other)
    write_result("int8_demo", md)


if __name__ == "__main__":
    main()
