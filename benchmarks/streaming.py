"""Issue 14: streaming calibration on 2,000 images of 416 x 416 (peak memory), 1 vs 2 workers.

The images come from a CalibrationDataReader that makes them on the fly (shifted, mirrored,
rescaled copies of 32 smooth random fields, one seed per image index), so nothing but the reader's current batch exists:
the data (2,000 x 3 x 416 x 416 float32 = 4.2 GB) is never in memory at once. The model is a small
conv net with a 416 x 416 input (5 Conv + Gemm, about 72 M multiply-adds per image).

Each run is a fresh process (peak RSS from getrusage; with workers, the largest worker's peak and
the driver's are reported):
  * calibrate, 1 worker and 2 workers (local executor, shards of the 2,000 images): images per second
    and peak memory, alternated, ``--repeats`` times each;
  * a full compress (objective flops, 2x, asymmetric) from the same reader in one process.

    flock /tmp/timing.lock python benchmarks/streaming.py [--images 2000] [--repeats 3]

Writes benchmarks/results/streaming.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

SIZE = 416


class SyntheticImages:
    """A CalibrationDataReader (get_next / rewind) making image i from seed (seed, i); picklable, so it
    also travels to worker processes."""

    def __init__(self, count: int, batch: int = 4, seed: int = 0):
        self.count, self.batch, self.seed, self.i = count, batch, seed, 0

    def _base(self, j: int) -> np.ndarray:
        """One of 32 smooth random fields with a block of colour (made once per process)."""
        from PIL import Image

        if not hasattr(self, "_bases"):
            self._bases = {}
        if j not in self._bases:
            rng = np.random.default_rng([self.seed, 10**6 + j])
            small = rng.integers(0, 256, (rng.integers(4, 16), rng.integers(4, 16), 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32)
            y0, x0 = rng.integers(0, SIZE - 120, 2)
            img[y0:y0 + rng.integers(20, 120), x0:x0 + rng.integers(20, 120)] = rng.integers(0, 256, 3)
            self._bases[j] = ((img / 255.0 - 0.5) / 0.25).transpose(2, 0, 1).copy()
        return self._bases[j]

    def image(self, i: int) -> np.ndarray:
        """Image i: a base field shifted, maybe mirrored, with its own contrast and brightness (all distinct)."""
        rng = np.random.default_rng([self.seed, i])
        x = np.roll(self._base(i % 32), tuple(rng.integers(0, SIZE, 2)), axis=(1, 2))
        if rng.random() < 0.5:
            x = x[:, :, ::-1]
        return (x * rng.uniform(0.6, 1.4) + rng.uniform(-0.5, 0.5)).astype(np.float32)

    def get_next(self):
        if self.i >= self.count:
            return None
        n = min(self.batch, self.count - self.i)
        x = np.stack([self.image(self.i + j) for j in range(n)])
        self.i += n
        return {"input": x}

    def rewind(self):
        self.i = 0


def build_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    layers = [(3, 8, 2), (8, 16, 2), (16, 32, 2), (32, 32, 1), (32, 64, 2)]
    nodes, inits, x = [], [], "input"
    for i, (c, d, s) in enumerate(layers):
        r = max(4, d // 4)   # low-rank-ish weights, as trained layers are
        w = np.einsum("dr,rckl->dckl", rng.standard_normal((d, r)), rng.standard_normal((r, c, 3, 3)))
        w = (w / np.sqrt(r * c * 9) + 0.05 * rng.standard_normal((d, c, 3, 3)) / np.sqrt(c * 9)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1], strides=[s, s]),
                  helper.make_node("Relu", [f"c{i}"], [f"a{i}"], name=f"relu{i}")]
        x = f"a{i}"
    inits += [numpy_helper.from_array((rng.standard_normal((64, 10)) / 8).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "net416", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                               ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def child(args) -> None:
    from onnx_lowrank import progress
    from onnx_lowrank.config import CompressConfig

    progress.set_enabled(False)
    reader = SyntheticImages(args.images)
    cfg = CompressConfig(objective="flops", speedup=2.0, batch_size=8, rank_multiple=8)
    t0 = time.perf_counter()
    if args.child == "calibrate":
        from onnx_lowrank.shards import calibrate

        samples = calibrate(args.model, reader, cfg, shards=max(2, args.workers), workers=args.workers)
        out = {"images": samples.images, "rows": int(sum(len(r) for r in samples.rows.values()))}
    else:
        import onnx_lowrank

        res = onnx_lowrank.compress(args.model, reader, config=cfg)
        out = {"images": res.report["calibration_images"], "speedup_theoretical": res.report["speedup_theoretical"],
               "factorised": sum(lay["status"] == "factorised" for lay in res.report["layers"])}
    out["seconds"] = time.perf_counter() - t0
    out["peak_mb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_mb_worker"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(out))


def run_child(model: Path, what: str, images: int, workers: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    res = subprocess.run([sys.executable, __file__, "--child", what, "--model", str(model), "--images", str(images),
                          "--workers", str(workers)], capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--model")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from common import machine

    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        model = Path(tmp) / "net416.onnx"
        build_model(model)
        runs = {1: [], 2: []}
        for r in range(args.repeats):
            for w in (1, 2):   # alternated, so that load from other jobs hits both alike
                runs[w].append(run_child(model, "calibrate", args.images, w))
                print(f"calibrate, {w} worker(s), run {r + 1}: {runs[w][-1]}", flush=True)
        full = run_child(model, "compress", args.images)
        print(f"compress: {full}", flush=True)
    med = {w: statistics.median(x["seconds"] for x in v) for w, v in runs.items()}
    peak = {w: max(max(x["peak_mb_self"], x["peak_mb_worker"]) for x in v) for w, v in runs.items()}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "streaming.json").write_text(json.dumps({"calibrate": runs, "compress": full}, indent=2))
    lines = [
        "## Streaming calibration: 2,000 images of 416 x 416 from a reader (issue 14)",
        "",
        f"- command: `flock /tmp/timing.lock python benchmarks/streaming.py --images {args.images} "
        f"--repeats {args.repeats}`",
        f"- machine: {machine()} (shared with other jobs: times are noisy, the ratio is measured alternately)",
        f"- date: {time.strftime('%Y-%m-%d')}",
        "",
        f"Data: {args.images} synthetic images of 3 x 416 x 416 float32 ({args.images * 3 * SIZE * SIZE * 4 / 1e9:.1f} GB "
        "if listed) made on the fly by a `CalibrationDataReader` with `rewind()` (shifted, mirrored, rescaled "
        "copies of 32 smooth random fields), batches of 4; model: 5 Conv (3->8 s2, 8->16 s2, 16->32 s2, 32->32, "
        "32->64 s2) + Gemm, batch size 8; samples per image: auto. Peak memory is the largest resident "
        "set of any one process of the run (driver or worker); a 2-worker run holds two workers at once.",
        "",
        "| run | images | median s | images / s | peak MB (largest process) | runs |",
        "|---|---|---|---|---|---|",
    ]
    for w in (1, 2):
        times = ", ".join(f"{x['seconds']:.1f}" for x in runs[w])
        lines.append(f"| calibrate, {w} worker(s) ({'2 shards' if w == 1 else '2 shards in parallel'}) | "
                     f"{runs[w][0]['images']} | {med[w]:.1f} | {runs[w][0]['images'] / med[w]:.1f} | {peak[w]:.0f} | "
                     f"{times} |")
    lines.append(f"| compress (calibration + asymmetric solve + rewrite), 1 process | {full['images']} | "
                 f"{full['seconds']:.1f} | - | {max(full['peak_mb_self'], full['peak_mb_worker']):.0f} | 1 |")
    lines += ["", f"Throughput 2 workers / 1 worker: **{med[1] / med[2]:.2f}x** (medians of {args.repeats}, "
              "alternated); each worker runs onnxruntime with cores / workers threads. The compress run factorised "
              f"{full['factorised']} layers at {full['speedup_theoretical']:.2f}x FLOPs."]
    (HERE / "results" / "streaming.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
