"""Graph coverage on real architectures: every ``light_*`` model of the onnx wheel (random He-normal
weights, see ``light_models.py``) through ``onnx-lowrank compress`` and ``onnx-lowrank bench``.

For each model: compress at ``--speedup 3`` (or, where 3 cannot be reached because too few Conv
FLOPs can be cut, the largest reachable target below it, found by trying 3, 2.5, 2, 1.5) with a
few real photo crops (ImageNet normalisation) as calibration data; then record whether it
worked, how many Convs were factorised / skipped, the theoretical speed-up, whether the output
shape matches, the max abs output difference against the original (random weights: no accuracy
meaning), compress wall time and the onnxruntime latency ratio.

    python benchmarks/light_coverage.py [--images 16] [--models vgg19,resnet50,...]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import light_models  # noqa: E402
from benchmarks import common  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
TARGETS = (3.0, 2.5, 2.0, 1.5)


def imagenet_batch(n: int, seed: int) -> np.ndarray:
    """``n`` photo crops, 224x224, NCHW float32 normalised like ImageNet."""
    x = common.photo_crops(n, 224, seed=seed).astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - MEAN) / STD).transpose(0, 3, 1, 2))


def input_name(path: Path) -> str:
    from onnx_lowrank import runtime

    return runtime.session(path, runtime.TIMING).get_inputs()[0].name


def cli(*args, timeout=None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "onnx_lowrank", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    return p, time.perf_counter() - t0


def output_diff(a: Path, b: Path, x: np.ndarray, name: str) -> tuple[bool, float]:
    from onnx_lowrank import runtime

    outs = []
    for m in (a, b):
        sess = runtime.session(m, runtime.TIMING, threads=2)
        outs.append([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    same = all(p.shape == q.shape for p, q in zip(*outs))
    diff = max(float(np.max(np.abs(p - q))) for p, q in zip(*outs)) if same else float("nan")
    return same, diff


def run_model(name: str, work: Path, images: int, samples: int, timeout: int, method: str) -> dict:
    row = {"model": name}
    path = light_models.materialise(name)
    inp = input_name(path)
    calib = work / f"{name}.calib.npz"
    np.savez(calib, **{inp: imagenet_batch(images, seed=0)})
    out = work / f"{name}.3x.onnx"
    report = work / f"{name}.report.json"
    targets = list(TARGETS)
    while targets:
        target = targets.pop(0)
        p, secs = cli("compress", path, "--calib", calib, "--speedup", target, "-o", out, "--report", report,
                      "--samples-per-image", samples, "--method", method, "--threads", 2, "-q",
                      "--objective", "flops", "--rank-multiple", 1, "--no-measure",
                      timeout=timeout)
        row.update(target=target, compress_s=secs, rc=p.returncode)
        if p.returncode == 0:
            break
        row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        if "speed" not in p.stderr.lower():  # a failure that a lower target would not fix
            break
        m = re.search(r"at most ([\d.]+)x is reachable", p.stderr)
        if m and float(m.group(1)) < min(targets or [0]) + 1e-9:  # below every fallback: just under the maximum
            targets = [math.floor(float(m.group(1)) * 98) / 100]
    if row["rc"] != 0:
        return row
    row.pop("error", None)
    rep = json.loads(report.read_text())
    layers = rep["layers"]
    row["convs"] = len(layers)
    row["factorised"] = sum(lay["status"] == "factorised" for lay in layers)
    row["skipped"] = row["convs"] - row["factorised"]
    row["speedup"] = rep["speedup_theoretical"]
    row["conv_speedup"] = rep["conv_speedup_theoretical"]
    saved = sum(lay["flops_before"] - lay["flops_after"] for lay in layers)
    row["flops_add_up"] = rep["flops_before"] - rep["flops_after"] == saved
    row["skip_reasons"] = sorted({lay["reason"] for lay in layers if lay["status"] != "factorised"})
    row["same_shape"], row["max_abs_diff"] = output_diff(path, out, imagenet_batch(4, seed=99), inp)
    import onnx

    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    row["checker"] = True
    b, _ = cli("bench", path, out, "--threads", 2, "--runs", 20, "--json", "-q", timeout=timeout)
    if b.returncode == 0:
        res = json.loads(b.stdout)
        row["ms_before"], row["ms_after"] = res["models"][0]["median_ms"], res["models"][1]["median_ms"]
        row["latency_ratio"] = res["speedup"][1]
    else:
        row["bench_error"] = (b.stderr.strip().splitlines() or ["?"])[-1][:300]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(light_models.NAMES))
    ap.add_argument("--images", type=int, default=16, help="calibration photo crops per model")
    ap.add_argument("--samples-per-image", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per CLI call")
    ap.add_argument("--method", default="nonlinear", choices=["nonlinear", "linear"])
    ap.add_argument("--json", type=Path, default=common.RESULTS / "light_coverage.json")
    ap.add_argument("--merge", action="store_true", help="keep the other models' rows from --json (re-run some)")
    args = ap.parse_args()
    rows = json.loads(args.json.read_text()) if args.merge and args.json.exists() else []
    rerun = set(args.models.split(","))
    rows = [r for r in rows if r["model"] not in rerun]
    with tempfile.TemporaryDirectory(prefix="light_cov.", dir=common.ROOT / ".cache" if (common.ROOT / ".cache").exists()
                                     else None) as tmp:
        for name in args.models.split(","):
            t0 = time.perf_counter()
            try:
                row = run_model(name, Path(tmp), args.images, args.samples_per_image, args.timeout, args.method)
            except subprocess.TimeoutExpired as exc:
                row = {"model": name, "rc": "timeout", "error": f"timed out after {exc.timeout:.0f} s"}
            except Exception as exc:  # record and go on with the next model
                row = {"model": name, "rc": "exception", "error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(row)
            print(f"{name}: {time.perf_counter() - t0:.0f}s {json.dumps(row)}", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
    order = {n: i for i, n in enumerate(light_models.NAMES)}
    write(sorted(rows, key=lambda r: order.get(r["model"], 99)), args)


def write(rows: list[dict], args) -> None:
    table = []
    for r in rows:
        ok = r.get("rc") == 0
        table.append([
            r["model"], "yes" if ok else f"no ({r.get('error', r.get('rc'))})",
            r.get("target", "-"), r.get("factorised", "-"), r.get("skipped", "-"),
            r.get("speedup", "-"), r.get("conv_speedup", "-"),
            {True: "yes", False: "NO"}.get(r.get("flops_add_up"), "-"),
            {True: "yes", False: "NO"}.get(r.get("same_shape"), "-"),
            r.get("max_abs_diff", "-"), r.get("compress_s", "-"),
            r.get("ms_before", "-"), r.get("ms_after", "-"), r.get("latency_ratio", r.get("bench_error", "-")),
        ])
    commit = subprocess.run(["git", "-C", str(common.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    md = common.header("Graph coverage on the onnx wheel's light_* model-zoo architectures")
    md += f"- onnx-lowrank at commit {commit} (when the table was written)\n\n"
    md += (f"Random He-normal weights (`benchmarks/light_models.py`): output differences have no accuracy "
           f"meaning; several of these random-weight models saturate their softmax (output std ~ 1/sqrt(1000)), so `max abs diff` is 0 (same one-hot) or 1 (different one-hot) there. Calibration: {args.images} photo crops (scikit-image photographs, ImageNet normalisation), "
           f"`--samples-per-image {args.samples_per_image}`, `--method {args.method}`, asymmetric (default), "
           f"`--threads 2`. `target` is the `--speedup` given: 3, or the largest of 2.5 / 2 / 1.5 that the model "
           "can reach (or just under the most it can reach, when that is below 1.5). Latency: `onnx-lowrank bench A B --threads 2 --runs 20` (median, batch 1); the machine is "
           "shared, so latencies are noisy. `max |diff|` is over 4 held-out crops of the softmax / final output.\n\n")
    md += common.markdown_table(
        ["model", "ok", "target", "factorised", "skipped", "speed-up (theor.)", "conv speed-up", "FLOPs add up",
         "same out shape", "max abs diff", "compress s", "ms before", "ms after", "latency ratio"], table)
    reasons = {r["model"]: r["skip_reasons"] for r in rows if r.get("skip_reasons")}
    if reasons:
        md += "\n\nSkip reasons:\n\n" + "\n".join(f"- {m}: {'; '.join(v)}" for m, v in reasons.items())
    common.write_result("light_coverage", md)


if __name__ == "__main__":
    main()
