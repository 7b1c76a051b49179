"""Models over protobuf's 2 GB limit: their weights travel as external data, never in one message.

``model.SerializeToString()`` fails above 2 GB, so a ModelProto larger than
:func:`large_model_bytes` reaches onnxruntime (or a file) as a small ``.onnx`` plus one ``.data``
file holding its big tensors. The tensors are written one at a time from the proto itself and put
back afterwards, so no second copy of the model is ever held in memory. The threshold can be
lowered with ``$ONNX_LOWRANK_LARGE_MODEL_BYTES`` (tests make a tiny model take this path).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator

import onnx
from onnx import TensorProto

__all__ = ["large_model_bytes", "is_large", "model_source", "save_with_external_data"]

#: Below protobuf's 2 GB with room for the graph itself.
DEFAULT_LARGE_MODEL_BYTES = 1_800_000_000
#: Tensors at least this big go to the data file; offsets are aligned so onnxruntime can map them.
_MIN_EXTERNAL_BYTES = 1024
_ALIGN = 4096


def large_model_bytes() -> int:
    """Size above which a model is written and loaded with external data."""
    value = os.environ.get("ONNX_LOWRANK_LARGE_MODEL_BYTES")
    return int(value) if value else DEFAULT_LARGE_MODEL_BYTES


def is_large(model: onnx.ModelProto) -> bool:
    return model.ByteSize() > large_model_bytes()


@contextmanager
def model_source(model) -> Iterator[bytes | str]:
    """What ``onnxruntime.InferenceSession`` takes: a path as given, the bytes of a small ModelProto,
    or the path of a temporary copy with external data (removed on exit: onnxruntime has read it)."""
    if not isinstance(model, onnx.ModelProto):
        yield str(model)
    elif not is_large(model):
        yield model.SerializeToString()
    else:
        with tempfile.TemporaryDirectory(prefix="onnx-lowrank-large-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            save_with_external_data(model, path)
            yield path


def _inline_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    """Initializers (main graph and subgraphs) whose bytes sit in the proto and are worth moving out."""
    out = []
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= _MIN_EXTERNAL_BYTES and \
                tensor.data_location != TensorProto.EXTERNAL:
            out.append(tensor)
    return out


def save_with_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` with its big tensors in ``<name>.data`` beside it; ``model`` is unchanged.

    Each tensor's bytes are written, then dropped from the proto; once the small ``.onnx`` is
    written they are read back from the data file, one tensor at a time.
    """
    path = str(path)
    location = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(path), location)
    tensors = _inline_tensors(model)
    moved: list[tuple[TensorProto, int, int, bool]] = []  # tensor, offset, length, had data_location
    try:
        with open(data_path, "wb") as f:
            for tensor in tensors:
                offset = -f.tell() % _ALIGN + f.tell()
                f.seek(offset)
                data = tensor.raw_data
                f.write(data)
                length = len(data)
                del data
                moved.append((tensor, offset, length, tensor.HasField("data_location")))
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
        with open(path, "wb") as f:
            f.write(model.SerializeToString(deterministic=True))
    finally:
        _restore(moved, data_path)


def _restore(moved: list[tuple[TensorProto, int, int, bool]], data_path: str) -> None:
    if not moved:
        return
    with open(data_path, "rb") as f:
        for tensor, offset, length, had_location in moved:
            del tensor.external_data[:]
            if had_location:
                tensor.data_location = TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")
            f.seek(offset)
            tensor.raw_data = f.read(length)
