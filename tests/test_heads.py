"""Output heads (graph/heads.py): which layers write the model's outputs, and that automatic ranks keep them.

Truths used: graphs built by hand where which tensor reaches the outputs, and through what, is known by
construction."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from builders import model_from
from onnx_lowrank import compress
from onnx_lowrank.graph.heads import output_heads
from onnx_lowrank.plan import HEAD_REASON
from test_dense import _data, mlp3d

N = helper.make_node


def _classifier(tail: str) -> tuple:
    """(N, 8) -> MatMul 8->8 (fc1) -> Relu -> MatMul 8->4 (fc2) -> TAIL -> output; returns (model, outputs)."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 8)).astype(np.float32), "w2": rng.standard_normal((8, 4)).astype(np.float32),
             "b2": rng.standard_normal(4).astype(np.float32), "shape": np.array([-1, 2, 2], np.int64)}
    nodes = [N("MatMul", ["input", "w1"], ["m1"], name="fc1"), N("Relu", ["m1"], ["r1"]),
             N("MatMul", ["r1", "w2"], ["m2"], name="fc2")]
    out_shape = ["N", 4]
    if tail == "bias_softmax":
        nodes += [N("Add", ["m2", "b2"], ["a2"]), N("Softmax", ["a2"], ["output"], axis=1)]
    elif tail == "constant_node_bias":
        nodes += [N("Constant", [], ["cb"], value=helper.make_tensor("cb", 1, [4], [0.1, 0.2, 0.3, 0.4])),
                  N("Add", ["m2", "cb"], ["output"])]
    elif tail == "reshape":
        nodes += [N("Reshape", ["m2", "shape"], ["output"])]
        out_shape = ["N", 2, 2]
    elif tail == "residual":   # mixes in another data tensor: fc2's error is not all that reaches the output
        nodes += [N("Slice", ["r1", "s0", "s4", "s1"], ["r1s"]), N("Add", ["m2", "r1s"], ["output"])]
        inits.update(s0=np.array([0], np.int64), s4=np.array([4], np.int64), s1=np.array([1], np.int64))
    elif tail == "also_read":  # fc2's output also feeds a Relu that is not on a path to the outputs alone
        nodes += [N("Relu", ["m2"], ["rr"]), N("Add", ["rr", "m2"], ["output"])]
    elif tail == "direct":
        nodes[-1] = N("MatMul", ["r1", "w2"], ["output"], name="fc2")
    return model_from(nodes, inits, ["N", 8], "output", out_shape), {"fc1": "m1", "fc2": "m2" if tail != "direct"
                                                                      else "output"}


@pytest.mark.parametrize("tail,heads", [("bias_softmax", {"fc2"}), ("constant_node_bias", {"fc2"}),
                                        ("reshape", {"fc2"}), ("direct", {"fc2"}), ("residual", set()),
                                        ("also_read", set())])
def test_output_heads_by_construction(tail, heads):
    model, outputs = _classifier(tail)
    assert output_heads(model, outputs) == heads


def _status(res, name):
    (lay,) = [lay for lay in res.report["layers"] if lay["name"] == name]
    return lay


def test_automatic_ranks_keep_the_head_unless_asked():
    """mlp3d's fc2 writes the output: kept whole by default (the budget is met by fc1 alone), a candidate with
    factorise_head, and set by hand with --ranks whatever the flag."""
    model, data = mlp3d(k=32, h=48, d=8, seed=2), _data(30, [5, 32])
    kw = dict(objective="flops", speedup=1.5, rank_multiple=4)
    kept = compress(model, data, **kw)
    assert _status(kept, "fc2")["reason"] == HEAD_REASON and _status(kept, "fc2")["rank"] is None
    assert _status(kept, "fc1")["status"] == "factorised"
    assert kept.report["flops_before"] / kept.report["flops_after"] >= 1.5 * 0.97
    allowed = compress(model, data, factorise_head=True, **kw)
    assert _status(allowed, "fc2")["reason"] != HEAD_REASON
    by_hand = compress(model, data, speedup=None, ranks={"fc2": 4}, objective="flops", rank_multiple=4)
    assert _status(by_hand, "fc2")["status"] == "factorised" and _status(by_hand, "fc2")["rank"] == 4
