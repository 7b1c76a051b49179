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
        assert lay["method"] == "nonlinear" and lay["target"] == "after relu"
        # Held-back samples: the nonlinear refinement (fitted on the others) must not fall far behind.
        assert 0 <= lay["rel_error"] < 1 and 0 <= lay["rel_error_linear"] < 1
        assert lay["rel_error"] <= 1.25 * lay["rel_error_linear"]
