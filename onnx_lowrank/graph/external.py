"""Weights kept on disk: models over protobuf's 2 GB limit, and models that come with external data.

A ModelProto cannot be serialised above 2 GB, and holding a model's weights in memory twice (the
proto, then onnxruntime's copy, then a rewritten proto) costs several times its size. So a model
whose file has external data keeps it there: its tensors point (``external_data`` with an
*absolute* location) at hard links of its data files in a private work folder, the proto itself
stays small, and weights are read as memory maps (:func:`tensor_array`) only where needed. A
proto that is large in memory is moved out the same way after normalisation (:func:`externalise`).

onnxruntime only reads data files in the model's own folder, through relative locations: a
session's ``.onnx`` is written into the work folder beside the data (:func:`session_file`).
Output files get one ``<name>.data`` of their own (:func:`save_with_external_data`). Sizes are
compared with :func:`large_model_bytes`, lowered by ``$ONNX_LOWRANK_LARGE_MODEL_BYTES`` so that a
tiny model takes the same path in tests.
"""

from __future__ import annotations

import atexit
import ctypes
import mmap
import os
import shutil
import tempfile
import uuid
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import LowRankError

__all__ = ["large_model_bytes", "is_large", "has_external_data", "uses_external_data", "has_big_tensors", "identity_bytes",
           "tensor_array",
           "attach_external_data", "externalise", "save_with_external_data", "session_file", "release_mapped_pages",
           "WeightFile"]

#: Below protobuf's 2 GB with room for the graph itself.
DEFAULT_LARGE_MODEL_BYTES = 1_800_000_000
#: Tensors at least this big go to data files (small ones, e.g. shapes, stay inline: shape
#: inference reads them); offsets are aligned so that they can be mapped.
MIN_EXTERNAL_BYTES = 1024
_ALIGN = 4096
_work: list[str] = []
_maps: list[weakref.ref] = []  # the memory maps handed out (arrays are unhashable: no WeakSet)


def large_model_bytes() -> int:
    """Size above which a model's weights are kept in data files rather than in the proto."""
    value = os.environ.get("ONNX_LOWRANK_LARGE_MODEL_BYTES")
    return int(value) if value else DEFAULT_LARGE_MODEL_BYTES


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the weights alone pass the limit, counted from their shapes: ``ByteSize`` walks every byte
    of the message (about 0.08 s for a 100 MB model) and this is asked for every session made."""
    return _weight_bytes(_tensors(model)) > large_model_bytes()


def _weight_bytes(tensors: list[TensorProto]) -> int:
    return sum(_nbytes(t) for t in tensors if t.data_type)


def _tensors(model: onnx.ModelProto) -> list[TensorProto]:
    return list(onnx.external_data_helper._get_all_tensors(model))


def _external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(_external(t) for t in _tensors(model))


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model is written and run with its weights in data files."""
    tensors = _tensors(model)   # one walk of the graph for both questions: asked at every session made
    return any(_external(t) for t in tensors) or _weight_bytes(tensors) > large_model_bytes()


