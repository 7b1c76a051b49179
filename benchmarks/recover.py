"""Recovery by distillation (onnx-lowrank recover): what it gives back on held-out data it never saw.

    python benchmarks/recover.py demo [--lrs 3e-5,1e-4,3e-4,1e-3] [--augments auto,none] [--epochs 20]
                                      [--losses nmse,kl:1,kl:2,kl:4]
    python benchmarks/recover.py ppocr_rec [--speedup 2] [--objective latency] [--calib 300] [--eval 300]
    python benchmarks/recover.py det [--speedup 2] [--objective latency] [--calib 128] [--eval 64]
    python benchmarks/recover.py efficientnet [--speedup 1.3]     # after benchmarks/export_efficientnet_lite0.py

Each case compresses the model, then recovers it from the calibration data only (the teacher is
the original model, no labels), and evaluates original, factorised and recovered models on
held-out data: the demo's labelled heldout.npz; PP-OCRv4 recogniser lines rendered with another
seed (CER against the true text, spaces ignored); PP-OCRv4 detector pages of another seed (map F1 at
0.3 against the original's map, word recall); photo crops of another seed for EfficientNet
(top-1 agreement with the original). Recovery runs on one thread (the default).

Writes benchmarks/results/recover_<case>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from onnx_lowrank import progress  # noqa: E402
from onnx_lowrank.fidelity import evaluate  # noqa: E402
from onnx_lowrank.compressor import Compressor  # noqa: E402
from onnx_lowrank.config import CompressConfig  # noqa: E402
from onnx_lowrank.solver.ranks import RankSelectionError  # noqa: E402
from benchmarks.recover_common import (LEAD, bench_ratio, cached_target_compression, ci_text, lead,  # noqa: E402
                                       recover_rows, removed_share, target_text, write_refusal)

DEMO = common.ROOT / "models" / "mnist_vgg"


def demo(args) -> None:
    calib = dict(np.load(DEMO / "calib.npz"))
    held = dict(np.load(DEMO / "heldout.npz"))
    labels = held.pop("label")
    comp = Compressor(str(DEMO / "mnist_vgg.onnx"), calib,
                      CompressConfig(speedup=args.speedup, objective="flops", rank_multiple=1, scheme=args.scheme))
    fact = comp.run()
    print(f"compressed: {fact.report['speedup_theoretical']:.2f}x FLOPs")

    def ev(model):
        feeds = [{"input": held["input"][i:i + 250]} for i in range(0, len(labels), 250)]
        return evaluate(comp.source_model, model, feeds, labels=labels)

    base = ev(fact.model)
    def scores(model):
        e = ev(model)
        return {"accuracy": e["accuracy_candidate"], "drop": e["accuracy_drop_points"],
                "agreement": e["top1_agreement"], "nmse": e["nmse"]}

    load = [os.getloadavg()[0]]
    rows = recover_rows(comp.source_model, fact.model, calib, scores, args)
    load.append(os.getloadavg()[0])
    md = common.header(f"Recovery on the demo model (mnist_vgg): lr {args.lrs}, augment {args.augments}, "
                       f"train {args.train}, {args.epochs} epochs" + (f", loss {args.losses}" if args.losses != "nmse"
                                                                      else "")
                       + (f", scheme {args.scheme}" if args.scheme != "channel" else ""))
    md += (f"Compressed at {args.speedup}x FLOPs (nonlinear + asymmetric, ranks multiples of 1, scheme {args.scheme}"
           f"{_schemes_kept(fact.report)}): "
           f"{fact.report['speedup_theoretical']:.2f}x theoretical. Calibration 500 images (400 fit, 100 held back "
           f"for early stopping); evaluation on the 1500 labelled held-out images. Original accuracy "
           f"{100 * base['accuracy_reference']:.2f} %, factorised {100 * base['accuracy_candidate']:.2f} % "
           f"(drop {base['accuracy_drop_points']:.2f} points, agreement {base['top1_agreement']:.4f}, "
           f"NMSE {base['nmse']:.4f}). Up to {args.epochs} epochs, patience {args.patience}, batch {args.batch_size}, 1 thread; "
           f"load average (1 min) {load[0]:.1f} at the start of recovery, {load[1]:.1f} at the end. Held-back loss: "
           f"in the loss trained (nmse: output NMSE; kl:T: T^2 KL of the softmax at T) on the 100 held-back "
           f"calibration images; held-back NMSE: the same images' output NMSE, comparable across losses.\n\n")
    md += common.markdown_table(
        LEAD + ["accuracy %", "drop (points)", "agreement", "NMSE", "time s"],
        [[*lead(r), f"{100 * r['accuracy']:.2f}",
          f"{r['drop']:.2f}", f"{r['agreement']:.4f}", f"{r['nmse']:.4f}", f"{r['seconds']:.0f}"] for r in rows])
    if len(str(args.seed).split(",")) > 1:
        md += "\n\nOver the seeds, per setting:\n\n" + _summary(rows)
    common.write_result(f"recover_demo{args.tag}", md)
    (common.RESULTS / f"recover_demo{args.tag}.json").write_text(json.dumps({"baseline": {k: v for k, v in base.items()
                                                                             if not isinstance(v, list)},
                                                                "rows": rows}, indent=1, default=float))


def _schemes_kept(report: dict) -> str:
    """', kept: 3d 7' - how many layers each scheme took, from the compression report's layers."""
    kept: dict[str, int] = {}
    for layer in report.get("layers", []):
        if layer.get("scheme"):
            kept[layer["scheme"]] = kept.get(layer["scheme"], 0) + 1
    return (", kept: " + ", ".join(f"{k} {v}" for k, v in sorted(kept.items()))) if kept else ""


