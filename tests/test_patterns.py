"""Graph patterns from other exporters (Paddle / PP-OCR, PyTorch, TF): constant scale-and-shift after a
Conv, Identity nodes, activations written out as several nodes (HardSwish, GELU, Swish), and activations
the solver does not know. Checked against onnxruntime on the original."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from builders import he, model_from, run

import onnx_lowrank
from onnx_lowrank import progress
from onnx_lowrank.cli import main
from onnx_lowrank.graph.layers import find_conv_layers
from onnx_lowrank.graph.loading import infer_value_types, with_input_shapes
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.solver.activations import Activation


def _paddle_block(per_channel: bool, div: bool = True):
    rng = np.random.default_rng(4)
    d = 12
    inits = {"w": he(rng, (d, 5, 3, 3), 45), "b": rng.standard_normal(d).astype(np.float32),
             "scale": (rng.uniform(0.5, 2, (1, d, 1, 1)) if per_channel else np.array([1.7])).astype(np.float32),
             "shift": (rng.standard_normal((d, 1, 1)) if per_channel else np.array([0.3])).astype(np.float32),
             "three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32),
             "sixth": np.array(1 / 6, np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["scale", "c"], ["m"]),
             helper.make_node("Add", ["m", "shift"], ["y"]),
             helper.make_node("Add", ["y", "three"], ["y3"]),
             helper.make_node("Clip", ["y3", "zero", "six"], ["cl"]),
             helper.make_node("Mul", ["y", "cl"], ["p"]),
             helper.make_node("Div", ["p", "six"], ["output"]) if div else
             helper.make_node("Mul", ["p", "sixth"], ["output"])]
    return model_from(nodes, inits, ["N", 5, 9, 9], "output", ["N", d, 9, 9])


def test_scale_shift_folds_exactly_and_hardswish_is_recognised():
    for per_channel in (False, True):
        for div in (True, False):
            m = _paddle_block(per_channel, div)
            norm = normalise(m)
            # the scale and shift are gone: only the HardSwish ops are left after the Conv
            assert [n.op_type for n in norm.graph.node] == ["Conv", "Add", "Clip", "Mul", "Div" if div else "Mul"]
            x = np.random.default_rng(1).standard_normal((3, 5, 9, 9)).astype(np.float32)
            np.testing.assert_allclose(run(norm, {"input": x})[0], run(m, {"input": x})[0], rtol=1e-5, atol=1e-5)
            (layer,) = find_conv_layers(norm, infer_value_types(with_input_shapes(norm, {"input": [1, 5, 9, 9]})))
            assert layer.activation == "hardswish" and layer.target == "output"


def test_shift_with_other_consumers_is_not_folded():
    m = _paddle_block(True)
    m.graph.output.append(helper.make_tensor_value_info("c", 1, None))  # the raw conv output is needed too
    norm = normalise(m)
    assert [n.op_type for n in norm.graph.node].count("Mul") == 2


# ---------------------------------------------------------------------------------------------
# Identity nodes, written-out activations, unknown activations

D = 6


def _conv_then(act_nodes, out, extra=None, opset=13, bias=True):
    """input (N, 4, 7, 7) -> Conv 4 -> 6, 3x3 pad 1 (output "y") -> ``act_nodes`` -> ``out``."""
    rng = np.random.default_rng(7)
    inits = {"w": he(rng, (D, 4, 3, 3), 36), "b": rng.standard_normal(D).astype(np.float32)}
    inits.update({k: np.asarray(v, np.float32) for k, v in (extra or {}).items()})
    conv = helper.make_node("Conv", ["input", "w"] + (["b"] if bias else []), ["y"], name="conv", pads=[1, 1, 1, 1])
    return model_from([conv, *act_nodes], inits, ["N", 4, 7, 7], out, ["N", D, 7, 7], opset=opset)


def _layer(model):
    norm = normalise(model)
    (layer,) = find_conv_layers(norm, infer_value_types(with_input_shapes(norm, {"input": [1, 4, 7, 7]})))
    return norm, layer


def _values(model, names, x):
    """onnxruntime's values of the named tensors of ``model`` (the independent truth)."""
    m = copy.deepcopy(model)
    for name in names:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    out = run(m, {"input": x})
    return dict(zip([o.name for o in m.graph.output], out))


