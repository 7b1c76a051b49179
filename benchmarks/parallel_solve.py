"""Issue 17 item 4: would independent layer solves run faster in 2 processes on 2 cores?

With symmetric fitting (``--no-asymmetric``) every layer is solved from the original model's samples
alone, so the solves are independent. This script calibrates once, chooses the ranks, then times
the solve phase (the same ``_solve`` the tool runs, one BLAS thread as the tool sets):

* serial: every layer in this process, one after the other;
* 2 processes: ``concurrent.futures.ProcessPoolExecutor`` with spawn, one BLAS thread each, each task
  shipped its plan and only its own layer's sample rows, largest layers first. Timed with the
  pool's start-up (spawn + imports, what a run would pay) and again on the warm pool.

Serial and parallel are alternated ``--repeats`` times. Besides wall time, the CPU seconds of all
processes are recorded: on a machine shared with other jobs, two processes can take a larger share
of the cores than one, so a wall-clock gain there may be taken from the other jobs rather than made.
Each parallel result is checked to equal the serial one (the factorisations' arrays bit for bit).

    flock /tmp/timing.lock python benchmarks/parallel_solve.py [--repeats 3]

Writes benchmarks/results/parallel_solve.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, header, markdown_table, photo_crops, write_result  # noqa: E402


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _init_worker() -> None:
    from threadpoolctl import threadpool_limits

    global _LIMIT
    _LIMIT = threadpool_limits(limits=1, user_api="blas")


def _cpu_self() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime


def solve_one(task):
    """One layer's symmetric solve in a worker; also returns the worker's CPU seconds for it."""
    from onnx_lowrank.solve import _solve

    p, samples, cfg = task
    c0 = _cpu_self()
    q = _solve(p, samples, None, cfg)
    return q, _cpu_self() - c0, os.getpid()


def prepare(model, data, cfg):
    from threadpoolctl import threadpool_limits

    from onnx_lowrank.compressor import Compressor
    from onnx_lowrank.plan import make_plan
    from onnx_lowrank.rank_choice import choose_ranks

    comp = Compressor(model, data, cfg)
    plan = make_plan(comp.layers, comp.flops, cfg)
    with threadpool_limits(limits=1, user_api="blas"):
        plan = choose_ranks(plan, comp.samples, comp.flops, cfg, comp.costs(plan, cfg))
    chosen = [replace(p, split=p.scheme.split(p.layer, p.rank)) for p in plan if p.rank is not None]
    assert not any(p.split[0] or p.alternative for p in chosen), "channel scheme only"
    return chosen, comp.samples


def own_rows(samples, p):
    """A Samples holding only what layer ``p``'s solve reads (what a worker would be shipped)."""
    from onnx_lowrank.samples import tensors

    keys = [t.key for t in tensors(p)]
    return replace(samples, rows={k: samples.rows[k] for k in keys}, image={k: samples.image[k] for k in keys},
                   digests=None, flat=None)


def serial(chosen, samples, cfg):
    from threadpoolctl import threadpool_limits

    from onnx_lowrank.solve import _solve

    t0, c0 = time.perf_counter(), _cpu()
    with threadpool_limits(limits=1, user_api="blas"):
        out = [_solve(p, samples, None, cfg) for p in chosen]
    return out, time.perf_counter() - t0, _cpu() - c0


def parallel(chosen, samples, cfg, workers=2):
    order = sorted(range(len(chosen)), key=lambda i: -chosen[i].layer.out_channels * chosen[i].layer.in_channels)
    tasks = [(chosen[i], own_rows(samples, chosen[i]), cfg) for i in order]
    t0, c0 = time.perf_counter(), _cpu()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker) as pool:
        list(pool.map(abs, [0] * workers))   # the workers are up (spawned, numpy imported)
        t1 = time.perf_counter()
        res = list(pool.map(solve_one, tasks))
        t2 = time.perf_counter()
    wall_cold, wall_warm = time.perf_counter() - t0, t2 - t1
    worker_cpu = sum(c for _, c, _ in res)
    per_worker: dict = {}
    for _, c, pid in res:
        per_worker[pid] = per_worker.get(pid, 0.0) + c
    out = [None] * len(chosen)
    for i, (q, _, _) in zip(order, res):
        out[i] = q
    return out, wall_cold, wall_warm, _cpu() - c0, worker_cpu, max(per_worker.values())


