"""Asymmetric reconstruction through the whole pipeline (method.md section 4).

On a two-layer chain whose first layer is cut hard, fitting the second layer on inputs from the
already-approximated first layer must beat fitting it on the original inputs, measured on the
second layer's output against the original model (held-out inputs, onnxruntime).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from builders import conv_chain, run

import onnx_lowrank


def _with_output(model, name):
    m = type(model)()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(name, 1, None))
    return m


@pytest.mark.parametrize("method", ["linear", "nonlinear"])
def test_asymmetric_beats_symmetric_on_second_layer(method):
    model = conv_chain([8, 48, 48], size=12, seed=3, lowrank_bias=24)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((120, 8, 12, 12)).astype(np.float32)
    test = rng.standard_normal((40, 8, 12, 12)).astype(np.float32)
    ranks = {"conv0": 4, "conv1": 40}
    target = run(_with_output(model, "a1"), {"input": test})[1]
    errors = {}
    for asym in (False, True):
        res = onnx_lowrank.compress(model, {"input": calib}, ranks=ranks, speedup=None, method=method,
                                    asymmetric=asym, samples_per_image=20, schedule=((10, 0.01), (10, 1.0)))
        assert [lay["rank"] for lay in res.report["layers"]] == [4, 40]
        out = run(_with_output(res.model, "a1"), {"input": test})[1]
        errors[asym] = float(np.sum((out - target) ** 2) / np.sum(target ** 2))
    assert errors[True] < 0.95 * errors[False], errors


def test_report_records_method_and_errors_per_layer():
    model = conv_chain([8, 32, 32], size=10, seed=1, lowrank_bias=12)
    calib = np.random.default_rng(1).standard_normal((40, 8, 10, 10)).astype(np.float32)
    res = onnx_lowrank.compress(model, {"input": calib}, ranks={"conv0": 8, "conv1": 8}, speedup=None,
                                schedule=((5, 0.01), (5, 1.0)))
    for lay in res.report["layers"]:
        assert lay["target"] == "after relu"
        # The safety net keeps a linear fit only when it is better on the held-back samples, and says so.
        assert lay["method"] == "nonlinear" or "kept the" in lay["note"]
        assert 0 <= lay["rel_error"] < 1 and 0 <= lay["rel_error_linear"] < 1
        assert lay["rel_error"] <= lay["rel_error_linear"]


def test_conv_after_runtime_shape_is_measured_not_skipped():
    """A Reshape whose target shape is computed at run time hides later shapes from shape inference;
    the pipeline measures them with one onnxruntime run instead of skipping the Conv."""
    from builders import he, model_from

    from onnx_lowrank.graph.layers import find_conv_layers
    from onnx_lowrank.graph.loading import infer_value_types, with_input_shapes
    from onnx_lowrank.graph.normalise import normalise

    rng = np.random.default_rng(0)
    inits = {"w0": he(rng, (16, 4, 3, 3), 36), "w1": he(rng, (24, 16, 3, 3), 144)}
    nodes = [helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["a0"], name="act0"),
             helper.make_node("Shape", ["a0"], ["s"]),
             helper.make_node("Max", ["s", "s"], ["s2"]),  # opaque to shape inference's data propagation
             helper.make_node("Reshape", ["a0", "s2"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["output"], name="act1")]
    model = model_from(nodes, inits, ["N", 4, 10, 10], "output", ["N", 24, 10, 10])
    norm = normalise(model)
    layers = find_conv_layers(norm, infer_value_types(with_input_shapes(norm, {"input": [1, 4, 10, 10]})))
    assert layers[1].skip_reason and layers[1].skip_reason.startswith("output shape unknown")
    x = rng.standard_normal((30, 4, 10, 10)).astype(np.float32)
    res = onnx_lowrank.compress(model, {"input": x}, ranks={"conv1": 4}, speedup=None, method="linear")
    conv1 = res.report["layers"][1]
    assert conv1["status"] == "factorised" and conv1["rank"] == 4
    assert conv1["output_size"] == [10, 10]
    assert conv1["flops_before"] == 2 * 24 * 16 * 9 * 100


def test_too_few_samples_fall_back_to_symmetric():
    model = conv_chain([8, 48, 48], size=4, seed=3, lowrank_bias=24)
    x = np.random.default_rng(0).standard_normal((10, 8, 4, 4)).astype(np.float32)
    res = onnx_lowrank.compress(model, {"input": x}, ranks={"conv0": 8, "conv1": 8}, speedup=None,
                                method="linear", samples_per_image=4)
    for lay in res.report["layers"]:
        assert lay["asymmetric"] is False and "fitted symmetrically" in lay["note"]
    res = onnx_lowrank.compress(model, {"input": x}, ranks={"conv0": 8, "conv1": 8}, speedup=None,
                                method="linear", samples_per_image=4, asymmetric=False)
    assert all(lay["asymmetric"] is False and lay["note"] == "" for lay in res.report["layers"])


def test_block_output_that_is_also_the_next_shortcut():
    """MobileNetV2 / EfficientNet pattern: conv0's output is both a compressed layer's target and
    the shortcut of conv2's residual Add. Its samples must be kept apart per layer."""
    from builders import he, model_from

    rng = np.random.default_rng(5)
    inits = {"w0": he(rng, (16, 8, 1, 1), 8), "w1": he(rng, (32, 16, 3, 3), 144), "w2": he(rng, (16, 32, 1, 1), 32)}
    nodes = [helper.make_node("Conv", ["input", "w0"], ["t0"], name="conv0"),
             helper.make_node("Conv", ["t0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"], name="act1"),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "t0"], ["output"], name="add")]
    model = model_from(nodes, inits, ["N", 8, 9, 9], "output", ["N", 16, 9, 9])
    x = rng.standard_normal((60, 8, 9, 9)).astype(np.float32)
    test = rng.standard_normal((10, 8, 9, 9)).astype(np.float32)
    for asym in (False, True):
        res = onnx_lowrank.compress(model, {"input": x}, ranks={"conv0": 4, "conv1": 8, "conv2": 6}, speedup=None,
                                    asymmetric=asym, samples_per_image=12, method="linear")
        conv2 = res.report["layers"][2]
        assert conv2["target"] == "after residual add" and conv2["status"] == "factorised"
        ref, out = run(model, {"input": test})[0], run(res.model, {"input": test})[0]
        assert out.shape == ref.shape
        assert np.sum((out - ref) ** 2) / np.sum(ref ** 2) < 0.5


def test_disk_spill_gives_the_same_model_as_memory(monkeypatch):
    """The propagation cache spills to disk past its memory budget; results must not depend on it."""
    from onnx_lowrank.calibration import sampling

    model = conv_chain([4, 16, 16, 16], size=8, seed=2, lowrank_bias=6)
    x = np.random.default_rng(2).standard_normal((24, 4, 8, 8)).astype(np.float32)
    kwargs = dict(ranks={"conv1": 4, "conv2": 4}, speedup=None, method="linear", batch_size=5)
    in_memory = onnx_lowrank.compress(model, {"input": x}, **kwargs).model.SerializeToString()
    original_init = sampling.Propagator.__init__

    def tiny_budget(self, *args, **kw):
        original_init(self, *args, **kw)
        self.memory_budget = 0

    monkeypatch.setattr(sampling.Propagator, "__init__", tiny_budget)
    on_disk = onnx_lowrank.compress(model, {"input": x}, **kwargs).model.SerializeToString()
    assert on_disk == in_memory
