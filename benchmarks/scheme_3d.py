"""3-D decomposition vs the channel pair at equal FLOPs, on the demo MNIST model (issue 8).

Both schemes (and ``--scheme auto``, the better of the two per layer at equal FLOPs) are compressed from one calibration (``Compressor``, objective flops) to the same FLOP
target, with ranks of any size (rank multiple 1) and multiples of 16 (onnxruntime's NCHWc block).
Accuracy on the 1500 held-out digits, top-1 agreement and logit NMSE against the original; latency:
every model (original first) interleaved in one run, medians, batch 1 and batch 16, ratios against
the original side by side.

    python benchmarks/scheme_3d.py [--speedups 4,10] [--multiples 1,16] [--runs 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, header, markdown_table, write_result  # noqa: E402

from onnx_lowrank import progress  # noqa: E402
from onnx_lowrank.measure import bench  # noqa: E402
from onnx_lowrank import CompressConfig, Compressor  # noqa: E402
from onnx_lowrank.solver.ranks import RankSelectionError  # noqa: E402

DEMO = ROOT / "models" / "mnist_vgg"


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    from onnx_lowrank import runtime

    sess = runtime.session(path, runtime.TIMING)
    return np.concatenate([sess.run(None, {"input": x[i:i + 500]})[0] for i in range(0, len(x), 500)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--speedups", default="4,10")
    ap.add_argument("--multiples", default="1,16")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    progress.set_enabled(False)
    with np.load(DEMO / "heldout.npz") as h:
        x, labels = h["input"], h["label"]
    tmp = Path(tempfile.mkdtemp(prefix="scheme_3d_"))
    orig = DEMO / "mnist_vgg.onnx"
    comp = Compressor(str(orig), str(DEMO / "calib.npz"), CompressConfig(objective="flops", rank_multiple=1))
    rows, paths = [], [orig]
    for s in [float(v) for v in args.speedups.split(",")]:
        for m in [int(v) for v in args.multiples.split(",")]:
            for scheme in ("channel", "3d", "auto"):
                row = {"speedup": s, "multiple": m, "scheme": scheme}
                try:
                    res = comp.run(speedup=s, rank_multiple=m, scheme=scheme)
                except RankSelectionError as err:
                    row["status"] = f"unreachable (at most {err.max_speedup:.3g}x)"
                    rows.append(row)
                    continue
                path = tmp / f"s{s:g}_m{m}_{scheme}.onnx"
                onnx.save(res.model, path)
                rep = res.report
                row.update(status="ok", path=path, flops=rep["flops_after"], theoretical=rep["speedup_theoretical"],
                           ranks={lay["name"]: lay["rank"] for lay in rep["layers"] if lay["rank"] is not None},
                           schemes=[lay["scheme"] for lay in rep["layers"] if lay["scheme"]])
                rows.append(row)
                paths.append(path)
    ref = logits(orig, x)
    base_acc = 100 * float((ref.argmax(1) == labels).mean())
    for row in rows:
        if row["status"] != "ok":
            continue
        out = logits(row["path"], x)
        row["accuracy"] = 100 * float((out.argmax(1) == labels).mean())
        row["agreement"] = float((out.argmax(1) == ref.argmax(1)).mean())
        row["nmse"] = float(np.sum((out - ref) ** 2) / np.sum(ref ** 2))
    lat = {}
    for batch in (1, 16):
        feeds = [{"input": x[i:i + batch]} for i in range(0, 40 * batch, batch)]
        lat[batch] = bench([str(p) for p in paths], feeds, threads=args.threads, runs=args.runs, warmup=10)
    index = {p: i for i, p in enumerate(paths)}
    table = []
    for row in rows:
        if row["status"] != "ok":
            table.append([f"{row['speedup']:g}", row["multiple"], row["scheme"], row["status"]] + ["-"] * 8)
            continue
        i = index[row["path"]]
        row["latency_speedup_b1"], row["latency_speedup_b16"] = lat[1]["speedup"][i], lat[16]["speedup"][i]
        table.append([f"{row['speedup']:g}", row["multiple"], row["scheme"], "ok", f"{row['flops'] / 1e6:.2f}M",
                      f"{row['theoretical']:.2f}x", f"{row['accuracy']:.2f}", f"{row['agreement']:.4f}",
                      f"{row['nmse']:.2e}", f"{row['latency_speedup_b1']:.2f}x", f"{row['latency_speedup_b16']:.2f}x",
                      ", ".join(f"{k} {v}" for k, v in sorted(Counter(row["schemes"]).items()))])
    md = header("3-D decomposition vs channel pair at equal FLOPs (demo model)") + (
        f"One calibration (500 digits, defaults: nonlinear, asymmetric), objective flops; each row is the same "
        f"FLOP target for both schemes. Original: accuracy {base_acc:.2f}% on the 1500 held-out digits. "
        f"agreement = top-1 agreement with the original, NMSE = logit NMSE against it. Speed = median latency of "
        f"the original / median of the model, all {len(paths)} models interleaved in one run ({args.runs} rounds, "
        f"onnxruntime CPU, {args.threads} thread(s), real digits), batch 1 and batch 16; original "
        f"{lat[1]['models'][0]['median_ms']:.3f} ms (b1), {lat[16]['models'][0]['median_ms']:.3f} ms (b16). "
        "3-D: k x 1, 1 x k, 1 x 1 with d'' = d'. auto: ranks chosen as for 3-D, then each layer also fitted as "
        "a pair at no more FLOPs and the smaller held-back error kept (schemes column: those kept).\n\n")
    md += markdown_table(["target (FLOPs)", "rank multiple", "scheme", "status", "FLOPs after", "theoretical",
                          "accuracy %", "agreement", "logit NMSE", "speed b1", "speed b16", "schemes"], table)
    md += "\n\nRanks chosen (d' per layer; 3-D: d'' = d'):\n\n" + "\n".join(
        f"- {r['speedup']:g}x, multiple {r['multiple']}, {r['scheme']}: {list(r['ranks'].values())}"
        + (f" ({', '.join(r['schemes'])})" if r["scheme"] == "auto" else "")
        for r in rows if r["status"] == "ok")
    write_result("scheme_3d", md)
    (RESULTS / "scheme_3d.json").write_text(json.dumps(
        [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items() if k != "path"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