def _summary(rows: list[dict]) -> str:
    """Mean and range over seeds of each setting's accuracy drop, agreement and held-back NMSE."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["loss"], r["lr"], r["augment"], r["train"]), []).append(r)
    out = []
    for key, rs in groups.items():
        drop = [r["drop"] for r in rs]
        out.append([*key, len(rs), f"{np.mean(drop):.2f}", f"{min(drop):.2f} .. {max(drop):.2f}",
                    f"{np.mean([r['agreement'] for r in rs]):.4f}",
                    f"{np.mean([r['held_back_nmse_after'] for r in rs]):.4f}",
                    sum(r["epoch_kept"] > 0 for r in rs), f"{np.mean([r['seconds'] for r in rs]):.0f}"])
    return common.markdown_table(["loss", "lr", "augment", "train", "seeds", "mean drop (points)", "drop range",
                                  "mean agreement", "mean held-back NMSE after", "runs that kept an epoch > 0",
                                  "mean time s"], out)


def ppocr_rec(args) -> None:
    from benchmarks import ppocr_rec as rec

    model_path = rec.package_dir() / rec.MODEL_FILE
    chars = rec.character_list(model_path)
    charset = set(chars[1:])
    calib_texts, calib_x = rec.make_lines(args.calib, seed=1, charset=charset)
    eval_texts, eval_x = rec.make_lines(args.eval, seed=2, charset=charset)
    ref_paths = rec.argmax_paths(model_path, eval_x)
    cer_orig = rec.cer(eval_texts, [rec.ctc_decode(p, chars) for p in ref_paths], spaces=False)

    def evaluate(model):
        p = rec.argmax_paths(model, eval_x)
        hyps = [rec.ctc_decode(q, chars) for q in p]
        return {"cer_nospace": rec.cer(eval_texts, hyps, spaces=False), "path_agreement": float((p == ref_paths).mean())}

    title = f"Recovery on the PP-OCRv4 recogniser (rapidocr-onnxruntime 1.4.4), {args.speedup:g}x {args.objective}"
    try:
        fact_model, info = cached_target_compression("recover_ppocr_rec", model_path, "x", calib_x, args)
    except RankSelectionError as err:
        write_refusal(f"recover_ppocr_rec{args.tag}", title, "calibration lines (seed 1)", err, args)
        return
    import onnx

    original = onnx.load(str(model_path))
    lat = bench_ratio(original, fact_model, {"x": eval_x[:1]}, args.runs)
    base = evaluate(fact_model)
    print(f"compressed {info['speedup_theoretical']:.2f}x FLOPs, measured {lat['speedup']:.2f}x ({ci_text(lat)}), "
          f"CER {cer_orig:.4f} -> {base['cer_nospace']:.4f} ({info['seconds']:.0f} s)", flush=True)
    load = [os.getloadavg()[0]]
    rows = recover_rows(original, fact_model, {"x": calib_x}, evaluate, args)
    load.append(os.getloadavg()[0])
    target = target_text(info, args)
    md = common.header(f"{title}, lr {args.lrs}, augment {args.augments}")
    md += (f"Text lines as in benchmarks/ppocr_rec.py: {args.calib} calibration lines (seed 1; "
           f"{args.calib - args.calib // 5} fit, {args.calib // 5} held back for early stopping), {args.eval} "
           f"evaluation lines (seed 2, never seen by compression or recovery). Compressed at {target} with the "
           f"other defaults (nonlinear + asymmetric) in {info['seconds']:.0f} s: {info['speedup_theoretical']:.2f}x "
           f"FLOPs, **measured {lat['speedup']:.2f}x** (batch 1, 1 thread, {lat['rounds']} interleaved rounds, "
           f"{ci_text(lat)}{'' if lat['stable'] else ', not stable within 2 %'}: {lat['original_ms']:.1f} -> "
           f"{lat['compressed_ms']:.1f} ms). "
           f"CER without spaces: original {cer_orig:.4f}, factorised {base['cer_nospace']:.4f} "
           f"(CTC argmax agreement {base['path_agreement']:.4f}). Up to {args.epochs} epochs, patience "
           f"{args.patience}, batch {args.batch_size}, 1 thread, time limit {args.time_limit:g} s; load average (1 min) "
           f"{load[0]:.1f} at the start of recovery, {load[1]:.1f} at the end.\n\n")
    md += common.markdown_table(
        LEAD + ["CER (no spaces)",
         "share of CER increase removed", "CTC agreement", "recovery s"],
        [[*lead(r), f"{r['cer_nospace']:.4f}",
          f"{removed_share(cer_orig, base['cer_nospace'], r['cer_nospace']):.0%}", f"{r['path_agreement']:.4f}",
          f"{r['seconds']:.0f}"] for r in rows])
    common.write_result(f"recover_ppocr_rec{args.tag}", md)
    (common.RESULTS / f"recover_ppocr_rec{args.tag}.json").write_text(json.dumps(
        {"cer_original": cer_orig, "factorised": base, "compression": info, "latency": lat, "load": load,
         "rows": rows}, indent=1, default=float))


def ppocr_det(args) -> None:
    import onnx

    from benchmarks import ppocr_det as det

    model_path = det.package_dir() / det.MODEL_FILE
    calib_x, _ = det.make_pages(args.calib, seed=1, size=args.size)
    eval_x, eval_boxes = det.make_pages(args.eval, seed=2, size=args.size)
    ref = det.prob_maps(model_path, eval_x)
    recall_orig = det.word_recall(ref, eval_boxes)

    def evaluate(model):
        maps = det.prob_maps(model, eval_x)
        return {**det.map_agreement(ref, maps), "word_recall": det.word_recall(maps, eval_boxes)}

    title = f"Recovery on the PP-OCRv4 detector (rapidocr-onnxruntime 1.4.4), {args.speedup:g}x {args.objective}"
    try:
        fact_model, info = cached_target_compression("recover_ppocr_det", model_path, "x", calib_x, args)
    except RankSelectionError as err:
        write_refusal(f"recover_ppocr_det{args.tag}", title, f"calibration pages of {args.size}x{args.size} (seed 1)",
                       err, args)
        return
    original = onnx.load(str(model_path))
    base = evaluate(fact_model)
    print(f"compressed {info['speedup_theoretical']:.2f}x FLOPs, map F1 {base['f1']:.4f} ({info['seconds']:.0f} s)",
          flush=True)
    load = [os.getloadavg()[0]]
    recovered: list = []
    # Recovery data: the compression's pages, or --recover-pages fresh ones (seed 3) it never fitted.
    rec_x = det.make_pages(args.recover_pages, seed=3, size=args.size)[0] if args.recover_pages else calib_x
    rows = recover_rows(original, fact_model, {"x": rec_x}, evaluate, args, recovered)
    load.append(os.getloadavg()[0])
    # Latency after recovery: original, factorised and every recovered model in one interleaved bench.
    lat = bench_ratio(original, fact_model, {"x": eval_x[:1]}, args.runs, also=recovered)
    for r, a in zip(rows, lat["also"]):
        r["latency_speedup"] = a["speedup"]
    load.append(os.getloadavg()[0])
    print(f"measured {lat['speedup']:.2f}x ({ci_text(lat)})", flush=True)
    target = target_text(info, args)
    n_rec = args.recover_pages or args.calib
    fit = n_rec - n_rec // 5
    pages = (f"recovery on the same pages ({fit} fit, {n_rec - fit} held back for early stopping)"
             if not args.recover_pages else
             f"recovery on {n_rec} other pages (seed 3, never seen by the compression; {fit} fit, {n_rec - fit} "
             f"held back for early stopping)")
    md = common.header(f"{title}, lr {args.lrs}, augment {args.augments}, "
                       + (f"{n_rec} fresh pages" if args.recover_pages else "the calibration pages"))
    md += (f"Pages as in benchmarks/ppocr_det.py ({args.size}x{args.size}): {args.calib} calibration pages (seed 1), "
           f"{args.eval} evaluation pages (seed 2, never seen by compression or recovery); {pages}. Compressed at {target} with the other defaults (nonlinear + "
           f"asymmetric) in {info['seconds']:.0f} s: {info['speedup_theoretical']:.2f}x FLOPs, **measured "
           f"{lat['speedup']:.2f}x** (batch 1, 1 thread, {lat['rounds']} rounds interleaved with the original and "
           f"the recovered models, {ci_text(lat)}{'' if lat['stable'] else ', not stable within 2 %'}: "
           f"{lat['original_ms']:.1f} -> {lat['compressed_ms']:.1f} ms). Map F1 at {det.THRESH} against the "
           f"original: factorised {base['f1']:.4f} (IoU {base['iou']:.4f}, map MAE {base['mae']:.4g}); word recall "
           f"original {recall_orig:.4f}, factorised {base['word_recall']:.4f}. Up to {args.epochs} epochs, patience "
           f"{args.patience}, batch {args.batch_size}, 1 thread, time limit {args.time_limit:g} s; load average "
           f"(1 min) {load[0]:.1f} at the start of recovery, {load[1]:.1f} at its end, {load[2]:.1f} after the "
           f"bench.\n\n")
    md += common.markdown_table(
        LEAD + ["map F1", "share of F1 loss removed", "IoU", "map MAE", "word recall", "measured x", "recovery s"],
        [[*lead(r), f"{r['f1']:.4f}", f"{removed_share(1.0, base['f1'], r['f1']):.0%}", f"{r['iou']:.4f}",
          f"{r['mae']:.4g}", f"{r['word_recall']:.4f}", f"{r['latency_speedup']:.2f}", f"{r['seconds']:.0f}"]
         for r in rows])
    common.write_result(f"recover_ppocr_det{args.tag}", md)
    (common.RESULTS / f"recover_ppocr_det{args.tag}.json").write_text(json.dumps(
        {"word_recall_original": recall_orig, "factorised": base, "compression": info, "latency": lat,
         "load": load, "rows": rows}, indent=1, default=float))


def efficientnet(args) -> None:
    import onnx

    from benchmarks.efficientnet_lite0 import split_shared_shortcuts
    from benchmarks.export_efficientnet_lite0 import MODEL_PATH, export, preprocess

    original, _ = split_shared_shortcuts(onnx.load(str(export(MODEL_PATH))))
    calib = preprocess(common.photo_crops(args.calib, seed=1))
    evalx = preprocess(common.photo_crops(args.eval, seed=2))

    def evaluate_model(model):
        e = evaluate(original, model, [{"input": evalx[i:i + 50]} for i in range(0, len(evalx), 50)])
        return {"agreement": e["top1_agreement"], "nmse": e["nmse"]}

    fact_model, theoretical = _cached_compression(original, calib, args)
    base = evaluate_model(fact_model)
    print(f"compressed {theoretical:.2f}x FLOPs, agreement {base['agreement']:.4f}", flush=True)
    # Recovery data: the compression's crops, or --recover-crops fresh ones (seed 3) it never fitted.
    rec = preprocess(common.photo_crops(args.recover_crops, seed=3)) if args.recover_crops else calib
    rows = recover_rows(original, fact_model, {"input": rec}, evaluate_model, args)
    crops = f"{args.recover_crops} fresh crops" if args.recover_crops else "the calibration crops"
    md = common.header(f"Recovery on EfficientNet-Lite0 (ImageNet): lr {args.lrs}, augment {args.augments}, {crops}, "
                       f"warm-up {args.warmup if args.warmup else 'one epoch'}")
    md += (f"Photo crops as in benchmarks/efficientnet_lite0.py: {args.calib} calibration crops (seed 1; "
           f"{args.calib - args.calib // 5} fit, {args.calib // 5} held back), {args.eval} evaluation crops (seed 2, "
           f"never seen by compression or recovery); recovery on "
           f"{'the same crops' if not args.recover_crops else f'{args.recover_crops} other crops (seed 3, never seen by the compression; every 5th held back)'}; no labels, so top-1 agreement with the original. Compressed "
           f"at {args.speedup}x FLOPs (defaults, ranks multiples of 1): {theoretical:.2f}x "
           f"theoretical (factorised model cached in .cache/ after the first run); factorised: agreement {base['agreement']:.4f}, logit NMSE {base['nmse']:.4f}. Up to "
           f"{args.epochs} epochs, patience {args.patience}, batch {args.batch_size}, 1 thread, time limit {args.time_limit} s.\n\n")
    md += common.markdown_table(
        LEAD + ["top-1 agreement",
         "share of agreement loss removed", "logit NMSE", "recovery s"],
        [[*lead(r), f"{r['agreement']:.4f}",
          f"{removed_share(1.0, base['agreement'], r['agreement']):.0%}", f"{r['nmse']:.4f}", f"{r['seconds']:.0f}"]
         for r in rows])
    common.write_result(f"recover_efficientnet{args.tag}", md)
    (common.RESULTS / f"recover_efficientnet{args.tag}.json").write_text(json.dumps(
        {"factorised": base, "rows": rows}, indent=1, default=float))


def _cached_compression(original, calib: np.ndarray, args):
    """The factorised EfficientNet-Lite0 from .cache/ (the compression takes most of an hour on a busy
    2-core machine), made once per speedup and number of crops; returns it and its theoretical speedup."""
    import onnx

    path = common.CACHE / f"recover_efficientnet_{args.speedup:g}x_{args.calib}.onnx"
    side = path.with_suffix(".json")
    if not path.exists():
        t0 = time.perf_counter()
        fact = Compressor(original, {"input": calib}, CompressConfig(speedup=args.speedup, objective="flops",
                                                                     rank_multiple=1, threads=1)).run()
        print(f"compression {time.perf_counter() - t0:.0f} s", flush=True)
        common.CACHE.mkdir(exist_ok=True)
        onnx.save(fact.model, str(path))
        side.write_text(json.dumps({"speedup_theoretical": fact.report["speedup_theoretical"]}))
    return onnx.load(str(path)), json.loads(side.read_text())["speedup_theoretical"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="case", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--speedup", type=float, default=10.0)
    d.add_argument("--lrs", default="1e-4")
    d.add_argument("--augments", default="auto")
    d.add_argument("--epochs", type=int, default=20)
    d.add_argument("--patience", type=int, default=3)
    d.add_argument("--seed", default="0", help="comma-separated seeds; with several, a summary over them")
    d.add_argument("--tag", default="")
    d.add_argument("--scheme", default="channel", help="the compression's --scheme (channel, 3d, auto)")
    r = sub.add_parser("ppocr_rec")
    r.add_argument("--speedup", type=float, default=3.0)
    r.add_argument("--calib", type=int, default=300)
    r.add_argument("--eval", type=int, default=300)
    t = sub.add_parser("det")
    t.add_argument("--speedup", type=float, default=2.0)
    t.add_argument("--calib", type=int, default=128)
    t.add_argument("--eval", type=int, default=64)
    t.add_argument("--size", type=int, default=320, help="page side, a multiple of 32")
    t.add_argument("--recover-pages", type=int, default=0, help="recover on this many fresh pages (seed 3) "
                   "instead of the compression's calibration pages")
    e = sub.add_parser("efficientnet")
    e.add_argument("--speedup", type=float, default=1.3)
    e.add_argument("--calib", type=int, default=256)
    e.add_argument("--eval", type=int, default=500)
    e.add_argument("--recover-crops", type=int, default=0, help="recover on this many fresh crops (seed 3) "
                   "instead of the compression's calibration crops")
    for p in (r, t):
        p.add_argument("--runs", type=int, default=30, help="at least this many interleaved latency rounds")
        p.add_argument("--objective", default="flops", choices=["flops", "latency"],
                       help="what --speedup counts; latency: measured at --threads")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--rank-multiple", type=int, default=None, help="default: 1 (flops), the tool's (latency)")
    for p in (d, r, t, e):
        p.add_argument("--time-limit", type=float, default=540.0)
        p.add_argument("--train", default="factorised", choices=["factorised", "all"])
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--warmup", type=int, default=None, help="lr warm-up steps (default: one epoch)")
        p.add_argument("--losses", default="nmse", help="comma-separated losses: nmse, kl:T (KL at temperature T)")
    for p in (r, t, e):
        p.add_argument("--lrs", default="1e-4")
        p.add_argument("--augments", default="none", help="';'-separated settings, e.g. 'none;crop,noise'")
        p.add_argument("--epochs", type=int, default=5)
        p.add_argument("--patience", type=int, default=2)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--tag", default="")
    args = ap.parse_args()
    progress.set_enabled(False)
    {"demo": demo, "ppocr_rec": ppocr_rec, "det": ppocr_det, "efficientnet": efficientnet}[args.case](args)


if __name__ == "__main__":
    main()