def _info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _set_info(t: TensorProto, info: dict[str, str]) -> None:
    del t.external_data[:]
    for key, value in info.items():
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def _nbytes(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def has_big_tensors(model: onnx.ModelProto) -> bool:
    """Whether writing with external data would put anything in a data file."""
    return any(_external(t) or (t.HasField("raw_data") and len(t.raw_data) >= MIN_EXTERNAL_BYTES)
               for t in _tensors(model))


def identity_bytes(model: onnx.ModelProto) -> bytes:
    """Serialised model for hashing: as written, except that data files are named by their own name,
    not by where this process keeps them (so that latency tables find the model again)."""
    if not has_external_data(model):
        return model.SerializeToString(deterministic=True)
    m = onnx.ModelProto()
    m.CopyFrom(model)  # small: the weights are external
    for t in _tensors(m):
        if _external(t):
            info = _info(t)
            _set_info(t, dict(info, location=os.path.basename(info["location"])))
    return m.SerializeToString(deterministic=True)


def tensor_array(t: TensorProto) -> np.ndarray:
    """The tensor's values; a read-only memory map for external data (nothing is read until used)."""
    if not _external(t):
        return numpy_helper.to_array(t)
    info = _info(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    shape = tuple(int(d) for d in t.dims)
    if _nbytes(t) == 0:
        return np.zeros(shape, dtype)
    array = np.memmap(info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=shape)
    _maps.append(weakref.ref(array))
    return array


def release_mapped_pages() -> None:
    """Drop the resident pages of every weight mapped so far (they are re-read from the file if used
    again): once a model's new weights are computed, its old ones need not stay in memory."""
    alive = [r for r in _maps if r() is not None]
    _maps[:] = alive
    for ref in alive:
        m = getattr(ref(), "_mmap", None)
        if m is not None and not m.closed:
            m.madvise(mmap.MADV_DONTNEED)


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc keeps them after many small frees, e.g. a
    protobuf arena's blocks); nothing where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class WeightFile:
    """New weights of a model that keeps its weights on disk, appended to one data file of the work
    folder as they are made: the rewritten proto stays small and holds no second copy."""

    def __init__(self):
        folder = os.path.join(_work_dir(), uuid.uuid4().hex[:12])
        os.makedirs(folder)
        self.path = os.path.join(folder, "weights.data")
        open(self.path, "wb").close()

    def tensor(self, array: np.ndarray, name: str) -> TensorProto:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.nbytes < MIN_EXTERNAL_BYTES:
            return numpy_helper.from_array(array, name)
        with open(self.path, "r+b") as f:
            f.seek(0, os.SEEK_END)
            offset = _pad(f)
            f.write(array.tobytes())
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape, data_location=TensorProto.EXTERNAL)
        _set_info(t, {"location": self.path, "offset": str(offset), "length": str(array.nbytes)})
        return t


def _work_dir() -> str:
    """This process's folder of data files, removed at exit."""
    if not _work:
        _work.append(tempfile.mkdtemp(prefix="onnx-lowrank-weights-"))
        atexit.register(shutil.rmtree, _work[0], True)
    return _work[0]


def attach_external_data(model: onnx.ModelProto, base_dir: str | os.PathLike, name: str) -> None:
    """Point a freshly loaded model's external tensors at links of its data files in the work folder.

    Hard links cost nothing and survive the user replacing the files; across file systems the
    files are copied. Small tensors are read into the proto (shape inference needs them).
    """
    folder = os.path.join(_work_dir(), f"{uuid.uuid4().hex[:8]}-{Path(name).stem}")
    linked: dict[str, str] = {}
    for t in _tensors(model):
        if not _external(t):
            continue
        info = _info(t)
        location = info.get("location", "")
        source = os.path.normpath(os.path.join(base_dir, location))
        if os.path.isabs(location) or location.startswith("..") or not os.path.isfile(source):
            raise LowRankError(f"{name}: external data {location!r} of tensor {t.name} is not a file beside the "
                               "model; keep the data files in the model's folder")
        if _nbytes(t) < MIN_EXTERNAL_BYTES:
            with open(source, "rb") as f:
                f.seek(int(info.get("offset", 0)))
                data = f.read(int(info.get("length", _nbytes(t))))
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = data
            continue
        if source not in linked:
            target = os.path.join(folder, location)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
            linked[source] = target
        info["location"] = linked[source]
        _set_info(t, info)


def externalise(model: onnx.ModelProto) -> None:
    """Move the model's inline tensors of ``MIN_EXTERNAL_BYTES`` or more to a data file in the work
    folder, in place: the proto becomes small and its weights are read through memory maps."""
    tensors = [t for t in _tensors(model) if not _external(t) and t.HasField("raw_data")
               and len(t.raw_data) >= MIN_EXTERNAL_BYTES]
    if not tensors:
        return
    path = WeightFile().path
    with open(path, "wb") as f:
        for t in tensors:
            offset = _pad(f)
            data = t.raw_data
            f.write(data)
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            _set_info(t, {"location": path, "offset": str(offset), "length": str(len(data))})
            del data


def _pad(f) -> int:
    offset = -(-f.tell() // _ALIGN) * _ALIGN
    f.seek(offset)
    return offset


def save_with_external_data(model: onnx.ModelProto, path: str | os.PathLike, copy_external: bool = True) -> None:
    """Write ``model`` to ``path`` with its big tensors in ``<name>.data`` beside it; ``model`` is unchanged.

    Inline tensors (and, with ``copy_external``, external ones) are streamed into the data file one
    at a time; without ``copy_external`` external tensors keep their files, referred to relative to
    ``path``'s folder (which must hold them). The proto is changed while the small ``.onnx`` is
    written and restored afterwards, so no second copy of the weights is ever held in memory.
    """
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    data_name = os.path.basename(path) + ".data"
    moved: list[tuple[TensorProto, list[tuple[str, str]], bool, bool]] = []  # tensor, old entries, had location, inline
    try:
        with open(os.path.join(folder, data_name), "wb") as f:
            for t in _tensors(model):
                if _external(t):
                    info = _info(t)
                    old = [(e.key, e.value) for e in t.external_data]
                    if copy_external:
                        offset = _pad(f)
                        _copy_range(info, f)
                        new = {"location": data_name, "offset": str(offset), "length": str(_nbytes(t))}
                    else:
                        new = dict(info, location=os.path.relpath(info["location"], folder))
                    moved.append((t, old, True, False))
                    _set_info(t, new)
                elif t.HasField("raw_data") and len(t.raw_data) >= MIN_EXTERNAL_BYTES:
                    offset = _pad(f)
                    data = t.raw_data
                    f.write(data)
                    length = len(data)
                    del data
                    moved.append((t, [("offset", str(offset)), ("length", str(length))],
                                  t.HasField("data_location"), True))
                    t.ClearField("raw_data")
                    t.data_location = TensorProto.EXTERNAL
                    _set_info(t, {"location": data_name, "offset": str(offset), "length": str(length)})
        with open(path, "wb") as f:
            f.write(model.SerializeToString(deterministic=True))
    finally:
        _restore(moved, os.path.join(folder, data_name))
        if not moved:
            os.unlink(os.path.join(folder, data_name))


def _copy_range(info: dict[str, str], out, chunk: int = 64 << 20) -> None:
    with open(info["location"], "rb") as src:
        src.seek(int(info.get("offset", 0)))
        left = int(info["length"]) if "length" in info else None
        while left is None or left > 0:
            block = src.read(chunk if left is None else min(chunk, left))
            if not block:
                break
            out.write(block)
            if left is not None:
                left -= len(block)


def _restore(moved, data_path: str) -> None:
    if not moved:
        return
    with open(data_path, "rb") as f:
        for t, old, had_location, inline in moved:
            if not inline:
                del t.external_data[:]
                for key, value in old:
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                continue
            info = dict(old)
            del t.external_data[:]
            if had_location:
                t.data_location = TensorProto.DEFAULT
            else:
                t.ClearField("data_location")
            f.seek(int(info["offset"]))
            t.raw_data = f.read(int(info["length"]))


@contextmanager
def session_file(model: onnx.ModelProto) -> Iterator[str]:
    """A file onnxruntime can load ``model`` from, beside its data; removed on exit.

    External tensors stay where they are (their common folder holds the ``.onnx``); inline big
    ones go to a data file beside it. Without external tensors a temporary folder is used.
    """
    files = {_info(t)["location"] for t in _tensors(model) if _external(t)}
    if files:
        folder = os.path.commonpath([os.path.dirname(p) for p in files])
        path = os.path.join(folder, f".session-{uuid.uuid4().hex[:12]}.onnx")
        try:
            save_with_external_data(model, path, copy_external=False)
            yield path
        finally:
            for p in (path, path + ".data"):
                if os.path.exists(p):
                    os.unlink(p)
    else:
        with tempfile.TemporaryDirectory(prefix="onnx-lowrank-large-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            save_with_external_data(model, path)
            yield path

