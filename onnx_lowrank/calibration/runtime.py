"""onnxruntime sessions for calibration, and its errors turned into one-line user errors."""

from __future__ import annotations

import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from ..errors import LowRankError

# onnxruntime's own exceptions derive from Exception only; catch them by name so that
# bugs in this module (TypeError, KeyError, ...) are not disguised as user errors.
ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(_ort_state, name)
    for name in (
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "InvalidProtobuf",
        "NoSuchFile",
        "NoModel",
        "ModelLoaded",
        "NotImplemented",
        "RuntimeException",
        "EPFail",
    )
    if isinstance(getattr(_ort_state, name, None), type)
)



def make_session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as err:
        raise LowRankError(f"onnxruntime cannot load the model: {one_line(err)}") from err


def run(sess: ort.InferenceSession, names: list[str], feed: dict) -> list:
    """``sess.run``, with onnxruntime's complaints about the data as a one-line error."""
    try:
        return sess.run(names, feed)
    except ORT_ERRORS as err:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
        raise LowRankError(f"onnxruntime could not run the model on inputs {shapes}: {one_line(err)} "
                           "(check the data's shapes and preprocessing)") from err


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")
