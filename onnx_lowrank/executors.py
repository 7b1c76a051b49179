"""Where independent pieces of work run: local worker processes (default) or Ray tasks.

Calibration shards and sweep points are independent: each is a top-level function of picklable
arguments, run by an executor that returns the results in order. ``local`` starts spawned worker
processes on this machine (each builds its own onnxruntime session); ``ray`` submits Ray tasks to
the cluster found by ``ray.init()`` (``RAY_ADDRESS``) or to a local one, and needs the optional
extra ``pip install "onnx-lowrank[ray]"``. Nothing here times anything: latency is measured on the
machine that runs the command only, and shipped to workers as a table file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from .errors import LowRankError


#: Set in workers: latency is measured on the machine that runs the command, never on a worker.
NO_TIMING = "ONNX_LOWRANK_WORKER_NO_TIMING"


def refuse_timing_on_worker(what: str) -> None:
    if os.environ.get(NO_TIMING):
        raise LowRankError(f"{what} would be measured on a worker; latency is measured on the target machine only: "
                           "measure a --latency-table there and ship it with the work")


def worker_threads(workers: int) -> int:
    """onnxruntime threads per worker, so that the workers share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class Executor:
    name = ""
    #: Work runs in an engine of its own (not this machine's worker processes): compress needs --shards to give
    #: it any, and the engine must be installed.
    engine = False

    @staticmethod
    def check_available() -> None:
        """Fail before any work when what this executor needs is not installed."""

    def __init__(self, workers: int | None = None):
        if workers is not None and workers < 1:
            raise LowRankError(f"--workers must be at least 1, not {workers}")
        self.workers = workers

    def map(self, fn: Callable, items: Sequence) -> list:
        raise NotImplementedError


class LocalExecutor(Executor):
    """Spawned worker processes (spawn, not fork: onnxruntime and BLAS thread pools do not survive a fork)."""

    name = "local"

    def map(self, fn: Callable, items: Sequence) -> list:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        workers = min(self.workers or os.cpu_count() or 1, len(items))
        if workers <= 1:
            return [fn(x) for x in items]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, items))


class RayExecutor(Executor):
    """Ray tasks, one CPU each; imported only when asked for."""

    name = "ray"
    engine = True

    @staticmethod
    def check_available() -> None:
        require_ray()

    def map(self, fn: Callable, items: Sequence) -> list:
        ray = require_ray()
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), num_cpus=None if os.environ.get("RAY_ADDRESS")
                     else self.workers, log_to_driver=False, include_dashboard=False)
        task = ray.remote(num_cpus=1)(fn)
        return ray.get([task.remote(x) for x in items])


def require_ray():
    try:
        import ray
    except ImportError:
        raise LowRankError('--executor ray needs Ray: pip install "onnx-lowrank[ray]" (or use --executor local)') \
            from None
    return ray


EXECUTORS: dict[str, type[Executor]] = {e.name: e for e in (LocalExecutor, RayExecutor)}


def executor_kind(name: str) -> type[Executor]:
    if name not in EXECUTORS:
        raise LowRankError(f"--executor must be one of {', '.join(EXECUTORS)}, not {name!r}")
    return EXECUTORS[name]


def get_executor(name: str, workers: int | None = None) -> Executor:
    return executor_kind(name)(workers)
