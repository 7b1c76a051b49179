"""A generated model over 2 GB, compressed with external data (issue 14, item 4).

A stack of ``--layers`` Conv 3x3 layers of ``--channels`` channels (4 x 4 maps, ReLU between)
whose weights have rank ``--rank`` along the output channels plus 1 % noise (so that a 2x
compression is nearly exact and the output check means something), each layer scaled so that its
output has unit variance. The weights are written tensor by tensor into ``big.onnx.data`` (the
generator never holds the model in memory). Then, in child processes:

* ``onnx-lowrank layers big.onnx``: shapes known, time and peak memory;
* ``onnx-lowrank compress big.onnx --speedup 2 --objective flops --method linear`` (asymmetric, the
  default): peak memory (``ru_maxrss`` of the child) against the model's size, time; the output
  keeps external data;
* the compressed model against the original in onnxruntime on held-out inputs (relative error).

Everything lives in a temporary folder under ``--dir`` (free space checked first) and is deleted.

    python benchmarks/large_model.py                 # 60 x 1024 channels: 2.26 GB, about 10 min
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, header, markdown_table, write_result  # noqa: E402

SIZE = 4  # spatial size of every map


def conv_out(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """3 x 3 convolution, pads 1, of one (c, s, s) map: im2col and one matmul."""
    c, s, _ = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    cols = np.stack([p[:, i:i + s, j:j + s] for i in range(3) for j in range(3)], axis=1)  # c, 9, s, s
    return (w.reshape(w.shape[0], -1) @ cols.reshape(c * 9, s * s)).reshape(-1, s, s)


def generate(folder: Path, layers: int, channels: int, rank: int, seed: int = 0) -> tuple[Path, int]:
    rng = np.random.default_rng(seed)
    path = folder / "big.onnx"
    data = folder / "big.onnx.data"
    nodes, inits = [], []
    x = rng.standard_normal((channels, SIZE, SIZE)).astype(np.float32)
    name = "input"
    with open(data, "wb") as f:
        for i in range(layers):
            u = rng.standard_normal((channels, rank)).astype(np.float32)
            v = rng.standard_normal((rank, channels * 9)).astype(np.float32)
            w = (u @ v).reshape(channels, channels, 3, 3)
            w += 0.01 * w.std() * rng.standard_normal(w.shape, dtype=np.float32)
            w /= conv_out(x, w).std()  # unit-variance output
            x = np.maximum(conv_out(x, w), 0)
            offset = -(-f.tell() // 4096) * 4096
            f.seek(offset)
            f.write(w.astype(np.float32).tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=w.shape,
                            data_location=TensorProto.EXTERNAL)
            for k, val in (("location", data.name), ("offset", str(offset)), ("length", str(w.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, val
            inits.append(t)
            nodes.append(helper.make_node("Conv", [name, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1],
                                          kernel_shape=[3, 3]))
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
            name = f"r{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["N", channels, SIZE, SIZE])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, SIZE, SIZE])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path, data.stat().st_size + path.stat().st_size


def child(args: list[str], folder: Path) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run a child process: (its output, seconds, peak RSS in bytes from its own rusage)."""
    t0 = time.perf_counter()
    with open(folder / "stdout.txt", "w+") as out, open(folder / "stderr.txt", "w+") as err:
        p = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        res = subprocess.CompletedProcess(p.args, os.waitstatus_to_exitcode(status), out.read(), err.read())
    return res, seconds, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    weights = args.layers * args.channels * args.channels * 9 * 4
    free = shutil.disk_usage(args.dir).free
    if free < 3 * weights:
        raise SystemExit(f"need about {3 * weights / 1e9:.1f} GB free in {args.dir}, have {free / 1e9:.1f} GB")
    work = Path(tempfile.mkdtemp(prefix="onnx-lowrank-large-bench-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        model, size = generate(work, args.layers, args.channels, args.rank)
        gen_s = time.perf_counter() - t0
        print(f"generated {model} ({size / 1e9:.2f} GB) in {gen_s:.0f} s", flush=True)
        rng = np.random.default_rng(1)
        shape = (args.channels, SIZE, SIZE)
        np.savez(work / "calib.npz", input=rng.standard_normal((args.images,) + shape).astype(np.float32))
        held = rng.standard_normal((4,) + shape).astype(np.float32)

        layers, layers_s, layers_peak = child(["-m", "onnx_lowrank", "layers", str(model)], work)
        if layers.returncode:
            raise SystemExit(layers.stderr)
        known = sum(1 for line in layers.stdout.splitlines()[1:] if f"{SIZE}x{SIZE}" in line)
        print(f"layers: {known} of {args.layers} with known output size, {layers_s:.0f} s, "
              f"peak {layers_peak / 1e9:.2f} GB", flush=True)

        out = work / "out" / "big.2x.onnx"
        comp, comp_s, comp_peak = child(["-m", "onnx_lowrank", "compress", str(model), "--calib",
                                         str(work / "calib.npz"), "--speedup", "2", "--objective", "flops",
                                         "--method", "linear", "--no-measure", "--batch-size", "8", "-o", str(out)], work)
        print(comp.stdout[-1500:], comp.stderr[-1500:], flush=True)
        if comp.returncode:
            raise SystemExit(f"compress failed: {comp.stderr.strip().splitlines()[-1]}")
        files = sorted(p.name for p in out.parent.iterdir())
        assert not list(Path(tempfile.gettempdir()).glob("onnx-lowrank-weights-*/.session-*")), "session files left"
        out_size = sum((out.parent / f).stat().st_size for f in files)
        print(f"compress: {comp_s:.0f} s, peak {comp_peak / 1e9:.2f} GB = {comp_peak / size:.2f}x the model; "
              f"wrote {files} ({out_size / 1e9:.2f} GB)", flush=True)

        import onnxruntime as ort

        errs = []
        for p in (model, out):
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            errs.append(sess.run(None, {"input": held})[0])
            del sess
        rel = float(np.linalg.norm(errs[1] - errs[0]) / np.linalg.norm(errs[0]))
        print(f"onnxruntime, 4 held-out inputs: relative error {rel:.2e}", flush=True)
        rows = [["generated model", f"{size / 1e9:.2f} GB", "-", "-", f"{gen_s:.0f}", "-"],
                ["`layers`", f"{known} of {args.layers} output sizes known", f"{layers_peak / 1e9:.2f}",
                 f"{layers_peak / size:.2f}", f"{layers_s:.0f}", "-"],
                ["`compress --speedup 2`", f"{', '.join(files)} ({out_size / 1e9:.2f} GB)",
                 f"{comp_peak / 1e9:.2f}", f"{comp_peak / size:.2f}", f"{comp_s:.0f}", f"{rel:.2e}"]]
        md = header("A generated model over 2 GB, compressed with external data")
        md += (f"{args.layers} Conv 3x3 layers of {args.channels} channels on {SIZE}x{SIZE} maps (ReLU between), "
               f"weights of rank {args.rank} along the output channels plus 1 % noise, written as external data "
               f"({size / 1e9:.2f} GB). `compress --speedup 2 --objective flops --method linear` (asymmetric), "
               f"{args.images} random calibration inputs. Peak memory = `ru_maxrss` of the child process "
               "(resident pages, memory-mapped weights included). Output error = ||y_compressed - y_original|| / "
               "||y_original|| in onnxruntime on 4 held-out random inputs. The machine (2 cores, 23 GB) was "
               "shared with other jobs.\n\n")
        md += markdown_table(["step", "result", "peak GB", "peak / model size", "seconds", "output rel. error"], rows)
        md += f"\n\nTarget: peak memory under 2.5x the model's size: {'met' if comp_peak < 2.5 * size else 'MISSED'}.\n"
        write_result("large_model", md)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