N = helper.make_node
SQ2 = np.float32(np.sqrt(2.0))
GELU_FORMS = {
    # PyTorch: x * 0.5 * (1 + erf(x / sqrt 2)), the Mul by 0.5 last
    "div_half_last": [N("Div", ["y", "sq2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["e1"]),
                      N("Mul", ["y", "e1"], ["m"]), N("Mul", ["m", "half"], ["o"])],
    # Mul by 1/sqrt 2, operands swapped everywhere
    "mul_swapped": [N("Mul", ["rsq2", "y"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["one", "e"], ["e1"]),
                    N("Mul", ["e1", "y"], ["m"]), N("Mul", ["half", "m"], ["o"])],
    # TF / Keras: (0.5 x) * (1 + erf(x / sqrt 2)), the half first
    "half_first": [N("Mul", ["y", "half"], ["h"]), N("Div", ["y", "sq2"], ["d"]), N("Erf", ["d"], ["e"]),
                   N("Add", ["e", "one"], ["e1"]), N("Mul", ["h", "e1"], ["o"])],
    # half inside: x * (0.5 + 0.5 erf(x / sqrt 2))
    "half_inside": [N("Div", ["y", "sq2"], ["d"]), N("Erf", ["d"], ["e"]), N("Mul", ["e", "half"], ["eh"]),
                    N("Add", ["eh", "half"], ["e1"]), N("Mul", ["y", "e1"], ["o"])],
}
GELU_CONSTS = {"sq2": SQ2, "rsq2": np.float32(1 / np.sqrt(2.0)), "one": np.float32(1.0), "half": np.float32(0.5)}


def _check_target(model, layer, kind, params):
    """(a) the activation and target found; (b) the solver's activation of onnxruntime's conv output
    equals onnxruntime's target tensor."""
    assert (layer.activation, layer.activation_params, layer.activation_unknown) == (kind, params, None)
    assert layer.target == "o"
    x = np.random.default_rng(3).standard_normal((2, 4, 7, 7)).astype(np.float32) * 2
    v = _values(model, ["y", "o"], x)
    y = v["y"].transpose(0, 2, 3, 1).reshape(-1, D)
    want = v["o"].transpose(0, 2, 3, 1).reshape(-1, D)
    assert np.abs(y).max() > 3  # the nonlinear part of the curve is exercised
    np.testing.assert_allclose(Activation(kind, params).apply(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", sorted(GELU_FORMS))
def test_erf_gelu_forms_are_gelu(form):
    m = _conv_then(GELU_FORMS[form], "o", GELU_CONSTS)
    _, layer = _layer(m)
    _check_target(m, layer, "gelu", {"approximate": "none"})


def test_gelu_op_with_tanh_approximation():
    m = _conv_then([N("Gelu", ["y"], ["o"], approximate="tanh")], "o", opset=20)
    _, layer = _layer(m)
    _check_target(m, layer, "gelu", {"approximate": "tanh"})


def test_tanh_gelu_written_out():
    nodes = [N("Pow", ["y", "three"], ["y3"]), N("Mul", ["y3", "c"], ["cy3"]), N("Add", ["y", "cy3"], ["inner"]),
             N("Mul", ["inner", "k"], ["g"]), N("Tanh", ["g"], ["t"]), N("Add", ["t", "one"], ["t1"]),
             N("Mul", ["half", "y"], ["h"]), N("Mul", ["h", "t1"], ["o"])]
    consts = {"three": 3.0, "c": 0.044715, "k": np.sqrt(2 / np.pi), "one": 1.0, "half": 0.5}
    m = _conv_then(nodes, "o", consts)
    _, layer = _layer(m)
    _check_target(m, layer, "gelu", {"approximate": "tanh"})


@pytest.mark.parametrize("swapped", [False, True])
def test_x_times_hardsigmoid_sixth_is_hardswish(swapped):
    hs = N("HardSigmoid", ["y"], ["s"], alpha=1 / 6, beta=0.5)
    m = _conv_then([hs, N("Mul", ["s", "y"] if swapped else ["y", "s"], ["o"])], "o")
    _, layer = _layer(m)
    _check_target(m, layer, "hardswish", {})


def test_paddle_swish_is_silu():
    """PP-OCR's SVTR neck: x * Sigmoid(x * 1.0)."""
    nodes = [N("Mul", ["y", "one"], ["y1"]), N("Sigmoid", ["y1"], ["s"]), N("Mul", ["y", "s"], ["o"])]
    m = _conv_then(nodes, "o", {"one": 1.0})
    _, layer = _layer(m)
    _check_target(m, layer, "silu", {})


@pytest.mark.parametrize("case", ["hardsigmoid_0.2", "softplus", "swish_beta_2"])
def test_unknown_activation_is_recorded(case):
    nodes, consts, name = {
        "hardsigmoid_0.2": ([N("HardSigmoid", ["y"], ["s"], alpha=0.2, beta=0.5), N("Mul", ["y", "s"], ["o"])], {},
                            "(HardSigmoid -> Mul)"),
        "softplus": ([N("Softplus", ["y"], ["o"])], {}, "Softplus"),
        "swish_beta_2": ([N("Mul", ["y", "two"], ["y2"]), N("Sigmoid", ["y2"], ["s"]), N("Mul", ["y", "s"], ["o"])],
                         {"two": 2.0}, "(Mul -> Sigmoid -> Mul)"),
    }[case]
    _, layer = _layer(_conv_then(nodes, "o", consts))
    assert (layer.activation, layer.target, layer.activation_unknown) == ("identity", "y", name)
    assert layer.target_description == f"conv output (unknown activation {name})"


def test_squeeze_excite_is_not_an_unknown_activation():
    """x * Sigmoid(GAP(x)) depends on other positions: no activation, and nothing to warn about."""
    nodes = [N("GlobalAveragePool", ["y"], ["g"]), N("Sigmoid", ["g"], ["s"]), N("Mul", ["y", "s"], ["o"])]
    _, layer = _layer(_conv_then(nodes, "o"))
    assert (layer.activation, layer.target, layer.activation_unknown) == ("identity", "y", None)


def test_unknown_activation_is_reported_and_warned(capsys, monkeypatch):
    monkeypatch.setattr(progress, "_enabled", True)  # an earlier in-process CLI run with -q may have muted it
    m = _conv_then([N("Softplus", ["y"], ["o"])], "o")
    x = np.random.default_rng(0).standard_normal((6, 4, 7, 7)).astype(np.float32)
    res = onnx_lowrank.compress(m, {"input": x}, ranks={"conv": 2}, speedup=None, asymmetric=False)
    (lay,) = res.report["layers"]
    assert lay["activation_unknown"] == "Softplus" and lay["method"] == "linear"
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "unknown activation" in ln]
    assert warnings == ["warning: fitted as linear: unknown activation Softplus after conv conv"]


def test_layers_command_shows_unknown_activation(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_then([N("Softplus", ["y"], ["o"])], "o"), str(path))
    res = CliRunner().invoke(main, ["layers", str(path), "--input-shape", "input:1x4x7x7"])
    assert res.exit_code == 0, res.output
    assert "conv output (unknown activation Softplus)" in res.output


def _bias_identity_model(output_identity: bool):
    """Conv (no bias) -> Add(bias) -> Identity -> Relu [-> Identity -> graph output]."""
    nodes = [N("Add", ["y", "bias"], ["yb"]), N("Identity", ["yb"], ["yi"]), N("Identity", ["yi"], ["yii"]),
             N("Relu", ["yii"], ["r" if output_identity else "o"])]
    if output_identity:
        nodes.append(N("Identity", ["r"], ["o"]))
    bias = np.random.default_rng(2).standard_normal((1, D, 1, 1)).astype(np.float32)
    return _conv_then(nodes, "o", {"bias": bias}, bias=False)


@pytest.mark.parametrize("output_identity", [False, True])
def test_identity_removed_and_bias_add_folded(output_identity):
    m = _bias_identity_model(output_identity)
    norm, layer = _layer(m)
    assert [n.op_type for n in norm.graph.node] == ["Conv", "Relu"]
    assert [o.name for o in norm.graph.output] == ["o"]
    assert layer.activation == "relu" and layer.target == "o" and layer.bias is not None
    x = np.random.default_rng(1).standard_normal((2, 4, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(run(norm, {"input": x})[0], run(m, {"input": x})[0], rtol=1e-5, atol=1e-5)


def test_identity_between_input_and_output_is_kept():
    """Identity from a graph input straight to a graph output cannot be removed without renaming one."""
    m = _conv_then([N("Relu", ["y"], ["o"]), N("Identity", ["input"], ["copy"])], "o")
    m.graph.output.append(helper.make_tensor_value_info("copy", TensorProto.FLOAT, None))
    norm = normalise(m)
    assert [n.op_type for n in norm.graph.node] == ["Conv", "Relu", "Identity"]
    x = np.random.default_rng(1).standard_normal((1, 4, 7, 7)).astype(np.float32)
    for a, b in zip(run(norm, {"input": x}), run(m, {"input": x})):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_unknown_activation_after_residual_add():
    """Conv -> Add(shortcut) -> Softplus: the shortcut is found and the Softplus is named."""
    rng = np.random.default_rng(8)
    inits = {"w": he(rng, (D, 4, 3, 3), 36), "w2": he(rng, (D, 4, 1, 1), 4)}
    nodes = [N("Conv", ["input", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             N("Conv", ["input", "w2"], ["z"], name="shortcut_conv"),
             N("Add", ["y", "z"], ["s"]), N("Softplus", ["s"], ["o"])]
    norm = normalise(model_from(nodes, inits, ["N", 4, 7, 7], "o", ["N", D, 7, 7]))
    layers = find_conv_layers(norm, infer_value_types(with_input_shapes(norm, {"input": [1, 4, 7, 7]})))
    lay = next(lay for lay in layers if lay.name == "conv")
    assert (lay.shortcut, lay.target, lay.activation, lay.activation_unknown) == ("z", "s", "identity", "Softplus")
    assert lay.target_description == "residual add (unknown activation Softplus)"
