"""Calibration in shards: image ranges calibrated apart (by hand, in worker processes or as Ray tasks).

Shard i of n covers whole batches of the calibration images; its samples carry global image
indices, so the merged parts are exactly what one process samples (see calibration/samples.py)
and a Compressor given them writes the same model byte for byte.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from . import progress
from .calibration.samples import Samples, merge
from .executors import get_executor, worker_threads
from .compressor import Compressor
from .config import CompressConfig


def calibrate_shard(model, data, config: CompressConfig | None, shard: tuple[int, int]) -> Samples:
    """The samples of shard ``(i, n)`` (1-based i) of ``data``."""
    return Compressor(model, data, config, shard=shard).samples


def _shard_task(args) -> Samples:
    model, data, config, shard = args
    progress.set_enabled(False)
    return calibrate_shard(model, data, config, shard)


def calibrate(model, data, config: CompressConfig | None = None, shards: int = 2, executor: str = "local",
              workers: int | None = None) -> Samples:
    """All ``shards`` shards calibrated on ``executor`` (``"local"`` processes or ``"ray"`` tasks), merged.

    ``model`` and ``data`` travel to the workers: a model path (or ModelProto), and data that every
    worker can read (a path on a shared file system, or a picklable reader factory).
    """
    config = config or CompressConfig()
    ex = get_executor(executor, workers)
    if config.threads is None:
        config = replace(config, threads=worker_threads(workers or shards))
    if isinstance(model, (str, os.PathLike)):
        model = str(Path(model).resolve())
    if isinstance(data, (str, os.PathLike)):
        data = str(Path(data).resolve())
    progress.status(f"calibration: {shards} shard(s) on the {ex.name} executor")
    parts = ex.map(_shard_task, [(model, data, config, (i, shards)) for i in range(1, shards + 1)])
    return merge(parts)
