"""The graph rewrite: a Conv replaced by its factorised chain computes what the maths says.

Truth here is always the original model run by onnxruntime (or numpy applied to its outputs),
never numbers produced by the code under test.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.graph.layers import find_conv_layers
from onnx_lowrank.graph.loading import infer_value_types, with_input_shapes
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.graph.rewrite import ConvStage, first_stage_attrs, pointwise_attrs, rewrite_convs
from onnx_lowrank.plan import LayerPlan
from onnx_lowrank.schemes import CHANNEL
from onnx_lowrank.solver.reconstruction import Factorisation

from builders import conv_chain, run


# ---------------------------------------------------------------------------------------------
# model building


def _conv_model(cfg: dict, seed: int = 0) -> tuple[onnx.ModelProto, dict, list[str]]:
    """input -> Conv(cfg) -> Relu [-> Conv 3x3 -> Relu]; returns model, feed, conv output names."""
    rng = np.random.default_rng(seed)
    c, d = cfg["c"], cfg["d"]
    kh, kw = cfg["k"]
    h, w = cfg["hw"]
    n = cfg.get("batch", 1)
    attrs = {"kernel_shape": [kh, kw]}
    if cfg.get("strides"):
        attrs["strides"] = list(cfg["strides"])
    if cfg.get("dil"):
        attrs["dilations"] = list(cfg["dil"])
    if cfg.get("auto_pad"):
        attrs["auto_pad"] = cfg["auto_pad"]
    if cfg.get("pads") is not None:
        attrs["pads"] = list(cfg["pads"])
    inits = {"w0": (rng.standard_normal((d, c, kh, kw)) / np.sqrt(c * kh * kw)).astype(np.float32)}
    inputs = ["input", "w0"]
    if cfg.get("bias", True):
        inits["b0"] = rng.standard_normal(d).astype(np.float32)
        inputs.append("b0")
    nodes = [helper.make_node("Conv", inputs, ["c0"], name="conv0", **attrs),
             helper.make_node("Relu", ["c0"], ["a0"], name="relu0")]
    convs = ["c0"]
    out = "a0"
    if cfg.get("two"):
        d2 = cfg.get("d2", 5)
        inits["w1"] = (rng.standard_normal((d2, d, 3, 3)) / np.sqrt(d * 9)).astype(np.float32)
        inits["b1"] = rng.standard_normal(d2).astype(np.float32)
        nodes += [helper.make_node("Conv", ["a0", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c1"], ["a1"], name="relu1")]
        convs.append("c1")
        out = "a1"
    graph = helper.make_graph(
        nodes, "rewrite_test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, c, h, w])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", "d", "h", "w"])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    feed = {"input": rng.standard_normal((n, c, h, w)).astype(np.float32)}
    return m, feed, convs


def _expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Copy of the model that also returns the named tensors (built here, independent of the package)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return m


def _layers(model: onnx.ModelProto, feed: dict):
    norm = normalise(model)
    vt = infer_value_types(with_input_shapes(norm, {k: list(v.shape) for k, v in feed.items()}))
    return norm, find_conv_layers(norm, vt)


def _random_orthogonal(rng, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------------------------------------
# full-rank identity over many Conv configurations

CONFIGS = [
    # plain
    dict(c=3, d=8, k=(3, 3), hw=(9, 9), pads=[1, 1, 1, 1]),
    dict(c=4, d=6, k=(3, 3), hw=(8, 8)),                                       # no pads attr at all
    dict(c=5, d=7, k=(1, 1), hw=(7, 5), bias=False),
    # strides
    dict(c=4, d=8, k=(3, 3), hw=(11, 11), strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(c=4, d=8, k=(3, 3), hw=(10, 10), strides=[2, 2], pads=[1, 1, 1, 1], batch=3),
    dict(c=3, d=6, k=(3, 3), hw=(13, 9), strides=[2, 1], pads=[1, 1, 1, 1]),
    dict(c=3, d=6, k=(5, 3), hw=(15, 8), strides=[2, 1], pads=[2, 1, 2, 1], bias=False),
    # asymmetric explicit pads
    dict(c=4, d=5, k=(3, 3), hw=(9, 10), pads=[0, 1, 2, 0]),
    dict(c=4, d=5, k=(3, 3), hw=(9, 10), strides=[2, 2], pads=[2, 0, 1, 1], bias=False),
    dict(c=2, d=9, k=(5, 3), hw=(12, 7), pads=[1, 2, 3, 0], dil=[1, 2]),
    # every auto_pad
    dict(c=4, d=6, k=(3, 3), hw=(9, 9), auto_pad="NOTSET", pads=[1, 1, 1, 1]),
    dict(c=4, d=6, k=(3, 3), hw=(9, 9), auto_pad="NOTSET"),
    dict(c=4, d=6, k=(3, 3), hw=(9, 9), auto_pad="SAME_UPPER"),
    dict(c=4, d=6, k=(3, 3), hw=(9, 9), auto_pad="SAME_LOWER"),
    dict(c=4, d=6, k=(3, 3), hw=(9, 9), auto_pad="VALID"),
    dict(c=4, d=6, k=(4, 4), hw=(9, 8), auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(c=4, d=6, k=(4, 4), hw=(9, 8), auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(c=3, d=7, k=(3, 3), hw=(11, 10), auto_pad="VALID", strides=[2, 2], batch=2),
    dict(c=3, d=7, k=(1, 3), hw=(7, 9), auto_pad="SAME_LOWER", strides=[2, 1]),
    # dilation
    dict(c=4, d=8, k=(3, 3), hw=(13, 13), dil=[2, 2], pads=[2, 2, 2, 2]),
    dict(c=4, d=8, k=(3, 3), hw=(12, 11), dil=[2, 2], strides=[2, 2], pads=[1, 2, 2, 1], bias=False),
    dict(c=4, d=8, k=(3, 3), hw=(13, 12), dil=[2, 1], auto_pad="VALID"),
    # rectangular kernels
    dict(c=6, d=8, k=(1, 3), hw=(8, 9), pads=[0, 1, 0, 1]),
    dict(c=6, d=8, k=(3, 1), hw=(9, 8), pads=[1, 0, 1, 0], batch=2),
    dict(c=3, d=10, k=(5, 3), hw=(11, 11), pads=[2, 1, 2, 1]),
    dict(c=3, d=10, k=(3, 5), hw=(11, 11), strides=[2, 2], pads=[1, 2, 1, 2], bias=False),
    # two Convs (both rewritten), batch > 1, odd sizes
    dict(c=3, d=8, k=(3, 3), hw=(9, 9), pads=[1, 1, 1, 1], two=True, batch=2),
    dict(c=3, d=8, k=(5, 3), hw=(13, 7), strides=[2, 1], pads=[2, 1, 2, 1], two=True, bias=False),
    dict(c=4, d=6, k=(3, 3), hw=(15, 15), auto_pad="SAME_UPPER", strides=[2, 2], two=True, batch=3),
    dict(c=4, d=6, k=(3, 3), hw=(10, 13), dil=[2, 2], auto_pad="VALID", two=True, d2=7),
    dict(c=1, d=4, k=(7, 7), hw=(17, 17), strides=[2, 2], pads=[3, 3, 3, 3], batch=2),
]


def _cfg_id(cfg: dict) -> str:
    parts = [f"c{cfg['c']}d{cfg['d']}k{cfg['k'][0]}x{cfg['k'][1]}", f"{cfg['hw'][0]}x{cfg['hw'][1]}"]
    for key in ("strides", "pads", "dil", "auto_pad", "batch"):
        if cfg.get(key) is not None:
            v = cfg[key]
            parts.append(f"{key}={'-'.join(map(str, v)) if isinstance(v, list) else v}")
    if cfg.get("bias") is False:
        parts.append("nobias")
    if cfg.get("two"):
        parts.append("two")
    return ",".join(parts)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_cfg_id(c) for c in CONFIGS])
def test_full_rank_orthogonal_factorisation_is_identity(cfg):
    model, feed, _ = _conv_model(cfg, seed=len(_cfg_id(cfg)))
    expected = run(model, feed)[0]
    norm, layers = _layers(model, feed)
    assert [lay.skip_reason for lay in layers] == [None] * len(layers)
    rng = np.random.default_rng(7)
    replacements = {}
    for i, lay in enumerate(layers):
        d = lay.out_channels
        q = _random_orthogonal(rng, d)
        # M = Q Q^T = I, but both new Convs have every channel mixed.
        plan = LayerPlan(lay, i, CHANNEL, rank=d, factorisation=Factorisation(q, q, np.zeros(d)))
        replacements[lay.name] = plan.stages()
    new = rewrite_convs(norm, replacements)
    onnx.checker.check_model(new, full_check=True)
    convs = [n for n in new.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 * len(layers)
    got = run(new, feed)[0]
    assert got.shape == expected.shape
    assert _rel_err(got, expected) < 1e-4


def test_stage_attrs_built_by_hand_match_original():
    """Replicate the plan's stages with the public pieces (no LayerPlan): same result."""
    cfg = dict(c=4, d=8, k=(3, 3), hw=(11, 10), strides=[2, 2], pads=[0, 1, 2, 1], dil=[1, 2])
    model, feed, _ = _conv_model(cfg, seed=3)
    expected = run(model, feed)[0]
    norm, (lay,) = _layers(model, feed)
    rng = np.random.default_rng(1)
    q = _random_orthogonal(rng, 8)
    w1 = np.einsum("dr,dckl->rckl", q, lay.weight.astype(np.float64))
    stages = [ConvStage(w1, q.T @ lay.bias, first_stage_attrs(lay.attrs, lay.kernel)),
              ConvStage(q[:, :, None, None], None, pointwise_attrs())]
    new = rewrite_convs(norm, {lay.name: stages})
    assert _rel_err(run(new, feed)[0], expected) < 1e-4


