"""The 3-D scheme (k x 1, 1 x k, 1 x 1): exact at full rank, costs as counted on the written graph,
and end to end through the pipeline. Truth: the original model run by onnxruntime, numpy on its
outputs, or FLOPs counted by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.graph.layers import node_flops
from onnx_lowrank.graph.loading import infer_value_types, with_input_shapes
from onnx_lowrank.graph.rewrite import rewrite_convs
from onnx_lowrank.schemes import SCHEMES
from onnx_lowrank.solver.reconstruction import Factorisation
from onnx_lowrank.solver.spatial import ThreeDShape

from builders import run
from test_rewrite import _conv_model, _expose, _layers, _random_orthogonal, _rel_err

THREE_D = SCHEMES["3d"]

# d >= c kh in each: the spatial split is exact at d'' = d, so rank d is exact end to end.
EXACT_CONFIGS = [
    dict(c=2, d=8, k=(3, 3), hw=(11, 10), strides=[2, 2], pads=[0, 1, 2, 1], dil=[1, 2]),
    dict(c=3, d=10, k=(3, 5), hw=(12, 13), strides=[2, 1], pads=[1, 2, 0, 1]),
    dict(c=2, d=7, k=(3, 2), hw=(9, 9), strides=[1, 2], pads=[2, 0, 1, 1], dil=[2, 1], bias=False),
    dict(c=2, d=6, k=(3, 3), hw=(11, 11), auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(c=2, d=6, k=(3, 3), hw=(10, 11), auto_pad="SAME_LOWER", strides=[2, 2], bias=False),
    dict(c=2, d=6, k=(2, 3), hw=(13, 12), auto_pad="VALID", dil=[2, 2], batch=2),
]


def _id(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("cfg", EXACT_CONFIGS, ids=[_id(c) for c in EXACT_CONFIGS])
def test_full_rank_chain_is_the_original_conv(cfg):
    model, feed, _ = _conv_model(cfg, seed=5)
    expected = run(model, feed)[0]
    norm, (lay,) = _layers(model, feed)
    assert THREE_D.skip_reason(lay) is None
    d = lay.out_channels
    q = _random_orthogonal(np.random.default_rng(2), d)
    stages = THREE_D.stages(lay, d, Factorisation(q, q, np.zeros(d)))
    new = rewrite_convs(norm, {lay.name: stages})
    onnx.checker.check_model(new, full_check=True)
    kernels = [list(helper.get_attribute_value(a)) for n in new.graph.node if n.op_type == "Conv"
               for a in n.attribute if a.name == "kernel_shape"]
    assert kernels == [[lay.kernel[0], 1], [1, lay.kernel[1]], [1, 1]]
    assert _rel_err(run(new, feed)[0], expected) < 1e-4


@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_chain_is_the_channel_map_of_the_spatial_pair(rank):
    """The written chain computes M z + b, z the k x 1 -> 1 x k pair's output (the core's response)."""
    cfg = dict(c=4, d=9, k=(3, 3), hw=(12, 11), strides=[2, 1], pads=[1, 0, 2, 1], dil=[1, 2])
    model, feed, (conv_out,) = _conv_model(cfg, seed=8)
    norm, (lay,) = _layers(model, feed)
    pre, core = THREE_D.split(lay, rank)
    z = run(_expose(rewrite_convs(norm, {lay.name: [*pre, core]}), [conv_out]), feed)[1].astype(np.float64)
    rng = np.random.default_rng(rank)
    d = lay.out_channels
    P, Q, b = rng.standard_normal((d, rank)), rng.standard_normal((d, rank)), rng.standard_normal(d)
    new = rewrite_convs(norm, {lay.name: THREE_D.stages(lay, rank, Factorisation(P, Q, b))})
    got = run(_expose(new, [conv_out]), feed)[1]
    want = np.einsum("de,nehw->ndhw", P @ Q.T, z) + b[None, :, None, None]
    assert _rel_err(got, want) < 1e-4
    shapes = [numpy_helper.to_array(t).shape for t in new.graph.initializer if t.name.endswith("_W")]
    assert sorted(shapes) == sorted([(rank, 4, 3, 1), (rank, rank, 1, 3), (d, rank, 1, 1)])


def test_cost_by_hand():
    # 4 -> 8, 3 x 3, 10 x 10 input, pads 1, stride 2: H' = W' = 5, vertical conv on 5 x 10 positions.
    s = ThreeDShape(4, 8, 3, 3, 25, positions_v=50)
    assert s.factorised_flops(3) == 2 * (3 * 4 * 3 * 50 + 3 * 3 * 3 * 25 + 8 * 3 * 25) == 6150
    assert s.original_flops() == 2 * 8 * 4 * 9 * 25
    # d'' is capped at min(c kh, d kw) = 12: rank 8 uses 8, and ranks beyond 12 keep 12 for the spatial pair.
    assert ThreeDShape(4, 20, 3, 3, 25, positions_v=50).factorised_flops(16) == \
        2 * (12 * 4 * 3 * 50 + 16 * 12 * 3 * 25 + 20 * 16 * 25)
    be = s.break_even_rank()
    assert s.factorised_flops(be) < s.original_flops() and (be == 8 or s.factorised_flops(be + 1) >= s.original_flops())


@pytest.mark.parametrize("cfg", EXACT_CONFIGS[:4], ids=[_id(c) for c in EXACT_CONFIGS[:4]])
def test_cost_is_what_the_written_graph_counts(cfg):
    model, feed, _ = _conv_model(cfg, seed=1)
    norm, (lay,) = _layers(model, feed)
    rank = 4
    new = rewrite_convs(norm, {lay.name: THREE_D.stages(lay, rank, Factorisation(
        np.ones((lay.out_channels, rank)), np.ones((lay.out_channels, rank)), np.zeros(lay.out_channels)))})
    shapes = {k: [1, *v.shape[1:]] for k, v in feed.items()}
    flops = node_flops(new, infer_value_types(with_input_shapes(new, shapes)))
    counted = sum(flops[n.name] for n in new.graph.node if n.op_type == "Conv")
    assert THREE_D.shape(lay).factorised_flops(rank) == counted


# ---------------------------------------------------------------------------------------------
# end to end


def _low_rank_weight(rng, d, c, kh, kw, r):
    """Rank <= r both as a (d, c kh kw) matrix and as the (c kh, d kw) spatial matrix."""
    A, B, C = rng.standard_normal((d, r)), rng.standard_normal((r, c, kh)), rng.standard_normal((r, kw))
    return (np.einsum("oa,acp,aq->ocpq", A, B, C) / np.sqrt(c * kh * kw)).astype(np.float32)


def _exact_model(r=2):
    rng = np.random.default_rng(4)
    inits = {"w0": _low_rank_weight(rng, 16, 8, 3, 3, r), "b0": rng.standard_normal(16).astype(np.float32),
             "w1": _low_rank_weight(rng, 16, 16, 3, 5, r), "b1": rng.standard_normal(16).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], name="conv0", kernel_shape=[3, 3],
                              strides=[2, 2], pads=[0, 1, 2, 1], dilations=[1, 2]),
             helper.make_node("Relu", ["c0"], ["a0"]),
             helper.make_node("Conv", ["a0", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 5],
                              pads=[1, 2, 1, 2]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("GlobalAveragePool", ["a1"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["output"])]
    graph = helper.make_graph(nodes, "exact3d", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                ["N", 8, 14, 14])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _feed(n, seed):
    return {"input": np.random.default_rng(seed).standard_normal((n, 8, 14, 14)).astype(np.float32)}


@pytest.mark.parametrize("asymmetric", [True, False])
def test_compress_3d_is_exact_on_layers_of_that_rank(asymmetric):
    """Weights of channel and spatial rank 2: the 3-D scheme at rank 2 reproduces the model."""
    model = _exact_model()
    res = onnx_lowrank.compress(model, _feed(40, 0), ranks={"conv0": 2, "conv1": 2}, speedup=None, scheme="3d",
                                objective="flops", method="linear", asymmetric=asymmetric, samples_per_image=20)
    x = _feed(3, 9)
    assert _rel_err(run(res.model, x)[0], run(model, x)[0]) < 1e-4
    assert [lay["scheme"] for lay in res.report["layers"]] == ["3d", "3d"]
    assert [n.op_type for n in res.model.graph.node].count("Conv") == 6
    # conv0: 14 x 14 -> H' = (14 + 0 + 2 - 2 - 1) // 2 + 1 = 7, W' = (14 + 1 + 1 - 4 - 1) // 2 + 1 = 6;
    # its 3 x 1 conv runs on 7 x 14 positions. conv1: 7 x 6 -> 7 x 6 (pads 1, 2), 3 x 1 on 7 x 6.
    want = 2 * (2 * 8 * 3 * (7 * 14) + 2 * 2 * 3 * (7 * 6) + 16 * 2 * (7 * 6)) + \
        2 * (2 * 16 * 3 * (7 * 6) + 2 * 2 * 5 * (7 * 6) + 16 * 2 * (7 * 6))
    assert res.report["conv_flops_after"] == want


def test_compress_3d_by_budget_is_deterministic_and_keeps_1x1_as_channel_pairs():
    rng = np.random.default_rng(0)
    model = _exact_model(r=4)
    # Append a 1 x 1 Conv: it cannot be split spatially and keeps the channel scheme.
    g = model.graph
    g.initializer.append(numpy_helper.from_array((rng.standard_normal((24, 16, 1, 1)) / 4).astype(np.float32), "w2"))
    g.node[3].output[0] = "a1r"
    g.node.insert(4, helper.make_node("Conv", ["a1r", "w2"], ["a1"], name="conv2", kernel_shape=[1, 1]))
    g.output[0].type.tensor_type.shape.dim[1].dim_value = 24
    runs = [onnx_lowrank.compress(model, _feed(30, 1), speedup=3.0, scheme="3d", objective="flops",
                                  rank_multiple=1) for _ in range(2)]
    assert runs[0].model.SerializeToString() == runs[1].model.SerializeToString()
    by = {lay["name"]: lay for lay in runs[0].report["layers"]}
    assert by["conv0"]["scheme"] == "3d" and by["conv1"]["scheme"] == "3d"
    assert by["conv2"]["scheme"] in ("channel", None)
    assert runs[0].report["speedup_theoretical"] >= 3.0


def test_unknown_scheme_is_a_user_error():
    with pytest.raises(LowRankError, match="--scheme"):
        onnx_lowrank.compress(_exact_model(), _feed(10, 0), scheme="spatial", objective="flops")


def test_cli_scheme_option(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from onnx_lowrank.cli import main

    onnx.save(_exact_model(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "calib.npz", **_feed(20, 0))
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    bad = CliRunner().invoke(main, ["compress", "m.onnx", "--calib", "calib.npz", "--scheme", "2d", "-o", "o.onnx"])
    assert bad.exit_code == 2 and bad.stderr.startswith("Usage") or bad.stderr.startswith("error"), bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    ok = CliRunner().invoke(main, ["compress", "m.onnx", "--calib", "calib.npz", "--scheme", "3d", "--objective",
                                   "flops", "--rank-multiple", "1", "--speedup", "2", "-o", "o.onnx", "--report",
                                   "r.json", "--no-measure"])
    assert ok.exit_code == 0, ok.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["scheme"] == "3d" and {lay["scheme"] for lay in rep["layers"]} <= {"3d", None}
    assert "3-D, " in ok.stdout


def test_latency_layer_model_of_the_3d_chain():
    """The timed 3-D chain (the scheme's stand-in in the one-layer model) has the three kernels and the
    original's output shape (stride, pads, dilation); its timing key differs from the pair's."""
    import onnxruntime as ort

    from onnx_lowrank.graph.timing import LayerSpec, layer_of

    spec = LayerSpec(8, 16, 3, 5, 13, 12, (2, 1), (0, 2, 1, 1), (1, 2))
    assert SCHEMES["3d"].timing_tag != SCHEMES["channel"].timing_tag
    x = np.random.default_rng(0).random((1, 8, 13, 12), dtype=np.float32)
    base = spec.model()
    lay = layer_of(base)
    m = rewrite_convs(base, {lay.name: SCHEMES["3d"].stand_in(lay, 4)})
    outs = [ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for mm in (base, m)]
    kernels = [list(helper.get_attribute_value(a)) for n in m.graph.node if n.op_type == "Conv"
               for a in n.attribute if a.name == "kernel_shape"]
    assert kernels == [[3, 1], [1, 5], [1, 1]]
    # H' = (13 + 0 + 1 - 2 - 1) // 2 + 1 = 6, W' = (12 + 2 + 1 - 8 - 1) + 1 = 7
    assert outs[0].shape == outs[1].shape == (1, 16, 6, 7)


def test_3d_with_the_latency_objective(tmp_path):
    demo = Path(__file__).resolve().parent.parent / "models" / "mnist_vgg"
    res = onnx_lowrank.compress(str(demo / "mnist_vgg.onnx"), str(demo / "calib.npz"), speedup=1.5, scheme="3d",
                                latency_seconds=0.1, latency_cache=str(tmp_path), threads=1, max_images=40,
                                samples_per_image=4, method="linear", asymmetric=False)
    rep = res.report
    assert rep["objective"] == "latency" and rep["predicted_latency_speedup"] > 1.0
    done = [lay for lay in rep["layers"] if lay["rank"] is not None]
    assert done and all(lay["scheme"] == "3d" and lay["rank"] % 16 == 0 for lay in done)
    table = json.loads(next(tmp_path.glob("latency-*.json")).read_text())
    assert any(k.endswith("_3d_m16") for k in table["entries"])


def _auto_model():
    """conv0: channel rank 1 but spatial rank 3 (the pair is exact at rank 1, 3-D is not at that cost);
    conv1: spatial rank 1, channel rank 2 (3-D is exact at rank 2, the pair is not at that cost)."""
    rng = np.random.default_rng(6)
    w0 = np.einsum("o,cpq->ocpq", rng.standard_normal(32), rng.standard_normal((8, 3, 3))) / 5
    C = rng.standard_normal((16, 2)) @ rng.standard_normal((2, 3))
    w1 = np.einsum("cp,oq->ocpq", rng.standard_normal((32, 3)), C) / 10
    inits = {"w0": w0.astype(np.float32), "b0": rng.standard_normal(32).astype(np.float32),
             "w1": w1.astype(np.float32), "b1": rng.standard_normal(16).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], name="conv0", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["a0"]),
             helper.make_node("Conv", ["a0", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("GlobalAveragePool", ["a1"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["output"])]
    graph = helper.make_graph(nodes, "auto", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["N", 8, 10, 10])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("asymmetric", [True, False])
def test_auto_picks_the_scheme_that_is_exact_per_layer(asymmetric):
    model = _auto_model()
    feed = {"input": np.random.default_rng(0).standard_normal((40, 8, 10, 10)).astype(np.float32)}
    x = {"input": np.random.default_rng(1).standard_normal((3, 8, 10, 10)).astype(np.float32)}
    ref = run(model, x)[0]
    common = dict(speedup=None, objective="flops", rank_multiple=1, method="linear", asymmetric=asymmetric,
                  samples_per_image=20)
    # Ranks as 3-D ranks (auto starts from 3-D); the pair alone at rank 1 costs less than 3-D at 2 on both.
    runs = {scheme: onnx_lowrank.compress(model, feed, scheme=scheme, ranks=ranks, **common)
            for scheme, ranks in [("auto", {"conv0": 2, "conv1": 2}), ("3d", {"conv0": 2, "conv1": 2}),
                                  ("channel", {"conv0": 1, "conv1": 1})]}
    errs = {k: _rel_err(run(r.model, x)[0], ref) for k, r in runs.items()}
    assert errs["auto"] < 1e-4 < min(errs["channel"], errs["3d"]), errs
    by = {lay["name"]: lay for lay in runs["auto"].report["layers"]}
    # conv0, per position: 3-D at rank 2 costs 2 (2 8 3 + 2 2 3 + 32 2) = 248, the pair 2 (8 9 + 32) = 208 at
    # rank 1 and 416 at rank 2. conv1: 3-D 2 (2 32 3 + 2 2 3 + 16 2) = 472 < the pair's 2 (32 9 + 16) = 608
    # at rank 1, so no pair is offered.
    assert (by["conv0"]["scheme"], by["conv0"]["rank"]) == ("channel", 1)
    assert by["conv0"]["flops_after"] == 208 * 100
    assert (by["conv1"]["scheme"], by["conv1"]["rank"]) == ("3d", 2)
    assert runs["auto"].report["scheme"] == "auto"
    assert runs["auto"].report["flops_after"] <= runs["3d"].report["flops_after"]
