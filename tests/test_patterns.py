"""Graph patterns from other exporters (Paddle / PP-OCR): constant scale-and-shift after a Conv, and
HardSwish written out as x * Clip(x + 3, 0, 6) / 6. Checked against onnxruntime on the original."""

from __future__ import annotations

import numpy as np
from onnx import helper

from builders import he, model_from, run

from onnx_lowrank.graph.layers import find_conv_layers
from onnx_lowrank.graph.loading import infer_value_types, normalise, with_input_shapes


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