# ---------------------------------------------------------------------------------------------
# rank r < d: the conv output becomes M y + b channelwise

LOW_RANK_CONFIGS = [
    dict(c=3, d=8, k=(3, 3), hw=(9, 9), pads=[1, 1, 1, 1], batch=2),
    dict(c=4, d=10, k=(5, 3), hw=(12, 9), strides=[2, 1], pads=[0, 2, 1, 0], bias=False),
    dict(c=4, d=6, k=(3, 3), hw=(11, 11), auto_pad="SAME_LOWER", strides=[2, 2], dil=[1, 1]),
    dict(c=4, d=6, k=(3, 3), hw=(13, 12), dil=[2, 2], auto_pad="VALID", batch=3),
]


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("cfg", LOW_RANK_CONFIGS, ids=[_cfg_id(c) for c in LOW_RANK_CONFIGS])
def test_low_rank_chain_outputs_M_y_plus_b(cfg, rank):
    model, feed, (conv_out,) = _conv_model(cfg, seed=11)
    y = run(_expose(model, [conv_out]), feed)[1].astype(np.float64)  # (N, d, H', W')
    norm, (lay,) = _layers(model, feed)
    d = lay.out_channels
    rng = np.random.default_rng(rank)
    P, Q, b = rng.standard_normal((d, rank)), rng.standard_normal((d, rank)), rng.standard_normal(d)
    plan = LayerPlan(lay, 0, CHANNEL, rank=rank, factorisation=Factorisation(P, Q, b))
    new = rewrite_convs(norm, {lay.name: plan.stages()})
    onnx.checker.check_model(new, full_check=True)
    final, got = run(_expose(new, [conv_out]), feed)
    want = np.einsum("de,nehw->ndhw", P @ Q.T, y) + b[None, :, None, None]
    assert got.shape == y.shape
    assert _rel_err(got, want) < 1e-4
    assert _rel_err(final, np.maximum(want, 0)) < 1e-4   # the Relu downstream is still wired to it
    # The first stage has exactly `rank` filters, the second is 1x1 rank -> d.
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    convs = [n for n in new.graph.node if n.op_type == "Conv"]
    assert [inits[n.input[1]].shape for n in convs] == [(rank, lay.in_channels, *lay.kernel), (d, rank, 1, 1)]


