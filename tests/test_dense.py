"""MatMul / Gemm layers with a constant weight (graph/dense.py, schemes/dense.py).

Truths used: onnxruntime on the original model (exactness), a brute-force PCA of the layer's
responses computed here with NumPy (the rank-r linear optimum), and the original model's outputs
(nonlinear vs linear error)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import model_from, run
from onnx_lowrank import compress
from onnx_lowrank.graph.dense import DenseLayer, find_dense_layers
from onnx_lowrank.graph.loading import infer_value_types, with_input_shapes
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.graph.rewrite import rewrite_convs
from onnx_lowrank.schemes.dense import DenseScheme
from onnx_lowrank.solver.reconstruction import Factorisation

N = helper.make_node


def _gelu_nodes(x: str, out: str, p: str) -> list:
    """GELU written out as PyTorch exports it: x * 0.5 * (1 + Erf(x / sqrt 2))."""
    return [N("Div", [x, "sq2"], [p + "d"]), N("Erf", [p + "d"], [p + "e"]), N("Add", [p + "e", "one"], [p + "e1"]),
            N("Mul", [x, p + "e1"], [p + "m"]), N("Mul", [p + "m", "half"], [out])]


def _consts() -> dict:
    return {"sq2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
            "half": np.array(0.5, np.float32)}


def mlp3d(k=12, h=16, d=6, seed=0, rank=None, dead=0) -> onnx.ModelProto:
    """(N, 5, k) -> MatMul k->h -> Add(bias) -> Erf-GELU -> MatMul h->d (no bias) -> (N, 5, d).

    ``rank``: the first weight has this rank (a rank-r layer is reproduced exactly). ``dead``: that many
    channels get 4x the weights and a bias of -16: the largest variance, almost all of it cut by GELU."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, h)) / np.sqrt(k)).astype(np.float32)
    if rank:
        w1 = (rng.standard_normal((k, rank)) @ rng.standard_normal((rank, h)) / np.sqrt(k * rank)).astype(np.float32)
    b1 = (0.3 * rng.standard_normal(h)).astype(np.float32)
    w1[:, :dead] *= 4
    b1[:dead] = -16
    inits = {"w1": w1, "b1": b1,
             "w2": (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32), **_consts()}
    nodes = [N("MatMul", ["input", "w1"], ["mm1"], name="fc1"), N("Add", ["mm1", "b1"], ["y1"], name="fc1_bias"),
             *_gelu_nodes("y1", "g1", "ge"), N("MatMul", ["g1", "w2"], ["output"], name="fc2")]
    return model_from(nodes, inits, ["N", 5, k], "output", ["N", 5, d])


def gemm2d(seed=1) -> onnx.ModelProto:
    """(N, 10) -> Gemm(transB=1, alpha 0.5, beta 2, C (7,)) -> Relu -> Gemm(C (1, 5)) -> (N, 5)."""
    rng = np.random.default_rng(seed)
    inits = {"B1": rng.standard_normal((7, 10)).astype(np.float32), "C1": rng.standard_normal(7).astype(np.float32),
             "B2": rng.standard_normal((7, 5)).astype(np.float32), "C2": rng.standard_normal((1, 5)).astype(np.float32)}
    nodes = [N("Gemm", ["input", "B1", "C1"], ["y1"], name="g1", transB=1, alpha=0.5, beta=2.0),
             N("Relu", ["y1"], ["r1"], name="relu"), N("Gemm", ["r1", "B2", "C2"], ["output"], name="g2")]
    return model_from(nodes, inits, ["N", 10], "output", ["N", 5])


def _layers(model, shape):
    norm = normalise(model)
    return norm, find_dense_layers(norm, infer_value_types(with_input_shapes(norm, {"input": shape})))


def _identity_rewrite(norm, layers, seed=0):
    """Every layer written as two stages with Q = P = a random orthogonal matrix (P Q^T = I)."""
    rng = np.random.default_rng(seed)
    stages = {}
    for lay in layers:
        q, _ = np.linalg.qr(rng.standard_normal((lay.out_channels, lay.out_channels)))
        stages[lay.name] = DenseScheme().stages(lay, lay.out_channels, Factorisation(q, q, np.zeros(lay.out_channels)))
    return rewrite_convs(norm, stages)


