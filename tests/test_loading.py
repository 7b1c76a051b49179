"""Loading and normalising models, and reading the pattern around each Conv.

Normalisation must not change what the model computes: every check compares onnxruntime on the
normalised model with onnxruntime on the original.
"""

from __future__ import annotations

import copy
import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.graph.layers import find_conv_layers, node_flops
from onnx_lowrank.graph.loading import infer_value_types, load_model, parse_input_shapes, real_inputs, with_input_shapes
from onnx_lowrank.graph.normalise import normalise

from builders import conv_chain, run


def _model(nodes, inits, x_shape, outputs, opset=13, ir=8, extra_inputs=()):
    out_shape = [f"o{i}" for i in range(len(x_shape))]
    graph = helper.make_graph(
        nodes, "loading_test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape), *extra_inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, out_shape) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def _layers(model, shapes=None):
    norm = normalise(model)
    vt = infer_value_types(with_input_shapes(norm, shapes or {}))
    return find_conv_layers(norm, vt)


def _rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------------------------------------
# BatchNormalization folding


def _conv_bn_relu(rng, bias=True, c=3, d=6, eps=1e-3):
    w = (rng.standard_normal((d, c, 3, 3)) / 3).astype(np.float32)
    inits = {"w": w,
             "gamma": rng.uniform(0.2, 3.0, d).astype(np.float32) * rng.choice([-1, 1], d).astype(np.float32),
             "beta": rng.standard_normal(d).astype(np.float32),
             "mean": rng.standard_normal(d).astype(np.float32),
             "var": rng.uniform(0.01, 4.0, d).astype(np.float32)}
    conv_in = ["input", "w"]
    if bias:
        inits["b"] = rng.standard_normal(d).astype(np.float32)
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["bn"], name="bn",
                              epsilon=eps),
             helper.make_node("Relu", ["bn"], ["output"], name="relu")]
    return _model(nodes, inits, [2, c, 9, 9], ["output"])


@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_folding_is_exact(bias):
    rng = np.random.default_rng(1 + bias)
    m = _conv_bn_relu(rng, bias=bias)
    feed = {"input": rng.standard_normal((2, 3, 9, 9)).astype(np.float32)}
    norm = normalise(m)
    assert [n.op_type for n in norm.graph.node] == ["Conv", "Relu"]
    assert not any(n.op_type == "BatchNormalization" for n in norm.graph.node)
    # The BN parameters are gone from the initializers too.
    assert not {"gamma", "beta", "mean", "var"} & {t.name for t in norm.graph.initializer}
    onnx.checker.check_model(norm)
    assert _rel_err(run(norm, feed)[0], run(m, feed)[0]) < 1e-5
    # The caller's model is untouched.
    assert [n.op_type for n in m.graph.node] == ["Conv", "BatchNormalization", "Relu"]
    (lay,) = _layers(m)
    assert lay.skip_reason is None and lay.bias is not None and lay.activation == "relu"
    assert lay.output == "bn"


