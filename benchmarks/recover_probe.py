"""A fast look at why recovery makes EfficientNet-Lite0 worse (issue 16): a small compression, cached,
and short recoveries under several augmentations and learning rates, with the fit loss before training.

    python benchmarks/recover_probe.py [--calib 64] [--method linear] [--runs "none;auto;crop;noise;zoom;mixup;cutmix"]
        [--lrs 1e-4] [--epochs 3]

Compression: 1.3x FLOPs, ranks multiples of 1, ``--calib`` photo crops (seed 1), one thread; the
factorised model is kept in .cache/ for later runs. Each recovery reports, per epoch, the fit loss
(epoch 0: the factorised model on the unaugmented fit images; later epochs: on the augmented batches
trained on) and the held-back loss (every 5th crop, as the solver held them back). Writes
benchmarks/results/recover_probe.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from onnx_lowrank import progress  # noqa: E402
from onnx_lowrank.calibration.batching import input_specs  # noqa: E402
from onnx_lowrank.calibration.inputs import open_source  # noqa: E402
from onnx_lowrank.compressor import Compressor  # noqa: E402
from onnx_lowrank.config import CompressConfig  # noqa: E402
from onnx_lowrank.recover import RecoverConfig, recover_models  # noqa: E402


def factorised(original, calib, n: int, method: str):
    import onnx

    path = common.CACHE / f"recover_probe_{method}_{n}.onnx"
    if not path.exists():
        fact = Compressor(original, {"input": calib}, CompressConfig(speedup=1.3, objective="flops", rank_multiple=1,
                                                                     method=method, threads=1)).run()
        onnx.save(fact.model, str(path))
    return onnx.load(str(path))


def main() -> None:
    import onnx

    from benchmarks.efficientnet_lite0 import split_shared_shortcuts
    from benchmarks.export_efficientnet_lite0 import MODEL_PATH, export, preprocess

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--method", default="linear")
    ap.add_argument("--runs", default="none;auto;crop;noise;zoom;mixup;cutmix")
    ap.add_argument("--lrs", default="1e-4")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    progress.set_enabled(False)
    original, _ = split_shared_shortcuts(onnx.load(str(export(MODEL_PATH))))
    calib = preprocess(common.photo_crops(args.calib, seed=1))
    fact = factorised(original, calib, args.calib, args.method)
    rows = []
    for aug in args.runs.split(";"):
        for lr in [float(v) for v in args.lrs.split(",")]:
            t0 = time.perf_counter()
            rep = recover_models(original, fact, open_source({"input": calib}, input_specs(fact)),
                                 RecoverConfig(epochs=args.epochs, lr=lr, augment=aug, patience=args.epochs)).report
            rows.append({"augment": aug, "lr": lr, "seconds": time.perf_counter() - t0, "epochs": rep["epochs"]})
            print(aug, lr, [(round(e["fit_loss"], 4), round(e["held_back_loss"], 4)) for e in rep["epochs"]], flush=True)
    md = common.header(f"Recovery probe on EfficientNet-Lite0: {args.calib} crops, {args.method} compression at 1.3x")
    md += (f"{args.calib} calibration crops (seed 1): {args.calib - args.calib // 5} fit, {args.calib // 5} held back. "
           f"Compressed at 1.3x FLOPs, method {args.method}, ranks multiples of 1; recovery {args.epochs} epochs, "
           "batch 16, 1 thread, no early stop. Cells: fit loss / held-back loss (output NMSE against the original); "
           "epoch 0 is before training, on the unaugmented images; later fit losses are on the augmented batches.\n\n")
    md += common.markdown_table(["augment", "lr"] + [f"epoch {i}" for i in range(args.epochs + 1)] + ["time s"],
                                [[r["augment"], f"{r['lr']:g}"] + [f"{e['fit_loss']:.4f} / {e['held_back_loss']:.4f}"
                                                                  for e in r["epochs"]] + [f"{r['seconds']:.0f}"]
                                 for r in rows])
    common.write_result("recover_probe", md)
    (common.RESULTS / "recover_probe.json").write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
