"""onnxruntime sessions: how each use sets them up (profiles), how they are made, and run.

Two uses need different settings, kept here as named profiles so that no other module builds
``SessionOptions``:

* ``CALIBRATION`` reads intermediate tensors once per batch, untimed: basic graph optimisation
  (constant folding and redundant-node removal only, so the values read are those of the graph as
  written and sessions are quick to build for the many segments of asymmetric calibration) and
  onnxruntime's default spinning thread pool (back-to-back runs of one session gain from it).
* ``TIMING`` runs a model the way it is deployed: every graph optimisation (fusions, NCHWc
  layouts) and no inter-op parallelism. Its intra-op threads do not spin between runs: sessions
  are timed interleaved, and a spinning pool left by the session run just before steals the cores
  from the next one (with 2 threads on 2 cores, four interleaved ResNet-50 sessions each took 51 ms
  with spinning, 28 ms without, and 27 ms alone: benchmarks/spinning.py), which would corrupt
  every ratio at more than one thread.

Any error onnxruntime raises while loading or running becomes a one-line :class:`LowRankError`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from ..errors import LowRankError
from ..graph.external import session_file, uses_external_data
from .timing import Rounds, interleave

__all__ = ["Profile", "CALIBRATION", "TIMING", "PROFILES", "ORT_ERRORS", "session", "run", "one_line", "time_models"]

# onnxruntime's own exceptions derive from Exception only; catch them by name so that
# bugs in this package (TypeError, KeyError, ...) are not disguised as user errors.
ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(_ort_state, name)
    for name in ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
                 "ModelLoaded", "NotImplemented", "RuntimeException", "EPFail")
    if isinstance(getattr(_ort_state, name, None), type)
)


@dataclass(frozen=True)
class Profile:
    """How a session is set up for one use (see the module docstring for why each differs)."""

    name: str
    optimization: ort.GraphOptimizationLevel
    #: Intra-op threads busy-wait for work between runs (onnxruntime's default).
    spinning: bool
    #: ``inter_op_num_threads``; ``None`` keeps onnxruntime's default.
    inter_op_threads: int | None

    def options(self, threads: int | None = None, profile_prefix: str | None = None) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = self.optimization
        if self.inter_op_threads is not None:
            opts.inter_op_num_threads = self.inter_op_threads
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = int(threads)
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        return opts


CALIBRATION = Profile("calibration", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, spinning=True,
                      inter_op_threads=None)
TIMING = Profile("timing", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, spinning=False, inter_op_threads=1)
PROFILES = {p.name: p for p in (CALIBRATION, TIMING)}


def session(model: onnx.ModelProto | str | os.PathLike, profile: Profile, threads: int | None = None,
            profile_prefix: str | None = None) -> ort.InferenceSession:
    """A CPU session of ``model`` (a ModelProto or a file path) set up by ``profile``.

    A file is loaded by onnxruntime itself, with its external data beside it; so is a ModelProto
    whose weights are kept in data files or that is too big to serialise in one piece (it is
    written beside its data first: graph/external.py). Others are passed as bytes.
    """
    what = "<in-memory model>" if isinstance(model, onnx.ModelProto) else str(model)
    if not isinstance(model, onnx.ModelProto) and not os.path.isfile(model):
        raise LowRankError(f"model not found: {model}; check the path")
    opts = profile.options(threads, profile_prefix)
    try:
        with _source(model) as source:
            return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as err:
        raise LowRankError(f"onnxruntime cannot load {what}: {one_line(err)}; check that it is a valid ONNX model") \
            from err


@contextmanager
def _source(model):
    if not isinstance(model, onnx.ModelProto):
        yield str(model)
    elif uses_external_data(model):
        with session_file(model) as path:
            yield path
    else:
        yield model.SerializeToString()


def run(sess: ort.InferenceSession, names: list[str] | None, feed: dict, what: str = "the model") -> list:
    """``sess.run(names, feed)``, with onnxruntime's complaints about the data as a one-line error."""
    try:
        return sess.run(names, feed)
    except ORT_ERRORS as err:
        shapes = ", ".join(f"{k} {list(getattr(v, 'shape', []))}" for k, v in feed.items())
        raise LowRankError(f"onnxruntime could not run {what} on inputs {shapes}: {one_line(err)} "
                           "(check the input shapes, dtypes and preprocessing)") from err


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def time_models(models: list, feeds: dict | list[dict], threads: int | None = None, **timing) -> Rounds:
    """Time ``models`` (ModelProtos or paths) in ``TIMING`` sessions, interleaved (see timing.py).

    ``feeds``: one feed for all, or one per model; ``timing``: :func:`interleave`'s options.
    """
    sessions = [session(m, TIMING, threads) for m in models]
    per_model = [feeds] * len(models) if isinstance(feeds, dict) else list(feeds)
    runners = [lambda _, s=s, f=f: run(s, None, f) for s, f in zip(sessions, per_model)]
    return interleave(runners, **timing)
