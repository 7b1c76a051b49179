"""Energy vs sensitivity (or refined) allocation at the same target, side by side in one run (issue 15).

One Compressor (calibration once), then ``--allocation energy`` and the others of ``--allocations`` (default
sensitivity; ``energy,refined``: the solved energy choice refined by exchanges checked end to end) at the
same target and objective; each compressed model is evaluated on held-out data and the two (with the
original) are timed interleaved in the same rounds, batch 1, one thread.

    python benchmarks/allocation.py demo                      # demo MNIST, 4x FLOPs: accuracy loss
    python benchmarks/allocation.py ppocr_rec --speedup 1.5   # PP-OCRv4 recogniser, measured 1.5x: CER increase
    python benchmarks/allocation.py demo --allocations energy,refined

Writes ``benchmarks/results/allocation_<model>_<objective>_<speedup>.md`` and ``.json`` (with other
allocations than sensitivity: ``allocation_<them>_<model>_...``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_ALLOCATIONS = "energy,sensitivity"


def demo_setup(args):
    """Demo MNIST model: calibration = calib.npz, evaluation = 1500 labelled held-out digits."""
    d = common.ROOT / "models" / "mnist_vgg"
    with np.load(d / "heldout.npz") as z:
        x, labels = z["input"], z["label"]
    from onnx_lowrank.fidelity import evaluate

    def score(original, model):
        ev = evaluate(original, model, [{"input": x[i:i + 500]} for i in range(0, len(x), 500)], labels=labels)
        return {"accuracy": 100 * ev["accuracy_candidate"], "accuracy_original": 100 * ev["accuracy_reference"],
                "loss": ev["accuracy_drop_points"], "agreement": ev["top1_agreement"], "kl": ev["kl_divergence"]}

    return str(d / "mnist_vgg.onnx"), str(d / "calib.npz"), {"input": x[:1]}, score, \
        "accuracy loss (points, 1500 held-out digits)"


def ppocr_rec_setup(args):
    """PP-OCRv4 recogniser: rendered lines (benchmarks/ppocr_rec.py), CER without spaces."""
    import ppocr_rec as rec

    model_path = rec.package_dir() / rec.MODEL_FILE
    chars = rec.character_list(model_path)
    charset = set(chars[1:])
    _, calib_x = rec.make_lines(args.calib, seed=1, charset=charset)
    eval_texts, eval_x = rec.make_lines(args.eval, seed=2, charset=charset)
    ref = [rec.ctc_decode(p, chars) for p in rec.argmax_paths(model_path, eval_x)]
    cer_orig = rec.cer(eval_texts, ref, spaces=False)

    def score(original, model):
        hyps = [rec.ctc_decode(p, chars) for p in rec.argmax_paths(model, eval_x)]
        c = rec.cer(eval_texts, hyps, spaces=False)
        return {"cer": c, "cer_original": cer_orig, "loss": 100 * (c - cer_orig),
                "text_agreement": float(np.mean([a == b for a, b in zip(ref, hyps)]))}

    return str(model_path), {"x": calib_x}, {"x": eval_x[:1]}, score, \
        f"CER increase (points, no spaces, {args.eval} rendered lines)"


SETUPS = {"demo": demo_setup, "ppocr_rec": ppocr_rec_setup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(SETUPS))
    ap.add_argument("--speedup", type=float, default=None, help="default: 4 (demo), 1.5 (others)")
    ap.add_argument("--objective", default=None, help="default: flops (demo), latency (others)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", type=int, default=200)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--rank-multiple", type=int, default=16)
    ap.add_argument("--damage-passes", type=int, default=1)
    ap.add_argument("--damage-fit", default="linear", choices=["linear", "nonlinear"])
    ap.add_argument("--damage-metric", default="auto", choices=["auto", "nmse", "kl"])
    ap.add_argument("--allocations", default=DEFAULT_ALLOCATIONS,
                    help="comma-separated, energy first (the loss ratios are against it)")
    ap.add_argument("--exchange-rounds", type=int, default=4)
    ap.add_argument("--exchange-tries", type=int, default=4)
    ap.add_argument("--tag", default="", help="appended to the section name and title (e.g. a cold-cache rerun)")
    args = ap.parse_args()
    args.allocations = args.allocations.split(",")
    if args.allocations[0] != "energy" or len(args.allocations) < 2:
        ap.error("--allocations: energy first, then at least one other")
    demo = args.model == "demo"
    speedup = args.speedup or (4.0 if demo else 1.5)
    objective = args.objective or ("flops" if demo else "latency")

    from onnx_lowrank import measure
    from onnx_lowrank.graph.loading import save_model_atomic
    from onnx_lowrank import CompressConfig, Compressor

    model, data, feed, score, what = SETUPS[args.model](args)
    t0 = time.perf_counter()
    comp = Compressor(model, data, CompressConfig(speedup=speedup, objective=objective, threads=args.threads,
                                                  rank_multiple=args.rank_multiple))
    setup_s = time.perf_counter() - t0
    cache = common.CACHE / "allocation"
    cache.mkdir(parents=True, exist_ok=True)
    rows, paths = [], {"original": model}
    for alloc in args.allocations:
        t0 = time.perf_counter()
        res = comp.run(speedup=speedup, allocation=alloc, damage_passes=args.damage_passes,
                       damage_fit=args.damage_fit, damage_metric=args.damage_metric,
                       exchange_rounds=args.exchange_rounds, exchange_tries=args.exchange_tries)
        seconds = time.perf_counter() - t0
        path = cache / f"{args.model}.{objective}.{speedup:g}x.{alloc}.onnx"
        save_model_atomic(res.model, path)
        paths[alloc] = str(path)
        rep = res.report
        row = {"allocation": alloc, **score(comp.source_model, res.model), "compress_s": seconds,
               "theoretical": rep["speedup_theoretical"], "checked": rep["predicted_latency_speedup"],
               "ranks": {lay["name"]: lay["rank"] for lay in rep["layers"] if lay["rank"] is not None},
               "damage": {lay["name"]: lay["damage"] for lay in rep["layers"] if lay["damage"] is not None},
               "exchanges": rep.get("exchanges")}
        rows.append(row)
        if alloc == "sensitivity":
            from onnx_lowrank.damage_plot import damage_plot

            damage_plot(rep, common.RESULTS / f"allocation_{args.model}_{objective}_{speedup:g}x.png",
                        f"{args.model}: damage against saving per layer at {speedup:g}x {objective}")
        print({k: v for k, v in row.items() if k not in ("ranks", "damage", "exchanges")}, flush=True)
    names = list(paths)
    bench = measure.bench([paths[n] for n in names], feed, threads=1, runs=args.runs, warmup=5)
    lat = dict(zip(names, bench["models"]))
    for row in rows:
        row["latency_ratio"] = lat["original"]["median_ms"] / lat[row["allocation"]]["median_ms"]
    write(args, rows, what, speedup, objective, setup_s, lat)


def write(args, rows, what, speedup, objective, setup_s, lat) -> None:
    others = args.allocations[1:]
    tag = "" if ",".join(args.allocations) == DEFAULT_ALLOCATIONS else "_".join(others) + "_"
    name = f"allocation_{tag}{args.model}_{objective}_{speedup:g}x"
    if args.tag:
        name += "_" + args.tag.replace(" ", "_")
    energy = rows[0]
    table = common.markdown_table(
        ["allocation", what, "theoretical x", "checked x (whole model)", "latency ratio (1 thr, b1, interleaved)",
         "compress s", "factorised layers"],
        [[r["allocation"], r["loss"], r["theoretical"], r["checked"] if r["checked"] else "-", r["latency_ratio"],
          r["compress_s"], len(r["ranks"])] for r in rows])
    md = common.header(f"Allocation: energy vs {' and '.join(others)}, {args.model}, {speedup:g}x {objective}"
                       + (f", {args.tag}" if args.tag else ""))
    md += (f"- {args.calib if args.model != 'demo' else 500} calibration inputs, --threads {args.threads}, "
           f"--rank-multiple {args.rank_multiple}, damage: {args.damage_fit} fits, metric {args.damage_metric}, "
           f"{args.damage_passes} pass(es); exchanges: at most {args.exchange_rounds} round(s) of "
           f"{args.exchange_tries} measured proposal(s); setup (calibration, "
           f"latency tables) {setup_s:.0f}s; original {lat['original']['median_ms']:.2f} ms median "
           f"({args.runs} interleaved runs, machine shared with other jobs)\n\n")
    md += table + "\n\n"
    for r in rows[1:]:
        ratio = r["loss"] / energy["loss"] if energy["loss"] > 0 else float("nan")
        md += (f"Loss ratio {r['allocation']} / energy: **{ratio:.2f}** (goal: 0.5 or less); compress time ratio "
               f"{r['compress_s'] / energy['compress_s']:.2f} (limit 2)")
        ex = r.get("exchanges")
        if ex:  # refined = energy's pipeline + the exchange pass: what a compress from scratch (setup included) costs
            md += (f"; with the setup, energy's run + the exchange pass against energy's: "
                   f"{(setup_s + energy['compress_s'] + ex['seconds']) / (setup_s + energy['compress_s']):.2f}")
        md += "\n\n"
    for r in rows:
        md += f"- {r['allocation']}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()
                                                  if isinstance(v, float) and k not in ("loss",)) + "\n"
    for r in rows:
        ex = r.get("exchanges")
        if not ex:
            continue
        md += (f"\nExchanges ({r['allocation']}): {len(ex['taken'])} taken of {ex['layers_movable']} movable layers; "
               f"held-back damage ({ex.get('metric', '-')}, {ex.get('held_back_images', 0)} images) "
               f"{ex.get('damage_before', float('nan')):.4g} -> {ex.get('damage_after', float('nan')):.4g}; "
               f"{ex.get('evaluations', 0)} whole-model evaluations, {ex.get('solves', 0)} layer solves, "
               f"{ex['seconds']:.1f} s\n\n")
        for t in ex["taken"]:
            ranks = "; ".join(f"{n} {a} -> {b or 'whole'}" for n, (a, b) in t["ranks"].items())
            md += f"- {ranks}: damage {t['damage_before']:.4g} -> {t['damage_after']:.4g}\n"
    common.write_result(name, md)
    (common.RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
