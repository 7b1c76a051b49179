"""Issue 17: peak memory of a whole compress of light ResNet-50 on 500 images of 224 x 224, per --max-memory.

The images are random crops (random scale, position, flip) of the photographs shipped in
scikit-image (:func:`common.photo_crops`), written once as PNG files to a temporary folder: the CLI
reads an image folder a batch at a time, so the 500 images are never one array in the measured
process. The model is onnx's ``light_resnet50.onnx`` with its placeholders materialised
(:mod:`light_models`). Each run is the CLI in a fresh child process; its peak resident memory is
the ``ru_maxrss`` that ``os.wait4`` reports for that child (its own peak, and any worker's); its VmRSS is
also read from /proc every 0.2 s and put down to the phase the log is in (peak per phase, and the log's
last line at the overall peak): independent of the tool's own accounting.

Settings: the defaults (nonlinear, asymmetric, ``--max-memory 2G``, samples per image auto, batch 16)
except ``--objective flops --speedup 2`` (the default latency objective would time every rank of
every layer on this shared machine), ``--no-measure`` (the final latency comparison is not what
is measured here) and ``--schedule 2:0.01,2:1`` (4 instead of 50 iterations of the nonlinear solver:
the same arrays, so the same memory, in a twelfth of the solve time; ``--schedule ''`` for the
default). Rows per layer come from the report.

    python benchmarks/memory_cap.py [--images 500] [--caps 2G,512M,4G] [--together] [--name memory_cap]

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


def start_cli(model: Path, images: Path, cap: str, out_dir: Path, schedule: str | None) -> dict:
    out, rep = out_dir / f"out.{cap}.onnx", out_dir / f"report.{cap}.json"
    cmd = [sys.executable, "-m", "onnx_lowrank.cli", "compress", str(model), "--calib", str(images),
           "--mean", MEAN, "--std", STD, "--objective", "flops", "--speedup", "2", "--no-measure",
           "--max-memory", cap, "-o", str(out), "--report", str(rep)] + (["--schedule", schedule] if schedule else [])
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    log_path = out_dir / f"log.{cap}.txt"
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return {"p": p, "t0": time.perf_counter(), "cmd": cmd, "cap": cap, "rep": rep, "model": model, "images": images,
            "out_dir": out_dir, "log": LogWatch(log_path)}


class LogWatch:
    """The child's log read as it grows: the phase it is in (the last "NAME: started" line) and its last line,
    so that each sample of its memory can be put down to a phase and a layer."""

    def __init__(self, path: Path):
        self.path, self.offset, self.phase, self.line, self.rest = path, 0, "setup", "", ""

    def poll(self) -> None:
        with open(self.path) as f:
            f.seek(self.offset)
            text = self.rest + f.read()
            self.offset = f.tell()
        *lines, self.rest = text.split("\n")
        for line in lines:
            m = re.match(r"^(.+?): started", line)
            if m:
                self.phase = m.group(1)
            if line.strip():
                self.line = line.strip()


def rss_mb(pid: int) -> float | None:
    """The process's resident memory now (VmRSS), read from /proc: independent of the tool's own accounting."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def finish_all(started: list[dict], every: float = 0.2) -> list[dict]:
    """Wait for the children, sampling each one's VmRSS every ``every`` s: its peak per phase and what its
    log said at the moment of its overall peak."""
    running = list(started)
    for st in started:
        st["phase_peak"], st["top"] = {}, (0.0, "", "")
    while running:
        for st in list(running):
            pid, status, usage = os.wait4(st["p"].pid, os.WNOHANG)
            if pid:
                st["status"], st["usage"], st["wall"] = status, usage, time.perf_counter() - st["t0"]
                running.remove(st)
                continue
            rss = rss_mb(st["p"].pid)
            if rss is None:
                continue
            w = st["log"]
            w.poll()
            st["phase_peak"][w.phase] = max(st["phase_peak"].get(w.phase, 0.0), rss)
            if rss > st["top"][0]:
                st["top"] = (rss, w.phase, w.line)
        time.sleep(every)
    return [result(st) for st in started]


