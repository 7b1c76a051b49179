"""Real architectures (the onnx wheel's ``light_*`` model-zoo graphs with He-normal weights) go
through the whole pipeline: the output passes the checker, runs with the original's output
shape, and the report's FLOPs add up, including for ResNet's ``Sum`` residual blocks with the
asymmetric solve. Random weights: nothing here measures accuracy.

The solver schedule is cut to a few iterations to keep this fast; it does not change the graph
that is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import light_models  # noqa: E402
from onnx_lowrank import compress  # noqa: E402
from onnx_lowrank.graph.layers import find_conv_layers, node_flops  # noqa: E402
from onnx_lowrank.graph.loading import infer_value_types  # noqa: E402
from onnx_lowrank.graph.normalise import normalise  # noqa: E402

# These tests check FLOP counts of the rewritten graphs: FLOP objective (the latency one is in test_latency.py).
FAST = dict(max_images=5, samples_per_image=6, schedule=((2, 0.01), (2, 1.0)), threads=2, objective="flops")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("light")


def _session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    blob = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def _feeds(path: Path, n: int = 5):
    name = _session(path).get_inputs()[0].name
    return name, {name: light_models.random_input(n, seed=1)}


def _model_flops(model: onnx.ModelProto) -> int:
    norm = normalise(model)
    return sum(node_flops(norm, infer_value_types(norm)).values())


def _wide_convs(path: Path, limit: int) -> list[str]:
    """Conv layers with more than ``limit`` input or output channels (their d x d solves are slow)."""
    norm = normalise(onnx.load(str(path)))
    lays = find_conv_layers(norm, infer_value_types(norm))
    return [lay.name for lay in lays if max(lay.in_channels, lay.out_channels) > limit]


def _compress(name: str, cache: Path, speedup: float, exclude=()):
    path = light_models.materialise(name, cache)
    inp, data = _feeds(path)
    result = compress(str(path), data, speedup=speedup, exclude=list(exclude), **FAST)
    return path, inp, result


def _check_common(path: Path, inp: str, result, speedup: float):
    onnx.checker.check_model(result.model, full_check=True)
    x = light_models.random_input(1, seed=7)
    y0 = _session(path).run(None, {inp: x})
    y1 = _session(result.model).run(None, {inp: x})
    assert [a.shape for a in y1] == [a.shape for a in y0]
    assert all(np.isfinite(a).all() for a in y1)

    rep = result.report
    layers = rep["layers"]
    saved = sum(lay["flops_before"] - lay["flops_after"] for lay in layers)
    assert rep["flops_before"] - rep["flops_after"] == saved
    assert rep["conv_flops_before"] - rep["conv_flops_after"] + rep["dense_flops_before"] - rep["dense_flops_after"] \
        == saved
    assert rep["conv_flops_before"] == sum(lay["flops_before"] for lay in layers if lay["op"] == "Conv")
    assert rep["dense_flops_before"] == sum(lay["flops_before"] for lay in layers if lay["op"] != "Conv")
    # The report's numbers are those of the actual graphs, counted independently.
    assert rep["flops_before"] == _model_flops(onnx.load(str(path)))
    assert rep["flops_after"] == _model_flops(result.model)
    assert rep["speedup_theoretical"] >= speedup * 0.99
    factorised = [lay for lay in layers if lay["status"] == "factorised"]
    assert factorised
    for op in ("Conv", "Gemm"):  # each factorised layer adds one node of its op (3-D: two)
        n_op = sum(n.op_type == op for n in result.model.graph.node)
        assert n_op == sum(lay["op"] == op for lay in layers) + \
            sum(2 if lay.get("scheme") == "3d" else 1 for lay in factorised if lay["op"] == op)
    for lay in factorised:
        assert 1 <= lay["rank"] < lay["break_even_rank"] + 1
        assert lay["flops_after"] < lay["flops_before"]
    return factorised


def test_materialise_is_deterministic_and_runs(cache):
    p = light_models.materialise("squeezenet", cache)
    again = light_models.materialise_model(onnx.load(str(light_models.source_path("squeezenet"))))
    assert again.SerializeToString() == onnx.load(str(p)).SerializeToString()
    m = onnx.load(str(p))
    assert not any(n.op_type == "ConstantOfShape" for n in m.graph.node)
    assert [i.name for i in m.graph.input] == ["data_0"]
    onnx.checker.check_model(m, full_check=True)
    _, shape, std = light_models.check(p)
    assert shape == (1, 1000, 1, 1) and std > 0
    w = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}["fire9/expand3x3_w_0"]
    assert w.shape == (256, 64, 3, 3)
    assert abs(w.std() - np.sqrt(2 / (64 * 9))) < 0.05 * np.sqrt(2 / (64 * 9))


def test_squeezenet(cache):
    path, inp, result = _compress("squeezenet", cache, 2.0)
    _check_common(path, inp, result, 2.0)
    assert result.report["asymmetric"] is True


def test_resnet50_residual_sum_asymmetric(cache):
    # Stages res4 / res5 (1024 and 2048 channels) are excluded: each solver iteration does a
    # d x d eigh, minutes on a 2-core machine; res2 / res3 have the same residual patterns.
    path = light_models.materialise("resnet50", cache)
    wide = _wide_convs(path, 512)
    assert len(wide) == 19  # res4 and res5 layers with 1024 or 2048 channels
    path, inp, result = _compress("resnet50", cache, 1.25, exclude=wide)
    factorised = _check_common(path, inp, result, 1.25)
    assert result.report["asymmetric"] is True
    src = onnx.load(str(path))
    assert sum(n.op_type == "Sum" for n in src.graph.node) == 16
    # The last Conv of each bottleneck feeds Sum(shortcut) -> Relu: the shortcut is an offset.
    with_shortcut = [lay for lay in result.report["layers"] if "residual" in (lay["target"] or "")]
    assert len(with_shortcut) >= 16, [lay["target"] for lay in result.report["layers"]]
    assert any("residual" in (lay["target"] or "") for lay in factorised)
    for lay in factorised:
        assert lay["rel_error"] is not None and np.isfinite(lay["rel_error"])


def test_resnet50_3d_and_auto_schemes(cache):
    """Bottlenecks: 1 x 1 Convs keep the pair, 3 x 3 ones are split; residual shortcuts as offsets."""
    path = light_models.materialise("resnet50", cache)
    wide = _wide_convs(path, 128)
    inp, data = _feeds(path)
    for scheme in ("3d", "auto"):
        result = compress(str(path), data, speedup=1.15, exclude=wide, scheme=scheme, **FAST)
        factorised = _check_common(path, inp, result, 1.15)
        kinds = {lay["scheme"] for lay in factorised if lay["op"] == "Conv"}
        assert kinds <= {"3d", "channel"}
        assert all(lay["scheme"] == "channel" for lay in factorised if lay["kernel"] == [1, 1] and lay["op"] == "Conv")
        assert all(lay["scheme"] == "dense" for lay in factorised if lay["op"] != "Conv")  # the fc Gemm
        if scheme == "3d":
            assert "3d" in kinds
