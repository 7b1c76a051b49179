"""Tool cost: wall time and peak memory of compressing VGG-19 (224x224) from 500 calibration images.

Target (issue): ``onnx-lowrank compress light_vgg19.onnx`` with the defaults (nonlinear +
asymmetric), 500 photo crops (ImageNet normalisation), ``--samples-per-image 20``,
``--speedup 3`` in <= 15 minutes and <= 8 GB peak RSS on 2 cores.

The CLI runs in a subprocess under ``/usr/bin/time -v`` (peak RSS; falls back to
``getrusage(RUSAGE_CHILDREN)``). The child is the ordinary CLI (``onnx_lowrank.cli.main``) with
light timers wrapped around the pipeline's phases (calibration pass, rank selection, asymmetric
propagation, per-layer solve, rewrite, validation, save), so the breakdown comes from the same
run that is timed; ``--cprofile`` adds a cProfile dump of the child.

    python benchmarks/tool_cost.py --images 50 --cprofile      # small run: breakdown + extrapolation
    nohup python benchmarks/tool_cost.py --images 500 &         # the target run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

TARGET_S = 15 * 60
TARGET_GB = 8.0


# ---------------------------------------------------------------- child: the CLI with phase timers
def _child(cli_args: list[str], timings_path: str, cprofile: str | None) -> int:
    import onnx_lowrank.graph.loading as loading
    import onnx_lowrank.compressor as pl
    import onnx_lowrank.solve as sv
    import onnx_lowrank.solver.layer as solver_layer
    from onnx_lowrank.calibration.sampling import sample_key
    import onnx_lowrank.solver.reconstruction as rec
    from onnx_lowrank.calibration import sampling

    t: dict[str, float] = defaultdict(float)
    n: dict[str, int] = defaultdict(int)
    layers: list[dict] = []
    t_start = time.perf_counter()

    def timed(owner, attr, key):
        fn = getattr(owner, attr, None)
        if fn is None:  # the package changed: time what still exists
            print(f"tool_cost: no {attr} to time", file=sys.stderr)
            return

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                t[key] += time.perf_counter() - t0
                n[key] += 1
        setattr(owner, attr, wrapper)

    for owner, attr, key in [
        (pl, "load_model", "load"), (pl, "normalise", "normalise"), (pl, "infer_value_types", "shape inference"),
        (pl, "collect_original", "calibration pass (original model)"), (pl, "choose_ranks", "rank selection"),
        (sv, "_solve_asymmetric", "asymmetric total"), (sampling.Propagator, "transform", "propagation: transform"),
        (sampling.Propagator, "_sample", "propagation: sampling"), (sampling, "session", "ORT session creation"),
        (solver_layer, "nonlinear_reconstruction", "solver: nonlinear"),
        (solver_layer, "linear_reconstruction", "solver: linear init"),
        (rec, "_top_eigvecs", "solver: eigh (in fit)"), (pl, "rewrite_convs", "rewrite"), (pl, "_validate", "validate"),
        (loading, "save_model_atomic", "save"),
    ]:
        timed(owner, attr, key)

    solve = sv._solve

    def solve_timed(p, original, approximated, cfg, plain=None):
        t0 = time.perf_counter()
        solved = solve(p, original, approximated, cfg, plain)
        dt = time.perf_counter() - t0
        t["solve (all layers)"] += dt
        layers.append({"name": p.layer.name, "c": p.layer.in_channels, "d": p.layer.out_channels, "rank": p.rank,
                       "rows": int(len(original.rows[sample_key(p.layer.output, p.layer_id)])),
                       "seconds": round(dt, 2)})
        return solved
    sv._solve = solve_timed

    from onnx_lowrank.cli import main

    rc = 0
    prof = None
    if cprofile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    try:
        main.main(cli_args, standalone_mode=False)
    except SystemExit as e:
        rc = e.code or 0
    finally:
        if prof:
            prof.disable()
            prof.dump_stats(cprofile)
        t["total (in process)"] = time.perf_counter() - t_start
        Path(timings_path).write_text(json.dumps({"phases": t, "calls": n, "layers": layers}, indent=1))
    return int(rc)


# ---------------------------------------------------------------- parent
def calib_npz(images: int) -> Path:
    import numpy as np

    from light_coverage import imagenet_batch
    from benchmarks import common

    path = common.CACHE / f"tool_cost_calib{images}.npz"
    if not path.exists():
        common.CACHE.mkdir(parents=True, exist_ok=True)
        x = np.concatenate([imagenet_batch(min(100, images - i), seed=1000 + i) for i in range(0, images, 100)])
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, data_0=x)
        os.replace(tmp, path)
    return path


def run(images: int, samples: int, speedup: float, cprofile: bool, tag: str) -> dict:
    import light_models
    from benchmarks import common

    model = light_models.materialise("vgg19")
    calib = calib_npz(images)
    work = common.CACHE / f"tool_cost_{tag}"
    work.mkdir(parents=True, exist_ok=True)
    out, report, timings = work / "vgg19.3x.onnx", work / "report.json", work / "timings.json"
    prof = work / "child.prof" if cprofile else None
    cli_args = ["compress", str(model), "--calib", str(calib), "--speedup", str(speedup), "--samples-per-image",
                str(samples), "--max-images", str(images), "-o", str(out), "--report", str(report),
                "--objective", "flops", "--rank-multiple", "1", "--no-measure"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(timings), str(prof or ""), "--", *cli_args]
    gnu_time = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if gnu_time:
        cmd = [gnu_time, "-v", *cmd]
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    # Streamed to files, so the progress of a run stopped early can still be read.
    with open(work / "stdout.txt", "w") as out_f, open(work / "stderr.txt", "w") as err_f:
        p = subprocess.run(cmd, stdout=out_f, stderr=err_f, text=True)
    wall = time.perf_counter() - t0
    p.stderr = (work / "stderr.txt").read_text()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    peak_kb = int(m.group(1)) if m else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cpu = [float(v) for v in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", p.stderr)]
    res = {"images": images, "samples_per_image": samples, "speedup": speedup, "rc": p.returncode, "wall_s": wall,
           "peak_rss_gb": peak_kb / 1024 ** 2, "work": str(work)}
    if cpu:
        res["cpu_s"] = sum(cpu)
    if timings.exists():
        res["timings"] = json.loads(timings.read_text())
    if report.exists():
        rep = json.loads(report.read_text())
        res["speedup_theoretical"] = rep["speedup_theoretical"]
        res["factorised"] = sum(lay["status"] == "factorised" for lay in rep["layers"])
        res["flops_add_up"] = rep["flops_before"] - rep["flops_after"] == sum(
            lay["flops_before"] - lay["flops_after"] for lay in rep["layers"])
    if prof and prof.exists():
        import io
        import pstats

        s = io.StringIO()
        pstats.Stats(str(prof), stream=s).sort_stats("tottime").print_stats(15)
        res["cprofile_top"] = s.getvalue()[-6000:]
    (work / "result.json").write_text(json.dumps(res, indent=1))
    return res


def _phase_rows(res: dict) -> list[list]:
    ph = res.get("timings", {}).get("phases", {})
    solve = ph.get("solve (all layers)", 0.0)
    asym = ph.get("asymmetric total", 0.0)
    rows = []
    for key in ["load", "normalise", "shape inference", "calibration pass (original model)", "rank selection"]:
        rows.append([key, ph.get(key, 0.0)])
    rows.append(["asymmetric propagation (ORT segments + cache I/O + transform + sampling)", asym - solve])
    rows.append(["  of which propagation: transform (cached Conv outputs -> P Q^T y + b)",
                 ph.get("propagation: transform", 0.0)])
    rows.append(["  of which propagation: sampling", ph.get("propagation: sampling", 0.0)])
    rows.append(["per-layer solve, all layers", solve])
    rows.append(["  of which nonlinear solver", ph.get("solver: nonlinear", 0.0)])
    rows.append(["  of which eigh inside the M step", ph.get("solver: eigh (in fit)", 0.0)])
    for key in ["rewrite", "validate", "save", "total (in process)"]:
        rows.append([key, ph.get(key, 0.0)])
    return rows


def write_md(results: list[dict]) -> None:
    from benchmarks import common

    md = common.header("Tool cost: VGG-19 (light_vgg19, 224x224), defaults (nonlinear + asymmetric), --speedup 3")
    md += (f"Target: <= {TARGET_S // 60} min wall and <= {TARGET_GB:g} GB peak RSS on 2 cores for 500 calibration "
           "images at `--samples-per-image 20`. Calibration: photo crops of the scikit-image photographs, ImageNet "
           "normalisation, in one .npz. Peak RSS from `/usr/bin/time -v` on the CLI process. The machine is shared: "
           "see the notes below for the load during each run; CPU times are given alongside wall times.\n\n")
    rows = []
    for r in results:
        if "cpu_s" not in r and (Path(r["work"]) / "stderr.txt").exists():
            cpu = re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", (Path(r["work"]) / "stderr.txt").read_text())
            if cpu:
                r["cpu_s"] = sum(float(v) for v in cpu)
        rows.append([r["images"], r["samples_per_image"], r["rc"], r["wall_s"], r.get("cpu_s", "-"), r["peak_rss_gb"],
                     r.get("speedup_theoretical", "-"), r.get("factorised", "-"),
                     {True: "yes", False: "NO"}.get(r.get("flops_add_up"), "-")])
    md += common.markdown_table(["images", "samples/img", "exit", "wall s", "CPU s (user+sys)", "peak RSS GB",
                                 "speed-up (theor.)", "convs factorised", "FLOPs add up"], rows)
    for r in results:
        if r.get("timings"):
            md += f"\n\n### Where the time goes ({r['images']} images)\n\n"
            md += common.markdown_table(["phase", "seconds"], _phase_rows(r))
            lay = r["timings"].get("layers", [])
            if lay:
                md += "\n\nPer-layer solve (seconds; rows = sampled positions):\n\n"
                md += common.markdown_table(["layer", "c", "d", "rank", "rows", "seconds"],
                                            [[x["name"], x["c"], x["d"], x["rank"], x["rows"], x["seconds"]] for x in lay])
    common.write_result("tool_cost", md)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--write":
        from benchmarks import common

        results = [json.loads(p.read_text()) for p in sorted(common.CACHE.glob("tool_cost_n*/result.json"),
                                                               key=lambda p: int(p.parent.name[11:]))]
        write_md(results)
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        timings, prof = sys.argv[2], sys.argv[3] or None
        return _child(sys.argv[5:], timings, prof)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--samples-per-image", type=int, default=20)
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--cprofile", action="store_true")
    args = ap.parse_args()
    res = run(args.images, args.samples_per_image, args.speedup, args.cprofile, f"n{args.images}")
    print(json.dumps({k: v for k, v in res.items() if k != "cprofile_top"}, indent=1))
    print(res.get("cprofile_top", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
