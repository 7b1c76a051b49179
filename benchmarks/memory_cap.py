"""Issue 17: peak memory of a whole compress of light ResNet-50 on 500 images of 224 x 224, per --max-memory.

The images are random crops (random scale, position, flip) of the photographs shipped in
scikit-image (:func:`common.photo_crops`), written once as PNG files to a temporary folder: the CLI
reads an image folder a batch at a time, so the 500 images are never one array in the measured
process. The model is onnx's ``light_resnet50.onnx`` with its placeholders materialised
(:mod:`light_models`). Each run is the CLI in a fresh child process; its peak resident memory is
the ``ru_maxrss`` that ``os.wait4`` reports for that child (its own peak, and any worker's).

Settings: the defaults (nonlinear, asymmetric, ``--max-memory 2G``, samples per image auto, batch 16)
except ``--objective flops --speedup 2`` (the default latency objective would time every rank of
every layer on this shared machine), ``--no-measure`` (the final latency comparison is not what
is measured here) and ``--schedule 2:0.01,2:1`` (4 instead of 50 iterations of the nonlinear solver:
the same arrays, so the same memory, in a twelfth of the solve time; ``--schedule ''`` for the
default). Rows per layer come from the report.

    python benchmarks/memory_cap.py [--images 500] [--caps 2G,512M,4G] [--repeats 1]

Writes benchmarks/results/memory_cap.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS, header, markdown_table, photo_crops, write_result  # noqa: E402
from light_models import materialise  # noqa: E402

MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def write_images(folder: Path, n: int, chunk: int = 50) -> None:
    """``n`` deterministic photo crops as PNG files (made ``chunk`` at a time; different seeds per chunk)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, chunk):
        for j, a in enumerate(photo_crops(min(chunk, n - start), size=224, seed=1000 + start // chunk)):
            Image.fromarray(a).save(folder / f"img{start + j:04d}.png")


def run_cli(model: Path, images: Path, cap: str, out_dir: Path, schedule: str | None) -> dict:
    return finish(start_cli(model, images, cap, out_dir, schedule))


def start_cli(model: Path, images: Path, cap: str, out_dir: Path, schedule: str | None) -> tuple:
    out, rep = out_dir / f"out.{cap}.onnx", out_dir / f"report.{cap}.json"
    cmd = [sys.executable, "-m", "onnx_lowrank.cli", "compress", str(model), "--calib", str(images),
           "--mean", MEAN, "--std", STD, "--objective", "flops", "--speedup", "2", "--no-measure",
           "--max-memory", cap, "-o", str(out), "--report", str(rep)] + (["--schedule", schedule] if schedule else [])
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    t0 = time.perf_counter()
    with open(out_dir / f"log.{cap}.txt", "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return p, t0, cmd, cap, out_dir, rep, model, images


def finish(started: tuple) -> dict:
    p, t0, cmd, cap, out_dir, rep, model, images = started
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    text = (out_dir / f"log.{cap}.txt").read_text()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"compress --max-memory {cap} failed (exit {os.waitstatus_to_exitcode(status)}, peak "
                         f"{usage.ru_maxrss / 1024:.0f} MB):\n{text[-3000:]}")
    report = json.loads(rep.read_text())
    phases = {m.group(1): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"^(.+?): done, .*? in ([\d.]+) s, peak (\d+) MB", text, re.M)}
    rows = {lay["name"]: lay.get("rows") for lay in report["layers"] if lay.get("rows")}
    return {"cap": cap, "wall_s": wall, "peak_mb": usage.ru_maxrss / 1024, "phases": phases, "rows": rows,
            "samples_bytes": report.get("samples_bytes"), "max_memory_bytes": report.get("max_memory_bytes"),
            "rows_limited_by_memory": report.get("rows_limited_by_memory"),
            "images": report.get("calibration_images"), "speedup_theoretical": report.get("speedup_theoretical"),
            "factorised": sum(lay["status"] == "factorised" for lay in report["layers"]),
            "cmd": " ".join(cmd[1:]).replace(str(model), "light_resnet50.onnx").replace(str(images), "IMAGES/")
                   .replace(str(out_dir) + "/", "")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--caps", default="2G,512M,4G", help="--max-memory values, one run each (first: default)")
    ap.add_argument("--schedule", default="2:0.01,2:1",
                    help="nonlinear schedule ('' = the default 25:0.01,25:1); same arrays, fewer iterations")
    ap.add_argument("--together", action="store_true",
                    help="run the caps at the same time (peaks are per process; wall times then load each other)")
    args = ap.parse_args()
    model = materialise("resnet50")
    runs = []
    with tempfile.TemporaryDirectory(prefix="memcap-") as tmp:
        folder = Path(tmp) / "images"
        write_images(folder, args.images)
        caps = args.caps.split(",")
        started = [start_cli(model, folder, cap, Path(tmp), args.schedule) for cap in caps] if args.together else []
        for i, cap in enumerate(caps):
            r = finish(started[i]) if args.together else run_cli(model, folder, cap, Path(tmp), args.schedule)
            print(f"--max-memory {cap}: {r['wall_s']:.0f} s, peak {r['peak_mb']:.0f} MB, samples "
                  f"{(r['samples_bytes'] or 0) / 2**20:.0f} MiB, limited {r['rows_limited_by_memory']}", flush=True)
            runs.append(r)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_cap.json").write_text(json.dumps(runs, indent=2))
    md = header(f"Peak memory of a compress: light ResNet-50, {args.images} images of 224 x 224 (issue 17)")
    md += (f"Each run: `python -m {runs[0]['cmd']}` with the --max-memory shown, in a fresh process; machine "
           "shared with other jobs (2 cores): wall times are noisy, memory is not" + (" (the runs ran at the same time)"
           if args.together else "") + ". Images: PNG crops of the "
           "scikit-image photographs, read from a folder a batch at a time. Peak = the child's ru_maxrss (os.wait4).\n\n")
    md += markdown_table(
        ["--max-memory", "peak RSS MB", "samples kept MiB", "rows limited by memory", "wall s", "images",
         "factorised", "FLOPs speed-up"],
        [[r["cap"], round(r["peak_mb"]), round((r["samples_bytes"] or 0) / 2**20), r["rows_limited_by_memory"],
          round(r["wall_s"]), r["images"], r["factorised"], r["speedup_theoretical"]] for r in runs]) + "\n\n"
    md += "Phases (seconds, peak MB of the process at the end of the phase, from the log's done lines):\n\n"
    names = list(dict.fromkeys(p for r in runs for p in r["phases"]))
    md += markdown_table(["phase"] + [r["cap"] for r in runs],
                         [[p] + [("%.0f s, %d MB" % r["phases"][p]) if p in r["phases"] else "-" for r in runs]
                          for p in names]) + "\n\n"
    md += "Rows fitted per layer:\n\n"
    layers = list(dict.fromkeys(n for r in runs for n in r["rows"]))
    md += markdown_table(["layer"] + [r["cap"] for r in runs],
                         [[n] + [r["rows"].get(n, "-") for r in runs] for n in layers]) + "\n"
    write_result("memory_cap", md)


if __name__ == "__main__":
    main()