def same(a, b) -> bool:
    def arrays(q):
        f = q.factorisation
        return [getattr(f, x.name) for x in fields(f) if isinstance(getattr(f, x.name), np.ndarray)]

    return all(q.rel_error == r.rel_error and all(np.array_equal(x, y) for x, y in zip(arrays(q), arrays(r)))
               for q, r in zip(a, b))


def mnist_case():
    from onnx_lowrank.config import CompressConfig

    root = HERE.parent / "models" / "mnist_vgg"
    return "demo mnist_vgg (calib.npz), --speedup 2", str(root / "mnist_vgg.onnx"), str(root / "calib.npz"), \
        CompressConfig(asymmetric=False, objective="flops", speedup=2.0)


def resnet_case(images: int, schedule, max_memory="1G"):
    from light_models import materialise

    from onnx_lowrank.config import CompressConfig

    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    x = ((photo_crops(images, seed=7).transpose(0, 3, 1, 2) / np.float32(255) - mean) / std).astype(np.float32)
    name = materialise("resnet50")
    import onnx

    inp = onnx.load(str(name), load_external_data=False).graph.input[0].name
    return (f"light ResNet-50, {images} photo crops, --speedup 2, --max-memory {max_memory}, --schedule {schedule}", str(name), {inp: x},
            CompressConfig(asymmetric=False, objective="flops", speedup=2.0, max_memory=max_memory, batch_size=8,
                           schedule=tuple((int(a), float(b)) for a, b in (s.split(":") for s in schedule.split(",")))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="mnist,resnet50")
    ap.add_argument("--resnet-images", type=int, default=50)
    ap.add_argument("--resnet-schedule", default="2:0.01,2:1")
    ap.add_argument("--resnet-max-memory", default="1G", help="fewer rows: shorter solves")
    args = ap.parse_args()
    from onnx_lowrank import progress

    progress.set_enabled(False)
    rows, raw = [], {}
    for case in args.cases.split(","):
        desc, model, data, cfg = mnist_case() if case == "mnist" else resnet_case(args.resnet_images,
                                                                                   args.resnet_schedule,
                                                                                   args.resnet_max_memory)
        chosen, samples = prepare(model, data, cfg)
        runs = []
        for r in range(args.repeats):
            ref, ws, cs = serial(chosen, samples, cfg)
            out, wc, ww, cp, cw, cb = parallel(chosen, samples, cfg)
            runs.append({"serial_s": ws, "serial_cpu_s": cs, "parallel_s": wc, "parallel_warm_s": ww,
                         "parallel_cpu_s": cp, "parallel_worker_cpu_s": cw, "busiest_worker_cpu_s": cb,
                         "identical": same(ref, out)})
            print(case, runs[-1], flush=True)
        raw[case] = runs
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0] if k != "identical"}
        rows.append([desc, len(chosen), med["serial_s"], med["parallel_s"], med["parallel_warm_s"],
                     med["serial_s"] / med["parallel_s"], med["serial_s"] / med["parallel_warm_s"],
                     med["serial_cpu_s"], med["parallel_worker_cpu_s"], med["busiest_worker_cpu_s"],
                     med["serial_cpu_s"] / med["busiest_worker_cpu_s"], all(x["identical"] for x in runs),
                     ", ".join(f"{x['serial_s']:.1f}/{x['parallel_s']:.1f}" for x in runs)])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "parallel_solve.json").write_text(json.dumps(raw, indent=2))
    md = header("Independent (symmetric) layer solves: serial vs 2 spawned processes (issue 17 item 4)")
    md += ("Machine shared with other jobs (load average around 20 on 2 cores during the runs): serial and parallel "
           f"alternated, medians of {args.repeats}. One BLAS thread per solve in both. CPU s: serial = this process; "
           "parallel = the workers' CPU inside the solves (pickling and start-up not included). The CPU bound is what 2 "
           "processes could reach on 2 idle cores at best: the serial CPU time over the busiest worker's.\n\n")
    md += markdown_table(["case", "layers", "serial s", "2 proc. s (with start-up)", "2 proc. s (warm pool)",
                          "ratio (with start-up)", "ratio (warm)", "serial CPU s", "2 proc. solve CPU s", "busiest worker CPU s",
                          "CPU bound (serial CPU / busiest worker)",
                          "same bytes", "runs serial/parallel s"], rows) + "\n"
    write_result("parallel_solve", md)


if __name__ == "__main__":
    main()
