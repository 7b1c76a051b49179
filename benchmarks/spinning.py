"""Why timed sessions do not spin: interleaved onnxruntime sessions at 2 threads, spinning on vs off.

light_resnet50 (materialised by light_models.py), batch 1, 2 intra-op threads: one session alone, then
four sessions of the same model timed in turn (as `bench`, `--measure` and the latency objective do),
with `session.intra_op.allow_spinning` 1 and 0. Median of each session's runs.

    python benchmarks/spinning.py          # about 30 s on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import light_models  # noqa: E402
from common import CACHE, header, markdown_table, write_result  # noqa: E402


def _session(path: str, spin: bool, threads: int) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = str(light_models.materialise("resnet50", CACHE))
    name = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0].name
    feed = {name: np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)}
    rows = []
    for spin in (True, False):
        for n in (1, 4):
            sessions = [_session(path, spin, args.threads) for _ in range(n)]
            for s in sessions:
                s.run(None, feed)
            times = [[] for _ in sessions]
            for _ in range(args.rounds):
                for i, s in enumerate(sessions):
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times[i].append(1000 * (time.perf_counter() - t0))
            medians = [statistics.median(t) for t in times]
            rows.append(["on" if spin else "off", n, statistics.median(medians), min(medians), max(medians)])
            print(rows[-1], flush=True)
    md = header("Spinning intra-op threads and interleaved timing (light_resnet50)")
    md += (f"Batch 1, {args.threads} intra-op threads, {args.rounds} rounds; with 4 sessions they run in turn "
           "(one run each per round). Times: median of each session's runs, then over sessions.\n\n")
    md += markdown_table(["spinning", "sessions", "median ms", "fastest session ms", "slowest session ms"], rows)
    write_result("spinning", md)


if __name__ == "__main__":
    main()
