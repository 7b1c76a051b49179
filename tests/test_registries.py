"""Adding a scheme and adding a cost model: the worked examples of README "Adding a scheme / a cost model".

Each registers a small class (the only edit a new one needs, besides its tests) and checks what
it writes against independent truth: numpy and onnxruntime on hand-built weights, and the
parameters counted in the written file.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import onnx_lowrank
from onnx_lowrank.costs import COST_MODELS, CostModel, Costs
from onnx_lowrank.schemes import SCHEME_CHOICES, SCHEMES, ChannelScheme
from onnx_lowrank.schemes.choice import Fixed
from onnx_lowrank.solver.layer import LayerSolution
from onnx_lowrank.solver.ranks import select_ranks
from onnx_lowrank.solver.reconstruction import Factorisation
from onnx_lowrank.solver.shape import ConvShape

from builders import conv_chain, conv_node, model_from, run


class WeightSVD(ChannelScheme):
    """The channel pair solved without data: ``Q = P`` = the top ``rank`` left singular vectors of the
    weight (d x c k k), so the layer becomes ``U_r U_r^T (W x + bias)``. Shape, split, stages, stand-in
    and propagation are the pair's; only the solve differs."""

    name = "svd"

    def solve(self, y, yh, rank, layer, fit, held, **kwargs) -> LayerSolution:
        u = np.linalg.svd(layer.weight.reshape(layer.out_channels, -1).astype(np.float64), full_matrices=False)[0]
        return LayerSolution(Factorisation(u[:, :rank], u[:, :rank], np.zeros(layer.out_channels)),
                             "svd", None, None)


def test_adding_a_scheme(monkeypatch):
    scheme = WeightSVD()
    monkeypatch.setitem(SCHEMES, scheme.name, scheme)
    monkeypatch.setitem(SCHEME_CHOICES, scheme.name, Fixed(scheme))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    model = model_from([conv_node("conv", "input", "output", "w", "b", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                       {"w": w, "b": b}, ["N", 3, 9, 9], "output", ["N", 8, 9, 9])
    x = {"input": rng.standard_normal((10, 3, 9, 9)).astype(np.float32)}
    res = onnx_lowrank.compress(model, [x], scheme="svd", speedup=None, ranks={"conv": 3}, objective="flops",
                                rank_multiple=1, balance=False)
    (lay,) = res.report["layers"]
    assert (lay["scheme"], lay["rank"], lay["method"]) == ("svd", 3, "svd")
    # Truth: the projected Conv, built by hand from numpy's SVD and run by onnxruntime.
    u = np.linalg.svd(w.reshape(8, -1).astype(np.float64))[0][:, :3]
    proj = u @ u.T
    w_r = np.einsum("de,eckl->dckl", proj, w).astype(np.float32)
    want_model = model_from([conv_node("conv", "input", "output", "w", "b", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                            {"w": w_r, "b": (proj @ b).astype(np.float32)}, ["N", 3, 9, 9], "output",
                            ["N", 8, 9, 9])
    got, want = run(res.model, x)[0], run(want_model, x)[0]
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


class ParamCosts(Costs):
    """``--speedup`` counts the candidate layers' weights: ranks chosen by the FLOP rule at one position."""

    def choose(self, free, spectra, fixed, fixed_flops, total_flops, cfg):
        shapes = [ConvShape(p.shape.c, p.shape.d, p.shape.kh, p.shape.kw, 1) for p in free]
        budget = sum(s.original_flops() for s in shapes) / cfg.speedup
        return select_ranks(shapes, spectra, budget, 0, fixed, multiple=cfg.rank_multiple)


class ParamModel(CostModel):
    name = "params"
    help = "--speedup is the reduction of the layers' weights"

    def costs(self, compressor, plan, cfg) -> Costs:
        return ParamCosts()


def _conv_weights(model: onnx.ModelProto) -> int:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return sum(inits[n.input[1]].size for n in model.graph.node if n.op_type == "Conv")


def test_adding_a_cost_model(monkeypatch):
    monkeypatch.setitem(COST_MODELS, "params", ParamModel())
    model = conv_chain([3, 24, 32, 32], size=8, lowrank_bias=4)
    rng = np.random.default_rng(1)
    data = [{"input": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(10)]
    res = onnx_lowrank.compress(model, data, objective="params", speedup=2.0, rank_multiple=1, method="linear")
    assert res.report["objective"] == "params"
    assert all(lay["status"] == "factorised" or lay["break_even_rank"] is not None for lay in res.report["layers"])
    assert _conv_weights(model) / _conv_weights(res.model) >= 2.0  # every Conv a candidate: counted in the file
    assert any(lay["status"] == "factorised" for lay in res.report["layers"])