@pytest.mark.parametrize("build,shape", [(mlp3d, [3, 5, 12]), (gemm2d, [4, 10])])
def test_full_rank_rewrite_is_exact(build, shape):
    model = build()
    norm, layers = _layers(model, [1] + shape[1:])
    assert [lay.name for lay in layers] == (["fc1", "fc2"] if build is mlp3d else ["g1", "g2"])
    new = _identity_rewrite(norm, layers)
    onnx.checker.check_model(new, full_check=True)
    ops = [n.op_type for n in new.graph.node]
    assert "Gemm" not in ops if build is mlp3d else ops.count("Gemm") == 4
    x = {"input": np.random.default_rng(5).standard_normal(shape).astype(np.float32)}
    np.testing.assert_allclose(run(new, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-4)


def test_layers_found_with_bias_and_activation():
    _, (fc1, fc2) = _layers(mlp3d(), [1, 5, 12])
    assert isinstance(fc1, DenseLayer) and fc1.add == fc1.output == "y1" and fc1.bias is not None
    # The Erf-GELU written out after the bias Add is the activation; its last node's output is the target.
    assert (fc1.activation, fc1.target, fc1.positions, fc1.in_channels, fc1.out_channels) == ("gelu", "g1", 5, 12, 16)
    assert fc1.activation_params == {"approximate": "none"}
    assert fc2.add is None and fc2.bias is None and fc2.activation == "identity"
    _, (g1, g2) = _layers(gemm2d(), [1, 10])
    m = numpy_helper.to_array
    inits = {t.name: m(t) for t in gemm2d().graph.initializer}
    np.testing.assert_allclose(g1.weight[:, :, 0, 0], 0.5 * inits["B1"], rtol=1e-6)
    np.testing.assert_allclose(g1.bias, 2.0 * inits["C1"], rtol=1e-6)
    assert g1.activation == "relu" and g1.positions == 1 and g2.bias.shape == (5,)


def test_attention_style_matmul_is_not_a_layer():
    """A MatMul of two computed tensors (scores = Q K^T) has no constant weight."""
    nodes = [N("Transpose", ["input"], ["t"], perm=[0, 2, 1]), N("MatMul", ["input", "t"], ["output"])]
    _, layers = _layers(model_from(nodes, {}, ["N", 4, 3], "output", ["N", 4, 4]), [1, 4, 3])
    assert layers == []


def _data(n, shape, seed=3):
    return {"input": np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)}


def test_lowrank_weight_reproduced_exactly():
    """fc1's weight has rank 3: rank 3 reproduces the model (end to end, against onnxruntime)."""
    model = mlp3d(rank=3)
    data = _data(40, [5, 12])
    res = compress(model, data, speedup=None, ranks={"fc1": 3}, objective="flops", rank_multiple=1)
    (fc1,) = [lay for lay in res.report["layers"] if lay["status"] == "factorised"]
    assert fc1["name"] == "fc1" and fc1["rank"] == 3 and fc1["flops_after"] < fc1["flops_before"]
    x = _data(7, [5, 12], seed=9)
    np.testing.assert_allclose(run(res.model, x)[0], run(model, x)[0], rtol=1e-3, atol=1e-4)


