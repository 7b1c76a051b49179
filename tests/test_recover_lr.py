"""Recovery's per-tensor learning rate: a step changes each weight tensor by a fraction of its own size.

The PP-OCRv4 detector's factorised layers hold weights of RMS 3e-5 beside biases of RMS 170; a floor taken
from the largest RMS of all tensors gave the small weights steps of several times their own size, and the
first epoch of recovery diverged (benchmarks/results/recover_det_notes.reading.md).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper


def _student(inits: dict):
    """Two factorised Convs in a row (names as the rewrite gives them), as a Student."""
    from onnx_lowrank.recover.student import Student

    nodes = [helper.make_node("Conv", ["input", "w0", "b0"], ["h"], name="c_lowrank0"),
             helper.make_node("Conv", ["h", "w1", "b1"], ["output"], name="c_lowrank1")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 5, 4, 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return Student(model, ["output"])


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))


def test_each_weight_steps_by_its_own_rms_and_only_small_biases_get_the_floor():
    torch = pytest.importorskip("torch")
    from onnx_lowrank.recover.train import _groups

    rng = np.random.default_rng(0)
    inits = {"w0": (3e-5 * rng.standard_normal((2, 3, 1, 1))).astype(np.float32),   # a factor scaled far down
             "b0": (170.0 * rng.standard_normal(2)).astype(np.float32),               # a bias scaled far up
             "w1": rng.standard_normal((5, 2, 1, 1)).astype(np.float32),
             "b1": np.full(5, 1e-6, np.float32)}                                       # a bias near zero
    student = _student(inits)
    lr = 1e-3
    got = {name: g["lr"] for name, g in zip(student.bindings, _groups(student, lr))}
    largest_weight = max(_rms(inits["w0"]), _rms(inits["w1"]))
    want = {"w0": lr * _rms(inits["w0"]), "b0": lr * _rms(inits["b0"]), "w1": lr * _rms(inits["w1"]),
            "b1": lr * 0.01 * largest_weight}
    assert got == pytest.approx(want, rel=1e-5)

    # Adam's first step moves each element by about its group's lr: the small factor by a thousandth of itself.
    before = {k: b.tensor.detach().clone() for k, b in student.bindings.items()}
    opt = torch.optim.Adam(_groups(student, lr), lr=lr)
    x = torch.from_numpy(rng.standard_normal((1, 3, 4, 4)).astype(np.float32))
    student({"input": x})[0].pow(2).sum().backward()
    opt.step()
    step = float((student.bindings["w0"].tensor.detach() - before["w0"]).abs().max())
    assert 0 < step <= 1.01 * lr * _rms(inits["w0"])
