"""Recovery by distillation (onnx-lowrank recover): what it gives back on held-out data it never saw.

    python benchmarks/recover.py demo [--lrs 3e-5,1e-4,3e-4,1e-3] [--augments auto,none] [--epochs 20]
    python benchmarks/recover.py ppocr_rec [--speedup 2] [--calib 300] [--eval 300]
    python benchmarks/recover.py efficientnet [--speedup 1.3]

Each case compresses the model, then recovers it from the calibration data only (the teacher is
the original model, no labels), and evaluates original, factorised and recovered models on
held-out data: the demo's labelled heldout.npz; PP-OCRv4 recogniser lines rendered with another
seed (CER against the true text, spaces ignored); photo crops of another seed for EfficientNet
(top-1 agreement with the original). Recovery runs on one thread (the default).

Writes benchmarks/results/recover_<case>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from onnx_lowrank import progress  # noqa: E402
from onnx_lowrank.measure import evaluate  # noqa: E402
from onnx_lowrank.pipeline import CompressConfig, Compressor  # noqa: E402
from onnx_lowrank.recover import recover_models, RecoverConfig  # noqa: E402
from onnx_lowrank.calibration.inputs import open_source  # noqa: E402
from onnx_lowrank.pipeline import input_specs  # noqa: E402

DEMO = common.ROOT / "models" / "mnist_vgg"


def run_recovery(original, factorised, calib: dict, cfg: RecoverConfig):
    source = open_source(calib, input_specs(factorised))
    t0 = time.perf_counter()
    res = recover_models(original, factorised, source, cfg)
    return res, time.perf_counter() - t0


def demo(args) -> None:
    calib = dict(np.load(DEMO / "calib.npz"))
    held = dict(np.load(DEMO / "heldout.npz"))
    labels = held.pop("label")
    comp = Compressor(str(DEMO / "mnist_vgg.onnx"), calib,
                      CompressConfig(speedup=args.speedup, objective="flops", rank_multiple=1))
    fact = comp.run()
    print(f"compressed: {fact.report['speedup_theoretical']:.2f}x FLOPs")

    def ev(model):
        feeds = [{"input": held["input"][i:i + 250]} for i in range(0, len(labels), 250)]
        return evaluate(comp.source_model, model, feeds, labels=labels)

    base = ev(fact.model)
    rows = []
    for aug in args.augments.split(","):
        for lr in [float(v) for v in args.lrs.split(",")]:
            cfg = RecoverConfig(epochs=args.epochs, lr=lr, augment=aug, seed=args.seed, patience=args.patience)
            res, secs = run_recovery(comp.source_model, fact.model, calib, cfg)
            e = ev(res.model)
            rows.append({"lr": lr, "augment": aug, "epoch_kept": res.report["epoch_kept"],
                         "epochs_run": len(res.report["epochs"]) - 1,
                         "held_back_before": res.report["held_back_loss_before"],
                         "held_back_after": res.report["held_back_loss_after"],
                         "accuracy": e["accuracy_candidate"], "drop": e["accuracy_drop_points"],
                         "agreement": e["top1_agreement"], "nmse": e["nmse"], "seconds": secs,
                         "epochs": res.report["epochs"]})
            print({k: v for k, v in rows[-1].items() if k != "epochs"}, flush=True)
    md = common.header("Recovery on the demo model (mnist_vgg)")
    md += (f"Compressed at {args.speedup}x FLOPs (nonlinear + asymmetric, ranks multiples of 1): "
           f"{fact.report['speedup_theoretical']:.2f}x theoretical. Calibration 500 images (400 fit, 100 held back "
           f"for early stopping); evaluation on the 1500 labelled held-out images. Original accuracy "
           f"{100 * base['accuracy_reference']:.2f} %, factorised {100 * base['accuracy_candidate']:.2f} % "
           f"(drop {base['accuracy_drop_points']:.2f} points, agreement {base['top1_agreement']:.4f}, "
           f"NMSE {base['nmse']:.4f}). Up to {args.epochs} epochs, patience {args.patience}, batch 16, 1 thread.\n\n")
    md += common.markdown_table(
        ["lr", "augment", "epochs run", "epoch kept", "held-back loss before -> after", "accuracy %",
         "drop (points)", "agreement", "NMSE", "time s"],
        [[r["lr"], r["augment"], r["epochs_run"], r["epoch_kept"],
          f"{r['held_back_before']:.4f} -> {r['held_back_after']:.4f}", f"{100 * r['accuracy']:.2f}",
          f"{r['drop']:.2f}", f"{r['agreement']:.4f}", f"{r['nmse']:.4f}", f"{r['seconds']:.0f}"] for r in rows])
    common.write_result(f"recover_demo{args.tag}", md)
    (common.RESULTS / f"recover_demo{args.tag}.json").write_text(json.dumps({"baseline": {k: v for k, v in base.items()
                                                                             if not isinstance(v, list)},
                                                                "rows": rows}, indent=1, default=float))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="case", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--speedup", type=float, default=10.0)
    d.add_argument("--lrs", default="1e-4")
    d.add_argument("--augments", default="auto")
    d.add_argument("--epochs", type=int, default=20)
    d.add_argument("--patience", type=int, default=3)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tag", default="")
    args = ap.parse_args()
    progress.set_enabled(False)
    {"demo": demo}[args.case](args)


if __name__ == "__main__":
    main()