def result(st: dict) -> dict:
    status, usage, cap, rep = st["status"], st["usage"], st["cap"], st["rep"]
    text = st["log"].path.read_text()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"compress --max-memory {cap} failed (exit {os.waitstatus_to_exitcode(status)}, peak "
                         f"{usage.ru_maxrss / 1024:.0f} MB):\n{text[-3000:]}")
    report = json.loads(rep.read_text())
    phases = {m.group(1): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"^(.+?): done, .*? in ([\d.]+) s, peak (\d+) MB", text, re.M)}
    rows = {lay["name"]: lay.get("rows") for lay in report["layers"] if lay.get("rows")}
    errors = [lay["rel_error"] for lay in report["layers"] if lay.get("rel_error") is not None]
    return {"cap": cap, "wall_s": st["wall"], "peak_mb": usage.ru_maxrss / 1024, "phases": phases, "rows": rows,
            "sampled_peak_mb": st["top"][0], "peak_phase": st["top"][1], "peak_line": st["top"][2],
            "phase_peak_mb": st["phase_peak"],
            "mean_rel_error": sum(errors) / len(errors) if errors else None,
            "samples_bytes": report.get("samples_bytes"), "max_memory_bytes": report.get("max_memory_bytes"),
            "rows_limited_by_memory": report.get("rows_limited_by_memory"),
            "images": report.get("calibration_images"), "speedup_theoretical": report.get("speedup_theoretical"),
            "factorised": sum(lay["status"] == "factorised" for lay in report["layers"]),
            "cmd": " ".join(st["cmd"][1:]).replace(str(st["model"]), "light_resnet50.onnx")
                   .replace(str(st["images"]), "IMAGES/").replace(str(st["out_dir"]) + "/", "")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--caps", default="2G,512M,4G", help="--max-memory values, one run each (first: default)")
    ap.add_argument("--schedule", default="2:0.01,2:1",
                    help="nonlinear schedule ('' = the default 25:0.01,25:1); same arrays, fewer iterations")
    ap.add_argument("--together", action="store_true",
                    help="run the caps at the same time (peaks are per process; wall times then load each other)")
    ap.add_argument("--name", default="memory_cap", help="result file name in benchmarks/results (.md, .json)")
    ap.add_argument("--tree", default="", help="words naming the tree measured, added to the section title so "
                    "sections of different trees do not repeat")
    args = ap.parse_args()
    model = materialise("resnet50")
    runs = []
    with tempfile.TemporaryDirectory(prefix="memcap-") as tmp:
        folder = Path(tmp) / "images"
        write_images(folder, args.images)
        caps = args.caps.split(",")
        if args.together:
            runs = finish_all([start_cli(model, folder, cap, Path(tmp), args.schedule) for cap in caps])
        else:
            runs = [finish_all([start_cli(model, folder, cap, Path(tmp), args.schedule)])[0] for cap in caps]
    for r in runs:
        print(f"--max-memory {r['cap']}: {r['wall_s']:.0f} s, peak {r['peak_mb']:.0f} MB (sampled "
              f"{r['sampled_peak_mb']:.0f} MB in {r['peak_phase']}: {r['peak_line']}), samples "
              f"{(r['samples_bytes'] or 0) / 2**20:.0f} MiB, limited {r['rows_limited_by_memory']}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(runs, indent=2))
    tree = f", {args.tree}" if args.tree else ""
    md = header(f"Peak memory of a compress: light ResNet-50, {args.images} images of 224 x 224{tree} (issue 17)")
    md += (f"Each run: `python {runs[0]['cmd']}` with the --max-memory shown, in a fresh process; machine "
           "shared with other jobs (2 cores): wall times are noisy, memory is not" + (" (the runs ran at the same time)"
           if args.together else "") + ". Images: PNG crops of the "
           "scikit-image photographs, read from a folder a batch at a time. Peak = the child's ru_maxrss (os.wait4); "
           "per phase: the largest of its VmRSS sampled every 0.2 s from /proc while the log's last "
           "'started' line was that phase's.\n\n")
    md += markdown_table(
        ["--max-memory", "peak RSS MB", "samples kept MiB", "rows limited by memory", "wall s", "images",
         "factorised", "FLOPs speed-up", "mean held-back rel. error"],
        [[r["cap"], round(r["peak_mb"]), round((r["samples_bytes"] or 0) / 2**20), r["rows_limited_by_memory"],
          round(r["wall_s"]), r["images"], r["factorised"], r["speedup_theoretical"],
          "-" if r["mean_rel_error"] is None else f"{100 * r['mean_rel_error']:.2f}%"] for r in runs]) + "\n\n"
    md += "Peak VmRSS per phase (MB, sampled), and the log's last line at the overall peak:\n\n"
    names = list(dict.fromkeys(p for r in runs for p in r["phase_peak_mb"]))
    md += markdown_table(["phase"] + [r["cap"] for r in runs],
                         [[p] + [round(r["phase_peak_mb"][p]) if p in r["phase_peak_mb"] else "-" for r in runs]
                          for p in names] + [["at the peak"] + [f"{r['sampled_peak_mb']:.0f} MB: {r['peak_line']}"
                                                                 for r in runs]]) + "\n\n"
    md += "Phases (seconds, peak MB of the process at the end of the phase, from the log's done lines):\n\n"
    names = list(dict.fromkeys(p for r in runs for p in r["phases"]))
    md += markdown_table(["phase"] + [r["cap"] for r in runs],
                         [[p] + [("%.0f s, %d MB" % r["phases"][p]) if p in r["phases"] else "-" for r in runs]
                          for p in names]) + "\n\n"
    md += "Rows fitted per layer:\n\n"
    layers = list(dict.fromkeys(n for r in runs for n in r["rows"]))
    md += markdown_table(["layer"] + [r["cap"] for r in runs],
                         [[n] + [r["rows"].get(n, "-") for r in runs] for n in layers]) + "\n"
    write_result(args.name, md)


if __name__ == "__main__":
    main()
