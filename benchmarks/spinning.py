"""Why timed sessions do not spin: interleaved onnxruntime sessions at 2 threads, spinning on vs off.

light_resnet50 (materialised by light_models.py), batch 1, 2 intra-op threads: one session alone, then
four sessions of the same model timed in turn (as `bench`, `--measure` and the latency objective do),
with `session.intra_op.allow_spinning` 1 and 0. Median of each session's runs.

    python benchmarks/spinning.py          # about 30 s on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np

from onnx_lowrank import runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
import light_models  # noqa: E402
from common import CACHE, header, markdown_table, write_result  # noqa: E402


def _session(path: str, spin: bool, threads: int):
    """The timing profile, with spinning switched as asked."""
    return runtime.session(path, dataclasses.replace(runtime.TIMING, spinning=spin), threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = str(light_models.materialise("resnet50", CACHE))
    name = runtime.session(path, runtime.TIMING).get_inputs()[0].name
    feed = {name: np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)}
    rows = []
    for spin in (True, False):
        for n in (1, 4):
            sessions = [_session(path, spin, args.threads) for _ in range(n)]
            rounds = runtime.interleave([lambda r, s=s: s.run(None, feed) for s in sessions], min_rounds=args.rounds,
                                        max_rounds=args.rounds, tolerance=None)
            medians = [statistics.median(t) for t in rounds.ms]
            rows.append(["on" if spin else "off", n, statistics.median(medians), min(medians), max(medians)])
            print(rows[-1], flush=True)
    md = header("Spinning intra-op threads and interleaved timing (light_resnet50)")
    md += (f"Batch 1, {args.threads} intra-op threads, {args.rounds} rounds; with 4 sessions they run in turn "
           "(one run each per round, order rotated: runtime.interleave). Times: median of each session's runs, then over sessions.\n\n")
    md += markdown_table(["spinning", "sessions", "median ms", "fastest session ms", "slowest session ms"], rows)
    write_result("spinning", md)


if __name__ == "__main__":
    main()