def test_linear_rank_r_is_the_pca_optimum():
    """Symmetric linear rank 2: the layer's output is the projection of its responses on their top-2
    principal directions around their mean, fitted on the fitted (not held-back) images."""
    rng = np.random.default_rng(4)
    w, b = rng.standard_normal((12, 10)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    model = model_from([N("MatMul", ["input", "w"], ["mm"], name="fc"), N("Add", ["mm", "b"], ["output"])],
                       {"w": w, "b": b}, ["N", 5, 12], "output", ["N", 5, 10])
    data = _data(30, [5, 12])
    res = compress(model, data, speedup=None, ranks={"fc": 2}, objective="flops", rank_multiple=1, method="linear",
                   asymmetric=False, samples_per_image=5)
    y = data["input"].astype(np.float64) @ w + b  # (30, 5, 10)
    fit = y[np.arange(30) % 5 != 4].reshape(-1, 10)
    mean = fit.mean(0)
    v = np.linalg.eigh(np.cov((fit - mean).T))[1][:, -2:]
    want = mean + (y - mean) @ v @ v.T
    np.testing.assert_allclose(run(res.model, data)[0], want, rtol=1e-3, atol=1e-3)


def test_nonlinear_beats_linear_after_gelu():
    """Errors measured on the original model's GELU output for held-out inputs, not by the solver."""
    model = mlp3d(k=16, h=24, seed=6, dead=12)
    data, x = _data(60, [5, 16]), _data(20, [5, 16], seed=11)
    norm, _ = _layers(model, [1, 5, 16])
    g = onnx.ModelProto()
    g.CopyFrom(model)
    g.graph.output.append(helper.make_tensor_value_info("g1", TensorProto.FLOAT, None))
    errs = {}
    for method in ("linear", "nonlinear"):
        res = compress(model, data, speedup=None, ranks={"fc1": 6}, objective="flops", rank_multiple=1,
                       method=method)
        m = onnx.ModelProto()
        m.CopyFrom(res.model)
        m.graph.output.append(helper.make_tensor_value_info("g1", TensorProto.FLOAT, None))
        ref, got = run(g, x)[1], run(m, x)[1]
        errs[method] = float(np.sum((got - ref) ** 2) / np.sum(ref ** 2))
    assert errs["nonlinear"] < 0.9 * errs["linear"], errs


def test_latency_objective_times_and_factorises_dense_layers(tmp_path):
    """MatMul / Gemm layers are timed like Convs (alone, whole and as the dense scheme's chain)."""
    res = compress(gemm2d(), _data(20, [10]), speedup=None, ranks={"g1": 2}, objective="latency", rank_multiple=1,
                   latency_cache=str(tmp_path), latency_seconds=0.05, threads=1)
    (g1,) = [lay for lay in res.report["layers"] if lay["name"] == "g1"]
    assert g1["status"] == "factorised" and g1["rank"] == 2
    assert g1["latency_before_ms"] > 0 and g1["latency_after_ms"] > 0
    assert res.report["latency_original_ms"] > 0


def test_cli_compress_mlp_deterministic(tmp_path):
    model, data = mlp3d(k=32, h=48, d=8, seed=2), _data(30, [5, 32])
    onnx.save(model, tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", **data)
    outs = []
    for name in ("a.onnx", "b.onnx"):
        cmd = [sys.executable, "-m", "onnx_lowrank", "compress", "mlp.onnx", "--calib", "calib.npz", "-o", name,
               "--objective", "flops", "--speedup", "1.5", "--rank-multiple", "4", "--report", name + ".json"]
        p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    api = compress(str(tmp_path / "mlp.onnx"), str(tmp_path / "calib.npz"), objective="flops", speedup=1.5,
                   rank_multiple=4)
    assert api.model.SerializeToString() == outs[0]
    report = json.loads((tmp_path / "a.onnx.json").read_text())
    done = [lay for lay in report["layers"] if lay["status"] == "factorised"]
    assert done and report["flops_before"] / report["flops_after"] >= 1.5 * 0.97
    new = onnx.load_from_string(outs[0])
    assert sum(n.op_type == "MatMul" for n in new.graph.node) == 2 + len(done)
    x = _data(4, [5, 32], seed=8)
    ref, got = run(model, x)[0], run(new, x)[0]
    assert np.sum((got - ref) ** 2) / np.sum(ref ** 2) < 0.5


def test_token_rows_are_sampled_on_the_last_axis():
    """Sampled rows of a (N, T, d) tensor are d-vectors at token positions (checked against onnxruntime's
    tensor and the positions sample_positions draws), for every image and layer id alike."""
    from onnx_lowrank.calibration.inputs import open_source
    from onnx_lowrank.calibration.sampling import SampledTensor, collect, sample_positions
    from onnx_lowrank.calibration.batching import input_specs

    model = mlp3d()
    norm = normalise(model)
    vt = infer_value_types(with_input_shapes(norm, {"input": [1, 5, 12]}))
    data = _data(6, [5, 12])
    got = collect(norm, vt, open_source(data, input_specs(norm)), [SampledTensor("y1", 3, channels_last=True)],
                  batch_size=4, seed=7, samples_per_image=2)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info("y1", TensorProto.FLOAT, None))
    y1 = run(m, data)[1]  # (6, 5, 16)
    want = np.concatenate([y1[i, sample_positions(7, 3, i, 5, 2)] for i in range(6)])
    np.testing.assert_allclose(got.rows["3:y1"], want, rtol=1e-6)
    assert list(got.image["3:y1"]) == [i for i in range(6) for _ in range(2)]


def test_report_of_a_model_without_convs_has_no_conv_line():
    from onnx_lowrank.report import format_report

    res = compress(mlp3d(), _data(20, [5, 12]), speedup=None, ranks={"fc1": 4}, objective="flops", rank_multiple=1)
    text = format_report(res.report)
    assert "factorised 1 of" in text and "convs only" not in text
