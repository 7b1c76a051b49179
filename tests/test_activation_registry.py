"""The activation registry end to end, with the worked example of the README ("Adding an activation"):
ONNX's Shrink in its soft form (PyTorch's Softshrink) added as one class in the test. The graph code
finds it with no other edit, its z step (from its linear pieces) matches a brute-force grid search,
and a compression through it keeps the model's outputs close (onnxruntime as the truth). Also: every
registered kind's recognition data is consistent with its value."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from builders import he, model_from, run

from onnx_lowrank import compress
from onnx_lowrank.graph.layers import find_conv_layers
from onnx_lowrank.graph.loading import infer_value_types, with_input_shapes
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.solver.activations import (REGISTRY, Activation, ActivationKind, OpNode, register, z_objective,
                                             z_step)


class SoftShrink(ActivationKind):
    """The worked example: ONNX ``Shrink`` with ``bias == lambd`` (PyTorch's Softshrink): ``y - l``
    above ``l``, ``y + l`` below ``-l``, 0 in between. Other Shrink nodes (a jump at +-lambd) are
    declined: ``from_op`` returns None and the layer's conv output is fitted instead."""

    @classmethod
    def normalise(cls, params):
        lambd = float(params.get("lambd", 0.5))
        if lambd < 0:
            raise ValueError(f"softshrink: lambd must be >= 0, got {lambd}")
        return {"lambd": lambd}

    @classmethod
    def from_op(cls, node, channels):
        lambd, bias = float(node.attrs.get("lambd", 0.5)), float(node.attrs.get("bias", 0.0))
        return {"lambd": lambd} if bias == lambd and lambd >= 0 else None

    def value(self, y):
        lam = self.params["lambd"]
        return np.where(y > lam, y - lam, np.where(y < -lam, y + lam, 0.0))

    def linear_pieces(self):
        lam = self.params["lambd"]
        return [(1.0, lam, -np.inf, -lam), (0.0, 0.0, -lam, lam), (1.0, -lam, lam, np.inf)]


def _register_softshrink():
    """In a kind's module this is the class's decorator; here it is applied in the tests that ask
    for the kind, so that the others see the registry as it ships."""
    register("softshrink", op_types=("Shrink",))(SoftShrink)


@pytest.fixture
def thresholded():
    _register_softshrink()
    yield Activation("softshrink", {"lambd": 0.5})
    del REGISTRY["softshrink"]


def test_new_kind_z_step_matches_grid_search(thresholded):
    rng = np.random.default_rng(0)
    a = np.where(rng.random((40, 8)) < 0.3, 0.0, rng.uniform(-3, 3, (40, 8)))
    u = rng.standard_normal((40, 8)) * 2
    for lam in (0.01, 1.0):
        z = z_step(a, u, lam, thresholded)
        grid = np.linspace(-8, 8, 32001)
        shrunk = np.sign(grid) * np.maximum(np.abs(grid) - 0.5, 0.0)  # independent form of softshrink
        brute = ((a[..., None] - shrunk) ** 2 + lam * (grid - u[..., None]) ** 2).min(-1)
        f = z_objective(z, a, u, lam, thresholded)
        assert np.all(f <= brute + 1e-12)  # never worse than the grid (exact per piece)
        assert np.all(f >= brute - 1e-6)  # and the grid is within its resolution of it


def _conv_shrink(bias=0.5):
    rng = np.random.default_rng(2)
    d = 24
    basis = rng.standard_normal((d, 4)).astype(np.float32)
    w = he(rng, (d, 8, 3, 3), 72)
    w = (np.einsum("dr,rckl->dckl", basis, w[:4]) / 2 + 0.05 * w).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Shrink", ["y"], ["o"], bias=bias, lambd=0.5)]
    inits = {"w": w, "b": np.zeros(d, np.float32)}
    return model_from(nodes, inits, ["N", 8, 10, 10], "o", ["N", d, 10, 10])


def test_new_kind_is_found_in_a_graph_and_compressed(thresholded, tmp_path):
    m = _conv_shrink()
    norm = normalise(m)
    (layer,) = find_conv_layers(norm, infer_value_types(with_input_shapes(norm, {"input": [1, 8, 10, 10]})))
    assert (layer.activation, layer.activation_params, layer.target) == ("softshrink", {"lambd": 0.5}, "o")
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    x = np.random.default_rng(3).standard_normal((32, 8, 10, 10)).astype(np.float32)
    out = tmp_path / "m.lowrank.onnx"
    compress(str(path), {"input": x}, output=str(out), ranks={"conv": 6}, speedup=None)
    want = run(m, {"input": x[:4]})[0]
    got = run(onnx.load(str(out)), {"input": x[:4]})[0]
    assert np.linalg.norm(got - want) <= 0.1 * np.linalg.norm(want)


@pytest.mark.parametrize("registered, bias", [(False, 0.5), (True, 0.0)])
def test_unregistered_or_declined_op_is_not_used(registered, bias):
    if registered:
        _register_softshrink()
    try:
        norm = normalise(_conv_shrink(bias))
        (layer,) = find_conv_layers(norm, infer_value_types(with_input_shapes(norm, {"input": [1, 8, 10, 10]})))
    finally:
        REGISTRY.pop("softshrink", None)
    assert (layer.activation, layer.target) == ("identity", "y")  # the conv output is fitted, not the Shrink


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_recognition_data_is_consistent(name):
    """Each written-out parameter set is a valid activation; ``from_op`` on the op with default
    attributes gives parameters the class accepts; ``is_identity`` agrees with ``value``."""
    cls = REGISTRY[name]
    y = np.linspace(-9, 9, 721)
    for p in cls.written_out:
        act = Activation(name, p)
        assert not act.is_identity and np.abs(act.apply(y) - y).max() > 0.1
    for op in cls.op_types:
        inputs = (object(), np.ones(1, np.float32)) if op == "PRelu" else (object(),)
        params = cls.from_op(OpNode(op, {}, inputs), 4)
        assert params is not None
        act = Activation(name, params)
        assert act.is_identity == bool(np.allclose(act.apply(y), y))


def test_register_sets_the_data_and_refuses_typos_and_twice():
    try:
        register("softshrink", op_types=("Shrink",))(SoftShrink)
        assert (SoftShrink.name, SoftShrink.op_types, SoftShrink.written_out) == ("softshrink", ("Shrink",), ())
        assert REGISTRY["softshrink"] is SoftShrink
        with pytest.raises(ValueError, match="registered twice"):
            register("softshrink")(SoftShrink)
    finally:
        REGISTRY.pop("softshrink", None)
    with pytest.raises(TypeError, match="op_type"):
        register("softshrink", op_type=("Shrink",))(SoftShrink)
    with pytest.raises(TypeError, match="table_a"):  # a smooth kind's datum on a piecewise-linear class
        register("softshrink", table_a=(0.0, 1.0))(SoftShrink)
    assert "softshrink" not in REGISTRY
