"""Small ONNX models built by hand for the tests (numpy weights, onnx.helper graphs)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_node(name, x, y, w, b, **attrs):
    inputs = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", inputs, [y], name=name, **attrs)


def he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def model_from(nodes, inits, x_shape, out_name, out_shape=None, opset=13):
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def conv_chain(widths, size=16, kernel=3, act="Relu", seed=0, batch="N", bias=True, lowrank_bias=None):
    """input (N, widths[0], size, size) -> [Conv k x k -> act] * len(widths)-1 -> GlobalAveragePool -> Flatten.

    ``lowrank_bias``: when an int r, each Conv's weight has rank ~r along its output channels plus
    a little noise, so that a low-rank approximation is meaningful (real trained layers are like this).
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], {}
    x = "input"
    for i, (c, d) in enumerate(zip(widths[:-1], widths[1:])):
        fan = c * kernel * kernel
        w = he(rng, (d, c, kernel, kernel), fan)
        if lowrank_bias:
            r = min(lowrank_bias, d)
            basis = rng.standard_normal((d, r)).astype(np.float32)
            w = (np.einsum("dr,rckl->dckl", basis, w[:r]) / np.sqrt(r) + 0.05 * w).astype(np.float32)
        inits[f"w{i}"] = w
        if bias:
            inits[f"b{i}"] = (0.1 * rng.standard_normal(d)).astype(np.float32)
        nodes.append(conv_node(f"conv{i}", x, f"c{i}", f"w{i}", f"b{i}" if bias else None,
                               pads=[kernel // 2] * 4, kernel_shape=[kernel, kernel]))
        if act:
            nodes.append(helper.make_node(act, [f"c{i}"], [f"a{i}"], name=f"act{i}"))
            x = f"a{i}"
        else:
            x = f"c{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["output"]))
    return model_from(nodes, inits, [batch, widths[0], size, size], "output", [batch, widths[-1]])


def run(model, feed):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)
