"""MatMul / Gemm layers under the latency objective (issue 13): timed and factorised like Convs.

1. all-MiniLM-L6-v2 (ONNX export of benchmarks/minilm.py, batch 1, 64 tokens), every layer a MatMul:
   ``--speedup S`` with the default objective (latency) and 1 thread. The measured speed-up (median of
   several interleaved ``bench`` runs of original and compressed model) is compared with the target;
   done when it reaches at least 0.9 of it. Fidelity: cosine similarity of the sentence embeddings
   on the evaluation sentences (benchmarks/minilm.py).
2. The PP-OCRv4 recogniser (rapidocr-onnxruntime 1.4.4, rendered text lines, 48 x 320): the report's
   MatMul rows with their timings (alone, whole and at the chosen rank).

    pip install -r benchmarks/requirements.txt
    flock /tmp/timing.lock python benchmarks/matmul_latency.py [--speedup 1.3] [--repeats 5]

Writes benchmarks/results/matmul_latency.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# The export needs no torchvision; a torchvision wheel built for another torch breaks transformers' import.
sys.modules.setdefault("torchvision", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import minilm  # noqa: E402

FAST = dict(samples_per_image=16, schedule=((2, 0.01), (2, 1.0)))  # the GELU z-step is slow (see minilm.py)


def _measured(original, compressed, feed, threads: int, repeats: int) -> list[float]:
    from onnx_lowrank.measure import bench

    return [bench([original, compressed], feed, threads=threads, runs=30, warmup=3)["speedup"][1]
            for _ in range(repeats)]


def _dense_rows(report: dict) -> list[list]:
    return [[lay["name"], lay["op"], f"{lay['in_channels']} -> {lay['out_channels']}",
             "x".join(map(str, lay["output_size"] or [])) or "1", lay["rank"] or "-",
             f"{lay['latency_before_ms']:.4f}" if lay["latency_before_ms"] is not None else "-",
             f"{lay['latency_after_ms']:.4f}" if lay["latency_after_ms"] is not None else "-",
             lay["status"] if lay["status"] == "factorised" else lay["reason"]]
            for lay in report["layers"] if lay["op"] != "Conv"]


HEAD = ["layer", "op", "c -> d", "positions", "rank", "alone ms", "at rank ms", "status"]


def minilm_section(speedup: float, threads: int, repeats: int) -> str:
    import onnx_lowrank
    from onnx_lowrank.graph.loading import load_model

    model, (calib, _) = minilm.export(), minilm.make_data()
    out = minilm.DIR / f"minilm.latency_{speedup:g}x.onnx"
    table = minilm.DIR / f"latency_table_t{threads}.json"
    t0 = time.perf_counter()
    res = onnx_lowrank.compress(str(model), str(calib), str(out), speedup=speedup, threads=threads,
                                latency_table=str(table), **FAST)
    seconds = time.perf_counter() - t0
    rep = res.report
    with np.load(calib) as z:
        feed = {k: z[k][:1] for k in minilm.INPUTS}
    measured = _measured(load_model(model), res.model, feed, threads, repeats)
    med = statistics.median(measured)
    fid = minilm.evaluate(out, model, runs=10, threads=threads)
    n_fact = sum(lay["status"] == "factorised" for lay in rep["layers"])
    md = common.header(f"MiniLM at --speedup {speedup:g}, latency objective, {threads} thread(s)")
    md += (f"Machine shared with other jobs. Calibration: "
           f"{rep['calibration_images']} sentences, 64 tokens; samples per sentence {FAST['samples_per_image']}, "
           f"schedule 2:0.01,2:1 (the GELU step is slow); compression took {seconds:.0f} s (timing included).\n\n")
    md += common.markdown_table(
        ["target", "predicted (whole-model check)", "measured (median)", "measured runs", "measured / target",
         "layers factorised", "cosine mean", "cosine min", "top-1 retrieval agreement"],
        [[f"{speedup:g}x", f"{rep['predicted_latency_speedup']:.3f}x", f"{med:.3f}x",
          ", ".join(f"{v:.3f}" for v in measured), f"{med / speedup:.3f}", f"{n_fact} of {len(rep['layers'])}",
          f"{fid['cosine_mean']:.5f}", f"{fid['cosine_min']:.5f}", fid["top1_agreement"]]])
    md += "\n\nMeasured: `measure.bench`, original and compressed interleaved, 30 rounds a run, batch 1; " \
          f"{repeats} runs.\n\n"
    md += common.markdown_table(HEAD, _dense_rows(rep)) + "\n"
    return md


def ppocr_section(speedup: float, threads: int) -> str:
    import ppocr_rec

    import onnx_lowrank

    model_path = ppocr_rec.package_dir() / ppocr_rec.MODEL_FILE
    charset = set(ppocr_rec.character_list(model_path)[1:])
    _, calib_x = ppocr_rec.make_lines(60, seed=1, charset=charset)
    res = onnx_lowrank.compress(str(model_path), {"x": calib_x}, speedup=speedup, threads=threads,
                                latency_table=str(common.CACHE / f"ppocr_rec_latency_t{threads}.json"), **FAST)
    rep = res.report
    md = common.header(f"PP-OCRv4 recogniser at --speedup {speedup:g}, latency objective, {threads} thread(s): "
                       "MatMul layers")
    md += (f"60 rendered lines (48 x 320) for calibration; predicted whole-model speed-up "
           f"{rep['predicted_latency_speedup']:.3f}x. Each MatMul is timed alone, whole and factorised at a "
           "few candidate ranks; 'at rank' is its time at the chosen rank, or the whole layer's when kept.\n\n")
    return md + common.markdown_table(HEAD, _dense_rows(rep)) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speedup", type=float, default=1.3)
    ap.add_argument("--ppocr-speedup", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--note", default="", help="a line about the machine's load, written under the first heading")
    args = ap.parse_args()
    md = minilm_section(args.speedup, args.threads, args.repeats)
    if args.note:
        md = md.replace("\n\n", f"\n\n{args.note}\n\n", 1)
    common.write_result("matmul_latency", md)
    md += "\n" + ppocr_section(args.ppocr_speedup, args.threads)
    common.write_result("matmul_latency", md)


if __name__ == "__main__":
    main()
