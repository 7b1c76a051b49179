"""How many images carry the KL distillation loss on the demo at 10x FLOPs, per temperature.

    python benchmarks/recover_kl_spread.py [--speedup 10] [--temperatures 1,2,4,8]

Hinton's loss T^2 KL(softmax(t / T) || softmax(s / T)) between the original (t) and the factorised
model (s), per image, on the calibration split recovery uses (every 5th image held back): its mean,
and the share of the sum that the largest one and three images carry; also the share of the output
NMSE that is a per-image shift of all logits (which no softmax sees). A confident teacher makes the
KL at low T a sum over a few images, so training and early stopping on it rest on those few.

Writes benchmarks/results/recover_kl_spread.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from onnx_lowrank import progress  # noqa: E402
from onnx_lowrank.compressor import Compressor  # noqa: E402
from onnx_lowrank.config import CompressConfig  # noqa: E402
from onnx_lowrank.runtime import CALIBRATION, run, session  # noqa: E402

DEMO = common.ROOT / "models" / "mnist_vgg"


def kl_rows(t: np.ndarray, s: np.ndarray, T: float) -> np.ndarray:
    """T^2 KL of the softened softmax, one value per row (float64, log-space)."""
    def log_softmax(z):
        z = z / T
        return z - (z.max(1, keepdims=True) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)))

    lp, lq = log_softmax(t), log_softmax(s)
    return T * T * (np.exp(lp) * (lp - lq)).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speedup", type=float, default=10.0)
    ap.add_argument("--temperatures", default="1,2,4,8")
    args = ap.parse_args()
    progress.set_enabled(False)
    calib = dict(np.load(DEMO / "calib.npz"))
    comp = Compressor(str(DEMO / "mnist_vgg.onnx"), calib,
                      CompressConfig(speedup=args.speedup, objective="flops", rank_multiple=1))
    fact = comp.run().model
    x = calib["input"]
    held = np.arange(len(x)) % 5 == 4
    out = {}
    rows = []
    teacher, student = session(comp.source_model, CALIBRATION, 1), session(fact, CALIBRATION, 1)
    for name, pick in [("fit", ~held), ("held back", held)]:
        t = run(teacher, ["logits"], {"input": x[pick]})[0].astype(np.float64)
        s = run(student, ["logits"], {"input": x[pick]})[0].astype(np.float64)
        top = 1.0 / np.exp(t - t.max(1, keepdims=True)).sum(1)      # the teacher's largest softmax probability
        shift = float((s - t).mean(1) @ (s - t).mean(1) * t.shape[1] / ((s - t) ** 2).sum())
        out[name] = {"images": int(pick.sum()), "agreement": float((t.argmax(1) == s.argmax(1)).mean()),
                     "teacher_top_prob_median": float(np.median(top)), "shift_share_of_nmse": shift, "kl": {}}
        for T in [float(v) for v in args.temperatures.split(",")]:
            k = np.sort(kl_rows(t, s, T))[::-1]
            out[name]["kl"][T] = {"mean": float(k.mean()), "top1": float(k[0] / k.sum()), "top3": float(k[:3].sum() / k.sum())}
            rows.append([name, f"{T:g}", f"{k.mean():.4f}", f"{k[0] / k.sum():.2f}", f"{k[:3].sum() / k.sum():.2f}"])
    md = common.header(f"Where the KL distillation loss sits on the demo at {args.speedup:g}x FLOPs")
    md += (f"The demo compressed as in benchmarks/recover.py (nonlinear + asymmetric, ranks multiples of 1); "
           f"the 500 calibration images split as recovery splits them ({out['fit']['images']} fit, "
           f"{out['held back']['images']} held back). Teacher's top softmax probability, median: "
           f"{out['fit']['teacher_top_prob_median']:.6f} (fit), {out['held back']['teacher_top_prob_median']:.6f} "
           f"(held back); top-1 agreement {out['fit']['agreement']:.3f} / {out['held back']['agreement']:.3f}. "
           f"Share of the output NMSE that is a per-image shift of all logits (invisible to any softmax): "
           f"{out['fit']['shift_share_of_nmse']:.3f} / {out['held back']['shift_share_of_nmse']:.3f}.\n\n")
    md += common.markdown_table(["images", "T", "mean T^2 KL", "share of the largest image",
                                 "share of the largest 3"], rows)
    common.write_result("recover_kl_spread", md)
    (common.RESULTS / "recover_kl_spread.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