def test_batchnorm_not_folded_when_conv_output_has_other_users():
    rng = np.random.default_rng(3)
    d = 4
    inits = {"w": rng.standard_normal((d, 3, 3, 3)).astype(np.float32),
             "gamma": rng.uniform(0.5, 2, d).astype(np.float32), "beta": rng.standard_normal(d).astype(np.float32),
             "mean": rng.standard_normal(d).astype(np.float32), "var": rng.uniform(0.5, 2, d).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Add", ["bn", "y"], ["output"], name="add")]
    m = _model(nodes, inits, [1, 3, 6, 6], ["output"])
    feed = {"input": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    norm = normalise(m)
    assert [n.op_type for n in norm.graph.node] == ["Conv", "BatchNormalization", "Add"]
    assert _rel_err(run(norm, feed)[0], run(m, feed)[0]) < 1e-6


# ---------------------------------------------------------------------------------------------
# Constant nodes, IR 3 / opset 9, external data


def test_constant_node_weights_become_initializers():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w_value")),
             helper.make_node("Constant", [], ["b"], value_floats=b.tolist()),
             helper.make_node("Conv", ["input", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y"], ["output"], name="relu")]
    m = _model(nodes, {}, [1, 3, 7, 7], ["output"])
    onnx.checker.check_model(m)
    feed = {"input": rng.standard_normal((1, 3, 7, 7)).astype(np.float32)}
    norm = normalise(m)
    assert [n.op_type for n in norm.graph.node] == ["Conv", "Relu"]
    inits = {t.name: numpy_helper.to_array(t) for t in norm.graph.initializer}
    np.testing.assert_array_equal(inits["w"], w)
    np.testing.assert_array_equal(inits["b"], b)
    np.testing.assert_array_equal(run(norm, feed)[0], run(m, feed)[0])
    (lay,) = _layers(m)
    assert lay.skip_reason is None
    np.testing.assert_array_equal(lay.weight, w)


def _opset9_ir3_model(rng):
    """Old-style model: IR 3, opset 9, every initializer also listed as a graph input, BN after Conv."""
    d = 8
    inits = {"w0": (rng.standard_normal((d, 3, 3, 3)) / 5).astype(np.float32),
             "b0": rng.standard_normal(d).astype(np.float32),
             "gamma": rng.uniform(0.5, 2, d).astype(np.float32), "beta": rng.standard_normal(d).astype(np.float32),
             "mean": rng.standard_normal(d).astype(np.float32), "var": rng.uniform(0.5, 2, d).astype(np.float32),
             "w1": (rng.standard_normal((d, d, 3, 3)) / 8).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w0", "b0"], ["y0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["y0", "gamma", "beta", "mean", "var"], ["bn0"], name="bn0"),
             helper.make_node("Clip", ["bn0"], ["a0"], name="clip0", min=0.0, max=6.0),
             helper.make_node("Conv", ["a0", "w1"], ["y1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y1"], ["a1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["a1"], ["output"], name="gap")]
    extra = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inits.items()]
    m = _model(nodes, inits, [1, 3, 8, 8], ["output"], opset=9, ir=3, extra_inputs=extra)
    onnx.checker.check_model(m)
    return m


def test_opset9_ir3_initializers_as_inputs_normalises_and_runs():
    rng = np.random.default_rng(5)
    m = _opset9_ir3_model(rng)
    feed = {"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    norm = normalise(m)
    onnx.checker.check_model(norm)
    assert [i.name for i in norm.graph.input] == ["input"]
    assert [i.name for i in real_inputs(m)] == ["input"]
    assert [n.op_type for n in norm.graph.node] == ["Conv", "Clip", "Conv", "Relu", "GlobalAveragePool"]
    assert _rel_err(run(norm, feed)[0], run(m, feed)[0]) < 1e-5
    layers = _layers(m)
    assert [(lay.name, lay.activation, lay.skip_reason) for lay in layers] == [
        ("conv0", "clip", None), ("conv1", "relu", None)]
    assert layers[0].activation_params == {"min": 0.0, "max": 6.0}


def test_opset9_ir3_model_compresses(tmp_path):
    rng = np.random.default_rng(6)
    m = _opset9_ir3_model(rng)
    path = tmp_path / "old.onnx"
    onnx.save_model(m, str(path))
    data = {"input": rng.standard_normal((6, 3, 8, 8)).astype(np.float32)}
    res = onnx_lowrank.compress(str(path), data, output=tmp_path / "out.onnx", ranks={"conv1": 3}, speedup=None)
    new = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(new, full_check=True)
    assert {o.version for o in new.opset_import if o.domain in ("", "ai.onnx")} == {9}
    assert run(new, {"input": data["input"][:1]})[0].shape == run(m, {"input": data["input"][:1]})[0].shape
    assert {lay["name"]: lay["rank"] for lay in res.report["layers"]} == {"conv0": None, "conv1": 3}


def test_external_data_model_loads_and_compresses_without_touching_input(tmp_path):
    m = conv_chain([3, 8, 16], size=10, lowrank_bias=3, seed=7)
    src = tmp_path / "src"
    src.mkdir()
    path = src / "model.onnx"
    onnx.save_model(copy.deepcopy(m), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.weights", size_threshold=0)
    assert (src / "model.weights").exists()
    raw = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer)
    before = {p.name: _sha(p) for p in src.iterdir()}

    loaded = load_model(path)  # the weights stay on disk (graph/external.py), in links of the data file
    locations = {e.value for t in loaded.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations and all(os.path.isabs(p) and not p.startswith(str(src)) for p in locations)
    feed = {"input": np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)}
    from onnx_lowrank import runtime

    np.testing.assert_array_equal(runtime.session(loaded, runtime.TIMING).run(None, feed)[0], run(m, feed)[0])

    out = tmp_path / "out" / "model.lowrank.onnx"
    data = {"input": np.random.default_rng(1).standard_normal((8, 3, 10, 10)).astype(np.float32)}
    onnx_lowrank.compress(path, data, output=out, ranks={"conv1": 3}, speedup=None)
    assert {p.name: _sha(p) for p in src.iterdir()} == before          # input files byte-identical
    new = onnx.load(str(out))
    assert [n.name for n in new.graph.node if n.op_type == "Conv"] == ["conv0", "conv1_lowrank0", "conv1_lowrank1"]
    assert run(new, feed)[0].shape == run(m, feed)[0].shape
    # written with external data like its input, but every tensor left is under 1 KB: no data file
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.lowrank.onnx"]


def test_external_data_missing_is_a_user_error(tmp_path):
    m = conv_chain([3, 4], size=6, seed=1)
    path = tmp_path / "model.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    os.remove(tmp_path / "w.bin")
    with pytest.raises(LowRankError, match="external"):
        load_model(path)


def test_compress_leaves_input_file_byte_identical(tmp_path):
    m = conv_chain([3, 8, 16], size=10, lowrank_bias=3, seed=8)
    path = tmp_path / "m.onnx"
    onnx.save_model(m, str(path))
    h = _sha(path)
    data = {"input": np.random.default_rng(1).standard_normal((6, 3, 10, 10)).astype(np.float32)}
    onnx_lowrank.compress(path, data, output=tmp_path / "o.onnx", ranks={"conv1": 2}, speedup=None)
    assert _sha(path) == h


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "directory"),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(2000)), "not a readable ONNX model"),
    (lambda p: p.write_text("just some text\n"), "not a readable ONNX model"),
    (lambda p: p.write_bytes(b""), "not a readable ONNX model"),
])
def test_load_model_user_errors(tmp_path, make, match):
    p = tmp_path / "bad.onnx"
    make(p)
    with pytest.raises(LowRankError, match=match):
        load_model(p)


def test_load_model_rejects_too_old_opset(tmp_path):
    m = conv_chain([3, 4], size=6, seed=1)
    m.opset_import[0].version = 7
    p = tmp_path / "old.onnx"
    onnx.save_model(m, str(p))
    with pytest.raises(LowRankError, match="opset 7"):
        load_model(p)


# ---------------------------------------------------------------------------------------------
# --input-shape


@pytest.mark.parametrize("specs, expected", [
    (None, {}),
    ([], {}),
    (["input:1x3x224x224"], {"input": [1, 3, 224, 224]}),
    (["input:1,3,32,32"], {"input": [1, 3, 32, 32]}),
    ([" x:5 "], {"x": [5]}),
    (["serving_default:input:0:1x3x8x8"], {"serving_default:input:0": [1, 3, 8, 8]}),
    (["a:1x2", "b:3x4x5"], {"a": [1, 2], "b": [3, 4, 5]}),
    (["a:1x2", "a:7x8"], {"a": [7, 8]}),
])
def test_parse_input_shapes(specs, expected):
    assert parse_input_shapes(specs) == expected


@pytest.mark.parametrize("spec", ["input", "input:", ":1x3", "input:1xx3", "input:1x-3", "input:1x3x", "input:ax3",
                                  "input:1.5x3"])
def test_parse_input_shapes_rejects(spec):
    with pytest.raises(LowRankError, match="--input-shape"):
        parse_input_shapes([spec])


def test_with_input_shapes_errors_and_fixes_symbolic_dims():
    m = conv_chain([3, 4], size=6, seed=1)  # input is (N, 3, 6, 6)
    with pytest.raises(LowRankError, match="not a model input"):
        with_input_shapes(m, {"nope": [1, 3, 6, 6]})
    with pytest.raises(LowRankError, match="3 dims given"):
        with_input_shapes(m, {"input": [1, 3, 6]})
    (lay,) = find_conv_layers(m, infer_value_types(with_input_shapes(m, {"input": [1, 3, 6, 6]})))
    assert lay.out_shape == [1, 4, 6, 6] and lay.positions == 36


def test_symbolic_spatial_dims_skip_with_input_shape_hint():
    m = conv_chain([3, 4], size=6, seed=1)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    (lay,) = _layers(m)
    assert lay.out_shape is None and "--input-shape" in lay.skip_reason
    (lay,) = _layers(m, {"input": [1, 3, 10, 12]})
    assert lay.skip_reason is None and lay.out_shape == [1, 4, 10, 12]


# ---------------------------------------------------------------------------------------------
# the opset-9 light VGG-19 shipped in the onnx wheel (weights are ConstantOfShape placeholders)


def test_light_vgg19_lists_16_convs_with_runtime_weights_skipped():
    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_vgg19.onnx")
    if not os.path.exists(path):
        pytest.skip("onnx wheel without backend test data")
    m = load_model(path)
    assert m.ir_version == 3
    norm = normalise(m)
    assert [i.name for i in real_inputs(norm)] == ["data_0"]
    layers = find_conv_layers(norm, infer_value_types(with_input_shapes(norm, {})))
    assert len(layers) == 16
    assert len({lay.name for lay in layers}) == 16
    for lay in layers:
        assert lay.skip_reason is not None and "computed at run time" in lay.skip_reason
        assert lay.activation == "relu"
    assert layers[0].out_shape == [1, 64, 224, 224]
    # Nothing to compress: a one-line user error, raised before any calibration run.
    data = {"data_0": np.zeros((1, 3, 224, 224), np.float32)}
    with pytest.raises(LowRankError, match="none of the model's 16 Conv / MatMul / Gemm layers can be compressed"):
        onnx_lowrank.compress(m, data, speedup=2.0)


# ---------------------------------------------------------------------------------------------
# activation and residual detection


def _one_conv_then(rng, act_nodes, out, extra_inits=None, opset=13, d=6, group=1, c=6):
    inits = {"w": rng.standard_normal((d, c // group, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(d).astype(np.float32)}
    inits.update(extra_inits or {})
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], group=group),
             *act_nodes]
    return _model(nodes, inits, [1, c, 5, 5], [out], opset=opset)


def _act_cases():
    slope = np.linspace(0.05, 0.5, 6).astype(np.float32).reshape(6, 1, 1)
    return [
        ("relu", [helper.make_node("Relu", ["y"], ["o"])], "o", {}, 13, "relu", {}),
        ("clip13", [helper.make_node("Clip", ["y", "lo", "hi"], ["o"])], "o",
         {"lo": np.float32(0.0), "hi": np.float32(6.0)}, 13, "clip", {"min": 0.0, "max": 6.0}),
        ("clip13_min_only", [helper.make_node("Clip", ["y", "lo"], ["o"])], "o",
         {"lo": np.float32(-1.0)}, 13, "clip", {"min": -1.0, "max": None}),
        ("clip13_max_only", [helper.make_node("Clip", ["y", "", "hi"], ["o"])], "o",
         {"hi": np.float32(6.0)}, 13, "clip", {"min": None, "max": 6.0}),
        ("clip9", [helper.make_node("Clip", ["y"], ["o"], min=0.0, max=6.0)], "o", {}, 9, "clip",
         {"min": 0.0, "max": 6.0}),
        ("leaky", [helper.make_node("LeakyRelu", ["y"], ["o"], alpha=0.2)], "o", {}, 13, "leaky_relu",
         {"alpha": pytest.approx(0.2)}),
        ("leaky_default", [helper.make_node("LeakyRelu", ["y"], ["o"])], "o", {}, 13, "leaky_relu",
         {"alpha": pytest.approx(0.01)}),
        ("prelu_scalar", [helper.make_node("PRelu", ["y", "s"], ["o"])], "o", {"s": np.array([0.25], np.float32)},
         13, "prelu", {"slope": 0.25}),
        ("hardswish", [helper.make_node("HardSwish", ["y"], ["o"])], "o", {}, 14, "hardswish", {}),
        ("silu", [helper.make_node("Sigmoid", ["y"], ["s"]), helper.make_node("Mul", ["y", "s"], ["o"])], "o",
         {}, 13, "silu", {}),
        ("silu_swapped", [helper.make_node("Sigmoid", ["y"], ["s"]), helper.make_node("Mul", ["s", "y"], ["o"])],
         "o", {}, 13, "silu", {}),
        ("sigmoid", [helper.make_node("Sigmoid", ["y"], ["o"])], "o", {}, 13, "sigmoid", {}),
        ("none_two_users", [helper.make_node("Relu", ["y"], ["r"]), helper.make_node("Add", ["y", "r"], ["o"])],
         "o", {}, 13, "identity", {}),
        ("none_unknown_op", [helper.make_node("Softplus", ["y"], ["o"])], "o", {}, 13, "identity", {}),
        ("prelu_channel", [helper.make_node("PRelu", ["y", "s"], ["o"])], "o", {"s": slope}, 13, "prelu", None),
    ]


@pytest.mark.parametrize("case", _act_cases(), ids=[c[0] for c in _act_cases()])
def test_activation_detection(case):
    _id, act_nodes, out, extra, opset, kind, params = case
    rng = np.random.default_rng(9)
    m = _one_conv_then(rng, act_nodes, out, extra, opset)
    onnx.checker.check_model(m)
    run(m, {"input": np.zeros((1, 6, 5, 5), np.float32)})  # a valid model for onnxruntime
    (lay,) = _layers(m)
    assert lay.skip_reason is None
    assert lay.activation == kind
    assert lay.shortcut is None
    assert lay.target == ("y" if kind == "identity" else out)
    if params is not None:
        assert lay.activation_params == params
    else:
        np.testing.assert_allclose(lay.activation_params["slope"], np.linspace(0.05, 0.5, 6), rtol=1e-6)


def test_clip_with_runtime_bounds_is_not_an_activation():
    rng = np.random.default_rng(10)
    nodes = [helper.make_node("ReduceMax", ["input"], ["hi"], keepdims=0),
             helper.make_node("Clip", ["y", "lo", "hi"], ["o"])]
    m = _one_conv_then(rng, nodes, "o", {"lo": np.float32(0.0)})
    (lay,) = _layers(m)
    assert lay.activation == "identity" and lay.target == "y"


def test_conv_output_that_is_graph_output_has_no_activation():
    rng = np.random.default_rng(11)
    m = _one_conv_then(rng, [helper.make_node("Relu", ["y"], ["o"])], "o")
    m.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    (lay,) = _layers(m)
    assert lay.activation == "identity" and lay.target == "y"


@pytest.mark.parametrize("order", ["conv_first", "shortcut_first"])
def test_residual_add_then_relu(order):
    rng = np.random.default_rng(12)
    add_in = ["y", "input"] if order == "conv_first" else ["input", "y"]
    m = _one_conv_then(rng, [helper.make_node("Add", add_in, ["s"]), helper.make_node("Relu", ["s"], ["o"])], "o")
    (lay,) = _layers(m)
    assert lay.skip_reason is None
    assert lay.shortcut == "input"
    assert lay.activation == "relu"
    assert lay.target == "o"


def test_residual_between_two_convs():
    """conv_a -> Relu -> conv_b; conv_b + (output of conv_a's Relu) -> Relu."""
    rng = np.random.default_rng(13)
    inits = {"wa": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
             "wb": rng.standard_normal((6, 6, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "wa"], ["ya"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ya"], ["ra"]),
             helper.make_node("Conv", ["ra", "wb"], ["yb"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["yb", "ra"], ["s"]),
             helper.make_node("Relu", ["s"], ["o"])]
    m = _model(nodes, inits, [1, 3, 5, 5], ["o"])
    a, b = _layers(m)
    assert (a.name, a.activation, a.shortcut, a.target) == ("conv_a", "relu", None, "ra")
    assert (b.name, b.activation, b.shortcut, b.target) == ("conv_b", "relu", "ra", "o")


def test_add_with_constant_is_not_a_shortcut():
    rng = np.random.default_rng(14)
    m = _one_conv_then(rng, [helper.make_node("Add", ["y", "k"], ["s"]), helper.make_node("Relu", ["s"], ["o"])],
                       "o", {"k": np.ones((6, 1, 1), np.float32)})
    (lay,) = _layers(m)
    assert lay.shortcut is None


@pytest.mark.parametrize("group, c, d, reason", [
    (2, 6, 6, "grouped convolution (group=2)"),
    (3, 6, 9, "grouped convolution (group=3)"),
    (6, 6, 6, "depthwise"),
])
def test_grouped_and_depthwise_convs_are_skipped(group, c, d, reason):
    rng = np.random.default_rng(15)
    m = _one_conv_then(rng, [helper.make_node("Relu", ["y"], ["o"])], "o", d=d, group=group, c=c)
    run(m, {"input": np.zeros((1, c, 5, 5), np.float32)})
    (lay,) = _layers(m)
    assert lay.skip_reason is not None and reason in lay.skip_reason
    assert lay.group == group and lay.in_channels == c and lay.out_channels == d


def test_grouped_only_model_cannot_be_compressed():
    rng = np.random.default_rng(16)
    m = _one_conv_then(rng, [helper.make_node("Relu", ["y"], ["o"])], "o", group=6)
    data = {"input": rng.standard_normal((4, 6, 5, 5)).astype(np.float32)}
    with pytest.raises(LowRankError, match="depthwise"):
        onnx_lowrank.compress(m, data, speedup=2.0)


def test_non_float32_and_3d_convs_are_skipped():
    rng = np.random.default_rng(17)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float64)
    nodes = [helper.make_node("Conv", ["input", "w"], ["o"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.DOUBLE, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("o", TensorProto.DOUBLE, None)],
                              initializer=[numpy_helper.from_array(w, "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    (lay,) = _layers(m)
    assert "float64" in lay.skip_reason
    w3 = rng.standard_normal((4, 3, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["o"], name="conv")]
    m = _model(nodes, {"w": w3}, [1, 3, 5, 5, 5], ["o"])
    (lay,) = _layers(m)
    assert "3-D convolution" in lay.skip_reason


# ---------------------------------------------------------------------------------------------
# FLOP counting


def _flops_model(opaque_reshape: bool):
    """input (N, 3, 8, 8) -> Conv 3->4 3x3 pad 1 -> Relu -> MaxPool 2x2 -> Add const -> Reshape
    -> MatMul (4 -> 5) -> Softmax. ``opaque_reshape``: the Reshape's shape is computed by Shape -> Max,
    which shape inference cannot see through, so everything after it has an unknown shape."""
    rng = np.random.default_rng(5)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "c": rng.standard_normal((1, 4, 4, 4)).astype(np.float32),
             "m": rng.standard_normal((4, 5)).astype(np.float32),
             "shape": np.array([0, 4, 4, 4], np.int64)}
    nodes = [helper.make_node("Conv", ["input", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Add", ["p", "c"], ["a"], name="add")]
    if opaque_reshape:
        nodes += [helper.make_node("Shape", ["a"], ["s"], name="shape_of"),
                  helper.make_node("Max", ["s", "s"], ["s2"], name="max"),
                  helper.make_node("Reshape", ["a", "s2"], ["ra"], name="reshape")]
    else:
        nodes.append(helper.make_node("Reshape", ["a", "shape"], ["ra"], name="reshape"))
    nodes += [helper.make_node("MatMul", ["ra", "m"], ["mm"], name="matmul"),
              helper.make_node("Softmax", ["mm"], ["output"], name="softmax", axis=-1)]
    m = _model(nodes, inits, ["N", 3, 8, 8], ["output"])
    onnx.checker.check_model(m, full_check=True)
    return m


# Per image, by hand: Conv 2 * (4 * 3 * 3 * 3) MACs at 8 * 8 positions; Relu one per output element
# (4 * 8 * 8); MaxPool output elements (4 * 4 * 4) x kernel (2 * 2); Add output elements; Reshape nothing;
# MatMul 2 * (4 * 4 rows) * 4 * 5; Softmax one per input element (4 * 4 * 5).
HAND_FLOPS = {"conv": 2 * 108 * 64, "relu": 256, "pool": 64 * 4, "add": 64, "reshape": 0, "matmul": 2 * 16 * 4 * 5,
              "softmax": 80}


def test_node_flops_counts_every_node_with_a_symbolic_batch():
    norm = normalise(_flops_model(False))
    assert node_flops(norm, infer_value_types(norm)) == HAND_FLOPS


def test_report_speedup_counts_every_node():
    """The same graph with a Reshape that shape inference cannot follow: the nodes after it are measured,
    and the whole-model speed-up is total FLOPs before / after (ranks fixed by hand)."""
    m = _flops_model(True)
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    rep = onnx_lowrank.compress(m, {"input": x}, ranks={"conv": 2}, speedup=None, method="linear",
                                asymmetric=False).report
    total = sum(HAND_FLOPS.values()) + 4  # Max over the 4-element shape vector; Shape counts nothing
    after = total - HAND_FLOPS["conv"] + 2 * 2 * (27 + 4) * 64  # rank 2: 3x3 conv 3 -> 2, then 1x1 2 -> 4
    assert (rep["flops_before"], rep["flops_after"]) == (total, after)
    assert rep["speedup_theoretical"] == pytest.approx(total / after)
    assert (rep["conv_flops_before"], rep["conv_flops_after"]) == (HAND_FLOPS["conv"], after - (total - HAND_FLOPS["conv"]))
