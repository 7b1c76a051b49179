"""Reading and writing ONNX models, input shapes and inferred value types (normalising: normalise.py).

The caller's file is never touched: we work on an in-memory copy and write results atomically.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path

import onnx
from onnx import shape_inference

from ..errors import LowRankError
from .external import attach_external_data, has_external_data, is_large, save_with_external_data, uses_external_data

MIN_OPSET = 9


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model, with one-line errors for the usual mistakes; external data stays on disk
    (graph/external.py), read where needed."""
    p = Path(path)
    if not p.exists():
        raise LowRankError(f"model file not found: {p} (check the path)")
    if p.is_dir():
        raise LowRankError(f"{p} is a directory, not an ONNX file: pass the .onnx file itself")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise LowRankError(f"{p} is not a readable ONNX model ({type(exc).__name__}); pass a .onnx file") from None
    if not model.graph.node:
        raise LowRankError(f"{p} is not a readable ONNX model (its graph has no nodes); pass a .onnx file")
    if has_external_data(model):  # weights stay in their files (external.py), the proto stays small
        try:
            attach_external_data(model, str(p.parent), p.name)
        except OSError as exc:
            raise LowRankError(f"{p}: cannot read its external weight data ({exc}); keep the data files beside "
                               "the model") from None
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise LowRankError(f"{p} uses opset {opset}; onnx-lowrank needs opset {MIN_OPSET} or newer "
                           "(convert it with onnx.version_converter first)")
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write beside the target, then rename: the output appears whole or not at all."""
    from ..files import write_together

    write_together([(path, model_writer(model))])


def model_writer(model: onnx.ModelProto, external: bool = False):
    """A writer for :func:`onnx_lowrank.files.write_together`.

    Models with external data or above the size limit (external.large_model_bytes, below protobuf's
    2 GB), or ``external`` ones (their input came with external data), get their weights in one
    ``<name>.data`` file beside them, streamed without a second copy.
    """
    def write(tmp: str) -> None:
        if external or uses_external_data(model):
            save_with_external_data(model, tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
    return write


_SHAPE_RE = re.compile(r"^(.+):(\d+(?:[x,]\d+)*)$")


def parse_input_shapes(specs: list[str] | tuple[str, ...] | None) -> dict[str, list[int]]:
    """Parse ``NAME:1x3x224x224`` options (the name may itself contain colons)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or ():
        m = _SHAPE_RE.match(spec.strip())
        if not m:
            raise LowRankError(f"bad --input-shape {spec!r}: write NAME:DIMS, e.g. input:1x3x224x224")
        shapes[m.group(1)] = [int(v) for v in re.split(r"[x,]", m.group(2))]
    return shapes


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (old models also list initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Copy of the model whose inputs have the given concrete shapes (for shape inference and FLOPs)."""
    m = copy.deepcopy(model)
    names = {i.name for i in real_inputs(m)}
    for name in shapes:
        if name not in names:
            raise LowRankError(f"--input-shape names {name!r}, which is not a model input "
                               f"(inputs: {', '.join(sorted(names))})")
    for inp in m.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            if len(dims) and len(dims) != len(shapes[inp.name]):
                raise LowRankError(f"--input-shape {inp.name}: {len(shapes[inp.name])} dims given, "
                                   f"the model's input has {len(dims)}")
            inp.type.tensor_type.shape.Clear()
            for v in shapes[inp.name]:
                inp.type.tensor_type.shape.dim.add().dim_value = v
    return m


def infer_value_types(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | None] | None]]:
    """Element type and (possibly partial) shape of every tensor that shape inference can reach."""
    try:
        if is_large(model):  # over protobuf's limit: inferred from files (weights in a data file)
            with tempfile.TemporaryDirectory(prefix="onnx-lowrank-shapes-") as tmp:
                src, dst = os.path.join(tmp, "m.onnx"), os.path.join(tmp, "inferred.onnx")
                save_with_external_data(model, src)
                shape_inference.infer_shapes_path(src, dst, data_prop=True)
                inferred = onnx.load(dst, load_external_data=False)
        else:
            inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    out: dict[str, tuple[int, list[int | None] | None]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.elem_type:
            continue
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out[vi.name] = (tt.elem_type, shape)
    for t in g.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    return out