def test_rewrite_unknown_name_raises():
    model, feed, _ = _conv_model(CONFIGS[0])
    norm, (lay,) = _layers(model, feed)
    with pytest.raises(KeyError):
        rewrite_convs(norm, {"nope": [ConvStage(lay.weight, lay.bias, first_stage_attrs(lay.attrs, lay.kernel))]})


def test_rewrite_keeps_shared_input_and_other_consumers():
    """The Conv input also feeds another branch; the conv output feeds two nodes. Both survive."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y"], ["r"], name="relu"),
             helper.make_node("Sigmoid", ["y"], ["s"], name="sig"),
             helper.make_node("ReduceMean", ["input"], ["m"], name="mean", axes=[1], keepdims=1),
             helper.make_node("Add", ["r", "s"], ["rs"]),
             helper.make_node("Add", ["rs", "m"], ["output"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 7, 7])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    feed = {"input": rng.standard_normal((1, 3, 7, 7)).astype(np.float32)}
    expected = run(model, feed)
    norm, (lay,) = _layers(model, feed)
    q = _random_orthogonal(rng, 6)
    new = rewrite_convs(norm, {"conv": LayerPlan(lay, 0, CHANNEL, rank=6, factorisation=Factorisation(q, q, np.zeros(6))).stages()})
    assert [o.name for o in new.graph.output] == ["output", "y"]
    got = run(new, feed)
    for g, e in zip(got, expected):
        assert _rel_err(g, e) < 1e-4


# ---------------------------------------------------------------------------------------------
# end to end through the public API


def _small_model():
    return conv_chain([3, 8, 16, 12], size=12, lowrank_bias=4, seed=2)


def _data(n=10, seed=0):
    return {"input": np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32)}


def test_compress_end_to_end_structure_and_determinism(tmp_path):
    model = _small_model()
    data = _data()
    ranks = {"conv1": 4, "conv2": 5}
    out1, out2 = tmp_path / "a.onnx", tmp_path / "b.onnx"
    res1 = onnx_lowrank.compress(model, data, output=out1, ranks=ranks, speedup=None, seed=3)
    res2 = onnx_lowrank.compress(model, data, output=out2, ranks=ranks, speedup=None, seed=3)
    assert out1.read_bytes() == out2.read_bytes()

    new = onnx.load(str(out1))
    onnx.checker.check_model(new, full_check=True)
    assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in new.graph.input] == [i.name for i in model.graph.input]
    conv_names = [n.name for n in new.graph.node if n.op_type == "Conv"]
    assert conv_names == ["conv0", "conv1_lowrank0", "conv1_lowrank1", "conv2_lowrank0", "conv2_lowrank1"]
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    first = {n.name: n for n in new.graph.node}
    assert inits[first["conv1_lowrank0"].input[1]].shape == (4, 8, 3, 3)
    assert inits[first["conv1_lowrank1"].input[1]].shape == (16, 4, 1, 1)
    assert inits[first["conv2_lowrank0"].input[1]].shape == (5, 16, 3, 3)
    assert inits[first["conv2_lowrank1"].input[1]].shape == (12, 5, 1, 1)

    x = _data(3, seed=9)
    (ref,) = run(model, x)
    (got,) = run(new, x)
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    # The in-memory result is the file that was written.
    assert res1.model.SerializeToString(deterministic=True) == out1.read_bytes()
    by_name = {lay["name"]: lay for lay in res2.report["layers"]}
    assert by_name["conv1"]["rank"] == 4 and by_name["conv2"]["rank"] == 5
    assert by_name["conv0"]["status"] == "skipped"


def test_compress_does_not_modify_the_callers_model():
    model = _small_model()
    before = model.SerializeToString(deterministic=True)
    onnx_lowrank.compress(model, _data(), ranks={"conv1": 3}, speedup=None)
    assert model.SerializeToString(deterministic=True) == before


def test_compress_full_rank_hand_ranks_at_break_even_leave_model_unchanged():
    """A rank above break-even saves nothing: the layer is reported skipped and the output equals the original."""
    model = _small_model()
    data = _data()
    res = onnx_lowrank.compress(model, data, ranks={"conv1": 16}, speedup=None)
    x = _data(2, seed=4)
    assert _rel_err(run(res.model, x)[0], run(model, x)[0]) < 1e-5
    (conv1,) = [lay for lay in res.report["layers"] if lay["name"] == "conv1"]
    assert conv1["status"] == "skipped" and conv1["rank"] is None and "break-even" in conv1["reason"]


def _unnamed(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        n.name = ""
    return m


def test_compress_model_with_unnamed_nodes():
    """ONNX node names are optional; layers are then named after their output tensor (here c1)."""
    model = _unnamed(_small_model())
    res = onnx_lowrank.compress(model, _data(), ranks={"c1": 4}, speedup=None)
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4
    assert {"c1_lowrank0", "c1_lowrank1"} <= {n.name for n in convs}
    x = _data(2, seed=4)
    assert run(res.model, x)[0].shape == run(model, x)[0].shape


def test_compress_full_rank_identity_end_to_end_digest_stable():
    """Hash of the written model is a pure function of (model, data, options)."""
    model = _small_model()
    digests = set()
    for _ in range(2):
        res = onnx_lowrank.compress(model, _data(), ranks={"conv2": 4}, speedup=None, method="linear")
        digests.add(hashlib.sha256(res.model.SerializeToString(deterministic=True)).hexdigest())
    assert len(digests) == 1


def test_compress_residual_block_and_conv_output_as_graph_output():
    """conv_a -> Relu -> conv_b -> Add(shortcut) -> Relu, with conv_b's raw output also a graph output."""
    rng = np.random.default_rng(30)
    basis = rng.standard_normal((8, 2))
    inits = {"wa": (rng.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32),
             "ba": (0.1 * rng.standard_normal(8)).astype(np.float32),
             "wb": (np.einsum("dr,rckl->dckl", basis, rng.standard_normal((2, 8, 3, 3))) / 8).astype(np.float32),
             "bb": (0.1 * rng.standard_normal(8)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "wa", "ba"], ["ya"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ya"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["ra", "wb", "bb"], ["yb"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["yb", "ra"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["output"], name="relu_b")]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 8, 10, 10]),
                               helper.make_tensor_value_info("yb", TensorProto.FLOAT, ["N", 8, 10, 10])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = {"input": rng.standard_normal((10, 3, 10, 10)).astype(np.float32)}
    res = onnx_lowrank.compress(model, data, ranks={"conv_b": 2}, speedup=None)
    new = res.model
    onnx.checker.check_model(new, full_check=True)
    assert [o.name for o in new.graph.output] == ["output", "yb"]
    assert [n.name for n in new.graph.node if n.op_type == "Conv"] == ["conv_a", "conv_b_lowrank0", "conv_b_lowrank1"]
    x = {"input": data["input"][:3]}
    ref, got = run(model, x), run(new, x)
    assert [g.shape for g in got] == [r.shape for r in ref]
    # conv_b's weights have rank 2 along the output channels, so rank 2 is (up to float error) exact.
    assert _rel_err(got[1], ref[1]) < 1e-3
    assert _rel_err(got[0], ref[0]) < 1e-3
