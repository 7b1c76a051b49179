"""Can two measurements of the same compression be trusted to agree? (issue 13, item 4)

Light VGG-19 (random He weights, materialised by light_models.py), 2 threads: the same compression is
made twice (identical ranks, byte-identical models) and each is measured the way ``compress --measure``
does (``api.measure_speedup`` -> ``measure.bench`` -> ``runtime.interleave``: alternating rounds until
the median per-round speed-up is known within 2 %, at least 10 rounds and 1 s, at most 15 s unless 10 rounds take longer).
Repeated ``--repeats`` times. For comparison, the estimator ``--measure`` used before (ratio of the
medians of 5 rounds, as timed for a slow model under its 3-s budget) is computed from the first 5
rounds of the same data.

The timed part holds ``/tmp/timing.lock`` (flock) so that at most one timing job of the shared machine
runs at a time; other jobs (compressions, tests) still run beside it.

    python benchmarks/timing_stability.py            # about 5-10 min on 2 cores
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import light_models  # noqa: E402
from common import CACHE, header, markdown_table, write_result  # noqa: E402

from onnx_lowrank import CompressConfig, Compressor, progress  # noqa: E402
from onnx_lowrank.api import measure_speedup  # noqa: E402


@contextmanager
def timing_lock(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def old_estimate(bench: dict) -> float:
    """Ratio of medians of the first 5 rounds (what --measure reported for a slow model before)."""
    a, b = (m["times_ms"][:5] for m in bench["models"])
    return statistics.median(a) / statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg19")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lock", default="/tmp/timing.lock")
    args = ap.parse_args()
    progress.set_enabled(False)
    path = light_models.materialise(args.model, CACHE)
    name = light_models.check(path)[0]
    data = [{name: light_models.random_input(1, seed=i)} for i in range(8)]
    cfg = CompressConfig(threads=args.threads, method="linear", asymmetric=False, samples_per_image=20,
                         objective="flops")
    comp = Compressor(str(path), data, cfg)
    results = [comp.run(speedup=args.speedup) for _ in range(2)]
    ranks = [[lay["rank"] for lay in r.report["layers"]] for r in results]
    same = results[0].model.SerializeToString() == results[1].model.SerializeToString()
    assert ranks[0] == ranks[1], "the two compressions chose different ranks"
    rows, pairs = [], []
    for rep in range(args.repeats):
        pair = []
        with timing_lock(args.lock):  # the two compressions back to back, nothing else timed meanwhile
            for k, res in enumerate(results):
                t0 = time.perf_counter()
                b = measure_speedup(comp, res, args.threads)
                wall = time.perf_counter() - t0
                m = res.report["latency_measured"]
                pair.append(res.report["measured_latency_speedup"])
                rows.append([rep + 1, k + 1, f"{res.report['measured_latency_speedup']:.3f}",
                             f"{m['speedup_iqr'][0]:.3f}-{m['speedup_iqr'][1]:.3f}",
                             f"{m['speedup_ci95'][0]:.3f}-{m['speedup_ci95'][1]:.3f}", m["runs"],
                             "yes" if m["stable"] else "no (time cap)",
                             f"{m['original_ms']:.1f} -> {m['compressed_ms']:.1f}", f"{old_estimate(b):.3f}",
                             f"{wall:.0f}", f"{os.getloadavg()[0]:.1f}"])
                print(rows[-1], flush=True)
        pairs.append(pair)
        _write(args, same, rows, pairs)


def _write(args, same: bool, rows: list, pairs: list) -> None:
    diffs = [abs(a / b - 1) for a, b in pairs]
    allx = [x for p in pairs for x in p]
    olds = [float(r[8]) for r in rows]
    md = header(f"Timing that can be trusted: two identical compressions of light {args.model.upper()} "
                f"at {args.threads} threads")
    md += (f"`--speedup {args.speedup:g}` (FLOP objective, linear solver, synthetic calibration), compressed twice: "
           f"identical ranks, {'byte-identical' if same else 'NOT byte-identical'} models. Each measured as "
           "`compress --measure` does: interleaved alternating rounds until the 95 % interval of the median "
           "per-round speed-up lies within 2 % of it (at least 10 rounds and 1 s; at most 15 s, `--measure`'s cap, unless 10 rounds take longer). "
           "IQR = quartiles of the per-round speed-ups; 95 % CI = order-statistic interval of their median. "
           "'old' = ratio of the medians of the first 5 rounds, the estimator `--measure` used for a slow "
           "model before. Timing jobs were serialised with `flock /tmp/timing.lock`; other jobs on the machine were "
           "not, so the 1-minute load average after each measurement is in the last column (2 cores: above 2 "
           "means other work competed for them).\n\n")
    md += markdown_table(["repeat", "compression", "measured x (median)", "IQR", "95% CI", "rounds", "stable",
                          "ms (original -> compressed)", "old estimator x", "wall s", "load (1 min)"], rows)
    md += (f"\n\nPairs (compression 1 vs 2 in one repeat): relative difference "
           f"{', '.join(f'{100 * d:.1f} %' for d in diffs)} (target: within 5 %). All {len(allx)} measurements: "
           f"{min(allx):.3f}-{max(allx):.3f}x (spread {100 * (max(allx) / min(allx) - 1):.1f} %); the old estimator on "
           f"the same rounds: {min(olds):.3f}-{max(olds):.3f}x (spread {100 * (max(olds) / min(olds) - 1):.1f} %).\n")
    md += f"\n{len(pairs)} of {args.repeats} repeats done when this was written.\n"
    write_result(f"timing_stability_{args.model}_t{args.threads}", md)


if __name__ == "__main__":
    main()
