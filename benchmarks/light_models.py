"""Runnable versions of the real architectures shipped (weightless) in the ``onnx`` wheel.

``onnx/backend/test/data/light/light_NAME.onnx`` are ONNX model-zoo graphs (opset 9, input
1x3x224x224) whose large weights were replaced by ``ConstantOfShape`` placeholders. This module
replaces each placeholder by an initializer:

* Conv / Gemm weights: He-normal, ``std = sqrt(2 / fan_in)`` with the fan-in taken from the
  shape (``c/group * kh * kw`` for Conv, the reduced axis of Gemm as set by ``transB``);
* Conv / Gemm biases, BatchNormalization bias (input 2) and mean (input 3), additive terms: 0;
* BatchNormalization scale (input 1) and variance (input 4), multiplicative terms: 1.

The role of each placeholder is found from the node that consumes it (through ``Unsqueeze`` /
``Reshape``, as in DenseNet's ``Mul``/``Add`` scale layers). Values are seeded per tensor name,
so the same ``seed`` always gives the same file. Initializers are no longer listed as graph
inputs (IR version raised to at least 4), so onnxruntime treats the weights as constants.

Random weights: latency, tool run time, memory and rewrite correctness only; no accuracy
meaning. Materialised VGG-19 is about 575 MB: it goes into a cache, never into git.

    python benchmarks/light_models.py vgg19          # prints the path of the materialised model
    python benchmarks/light_models.py all --check    # every model, checked in onnxruntime
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["vgg19", "resnet50", "bvlc_alexnet", "squeezenet", "densenet121", "inception_v1", "inception_v2",
         "shufflenet", "zfnet512"]
INPUT_SHAPE = (1, 3, 224, 224)

# Through these ops a placeholder keeps its role (DenseNet: Unsqueeze -> Mul / Add).
_PASS_THROUGH = {"Unsqueeze", "Reshape", "Identity", "Cast"}


def light_dir() -> Path:
    return Path(importlib.util.find_spec("onnx").submodule_search_locations[0]) / "backend" / "test" / "data" / "light"


def source_path(name: str) -> Path:
    name = _canonical(name)
    return light_dir() / f"light_{name}.onnx"


def _canonical(name: str) -> str:
    n = name.removeprefix("light_").removesuffix(".onnx")
    if n == "alexnet":
        n = "bvlc_alexnet"
    if n not in NAMES:
        raise ValueError(f"unknown light model {name!r}; choose from {', '.join(NAMES)}")
    return n


def materialise(name: str, cache_dir: str | os.PathLike = ".cache", seed: int = 0) -> Path:
    """Path of the runnable ``light_NAME.onnx`` in ``cache_dir`` (relative: to the repository root),
    written the first time. Deterministic for a given ``seed``."""
    name = _canonical(name)
    cache = Path(cache_dir)
    if not cache.is_absolute():
        cache = ROOT / cache
    out = cache / (f"light_{name}.onnx" if seed == 0 else f"light_{name}.seed{seed}.onnx")
    if out.exists():
        return out
    model = materialise_model(onnx.load(str(source_path(name))), seed)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=cache)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    cons: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i:
                cons.setdefault(i, []).append((n, k))
    return cons


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _role(tensor: str, shape: list[int], cons) -> tuple[str, int]:
    """('he', fan_in) | ('zeros', 0) | ('ones', 0) for the placeholder named ``tensor``."""
    seen = set()
    frontier = [tensor]
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        for node, k in cons.get(t, []):
            op = node.op_type
            if op in _PASS_THROUGH and k == 0:
                frontier.extend(node.output)
                continue
            if op == "Conv":
                if k == 1:
                    return "he", int(np.prod(shape[1:]))
                if k == 2:
                    return "zeros", 0
            if op == "Gemm":
                if k == 1:
                    return "he", int(shape[1] if _attr(node, "transB", 0) else shape[0])
                if k == 2:
                    return "zeros", 0
            if op == "MatMul" and k == 1:
                return "he", int(shape[0])
            if op == "BatchNormalization" and k in (1, 2, 3, 4):
                return ("ones", 0) if k in (1, 4) else ("zeros", 0)
            if op in ("Mul", "Div"):
                return "ones", 0
            if op in ("Add", "Sub", "Sum"):
                return "zeros", 0
            if op == "PRelu":
                return "zeros", 0
    raise ValueError(f"cannot tell the role of placeholder {tensor!r} (consumers: "
                     f"{[(n.op_type, k) for n, k in cons.get(tensor, [])]})")


def materialise_model(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace every ConstantOfShape placeholder of ``model`` by a seeded initializer (in place)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    cons = _consumers(g)
    keep, new = [], []
    for node in g.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = [int(v) for v in numpy_helper.to_array(inits[node.input[0]]).reshape(-1)]
        out = node.output[0]
        value = _attr(node, "value", None)
        dtype = numpy_helper.to_array(value).dtype if value is not None else np.dtype(np.float32)
        role, fan_in = _role(out, shape, cons)
        if role == "he":
            rng = np.random.default_rng([seed, zlib.crc32(out.encode())])
            arr = rng.standard_normal(shape, dtype=np.float32)
            arr *= np.float32(np.sqrt(2.0 / max(fan_in, 1)))
            arr = arr.astype(dtype, copy=False)
        elif role == "ones":
            arr = np.ones(shape, dtype=dtype)
        else:
            arr = np.zeros(shape, dtype=dtype)
        new.append(numpy_helper.from_array(arr, out))
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new)
    # Drop the now unused shape tensors, then list no initializer as a graph input.
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    names = {t.name for t in g.initializer}
    feeds = [i for i in g.input if i.name not in names and i.name in used]
    del g.input[:]
    g.input.extend(feeds)
    if model.ir_version < 4:
        model.ir_version = 4
    return model


def random_input(batch: int = 1, seed: int = 0) -> np.ndarray:
    """ImageNet-normalised-looking random input (roughly unit variance)."""
    return np.random.default_rng(seed).standard_normal((batch,) + INPUT_SHAPE[1:], dtype=np.float32)


def check(path: str | os.PathLike) -> tuple[str, tuple[int, ...], float]:
    """Run the model once in onnxruntime: (input name, output shape, output std)."""
    from onnx_lowrank import runtime

    sess = runtime.session(path, runtime.TIMING, threads=2)
    inp = sess.get_inputs()
    if len(inp) != 1:
        raise AssertionError(f"{path}: expected one input, got {[i.name for i in inp]}")
    y = sess.run(None, {inp[0].name: random_input()})[0]
    if not np.all(np.isfinite(y)):
        raise AssertionError(f"{path}: non-finite outputs")
    return inp[0].name, tuple(y.shape), float(y.std())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="+", help=f"model names ({', '.join(NAMES)}) or 'all'")
    ap.add_argument("--cache-dir", default=".cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="also run each model once in onnxruntime")
    args = ap.parse_args(argv)
    names = NAMES if args.names == ["all"] else args.names
    for n in names:
        p = materialise(n, args.cache_dir, args.seed)
        if args.check:
            inp, shape, std = check(p)
            print(f"{p}\t{p.stat().st_size / 1e6:.1f} MB\tinput {inp}\toutput {shape}\tstd {std:.3g}")
        else:
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
