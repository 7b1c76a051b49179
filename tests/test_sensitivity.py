"""Sensitivity allocation: the probe model, measured damage against rewritten models, the pipeline option."""

import numpy as np
import pytest

from builders import conv_chain, run
from onnx_lowrank import CompressConfig, Compressor
from onnx_lowrank.calibration.damage import measure_damage
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.graph.layers import find_conv_layers
from onnx_lowrank.graph.loading import infer_value_types
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.graph.probe import PROBE_B, PROBE_W, probe_model
from onnx_lowrank.graph.rewrite import rewrite_convs
from onnx_lowrank.schemes import SCHEMES
from onnx_lowrank.solver.reconstruction import linear_reconstruction


@pytest.fixture(scope="module")
def chain():
    model = normalise(conv_chain([3, 16, 24, 16], size=12, seed=3, lowrank_bias=6))
    layers = find_conv_layers(model, infer_value_types(model))
    x = np.random.default_rng(0).standard_normal((20, 3, 12, 12)).astype(np.float32)
    return model, layers, x


def _responses(model, name, x):
    """Rows (positions x channels) of one Conv output, from onnxruntime (independent of the sampler)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend([onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)])
    y = run(m, {"input": x})[1]
    return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]).astype(np.float64)


def test_identity_probe_gives_the_original_outputs(chain):
    model, layers, x = chain
    lay = layers[1]
    d = lay.out_channels
    out = run(probe_model(model, lay), {"input": x, PROBE_W: np.eye(d, dtype=np.float32)[:, :, None, None],
                                        PROBE_B: np.zeros(d, np.float32)})[0]
    np.testing.assert_allclose(out, run(model, {"input": x})[0], rtol=1e-4, atol=1e-5)


def test_probe_equals_the_rewritten_model(chain):
    model, layers, x = chain
    lay = layers[1]
    f = linear_reconstruction(_responses(model, lay.output, x), 4)
    stages = SCHEMES["channel"].stages(lay, 4, f)
    expected = run(rewrite_convs(model, {lay.name: stages}), {"input": x})[0]
    probed = run(probe_model(model, lay), {"input": x, PROBE_W: f.M[:, :, None, None].astype(np.float32),
                                           PROBE_B: f.b.astype(np.float32)})[0]
    np.testing.assert_allclose(probed, expected, rtol=1e-3, atol=1e-4)


def test_damage_is_the_nmse_of_the_rewritten_model(chain):
    model, layers, x = chain
    lay = layers[1]
    y = _responses(model, lay.output, x)
    fits = {r: linear_reconstruction(y, r) for r in (2, 6, lay.out_channels)}
    feeds = [{"input": x[:10]}, {"input": x[10:]}]
    tables, metric = measure_damage(model, [(lay, fits)], feeds, metric="nmse")
    assert metric == "nmse"
    ref = run(model, {"input": x})[0].astype(np.float64)
    for r, f in fits.items():
        out = run(rewrite_convs(model, {lay.name: SCHEMES["channel"].stages(lay, r, f)}), {"input": x})[0]
        nmse = float(np.sum((out - ref) ** 2) / np.sum(ref ** 2))
        assert tables[lay.name][r] == pytest.approx(nmse, rel=1e-2, abs=1e-9)
    assert tables[lay.name][lay.out_channels] < 1e-8  # full rank PCA is the identity map


def test_damage_in_context_is_relative_to_keeping_the_layer(chain):
    model, layers, x = chain
    a, b = layers[1], layers[2]
    fa = linear_reconstruction(_responses(model, a.output, x), 3)
    fb = linear_reconstruction(_responses(model, b.output, x), 3)
    tables, _ = measure_damage(model, [(a, {3: fa}), (b, {3: fb})], [{"input": x}], metric="nmse",
                               context={a.name: fa, b.name: fb})
    ref = run(model, {"input": x})[0].astype(np.float64)

    def nmse(stages):
        out = run(rewrite_convs(model, stages), {"input": x})[0]
        return float(np.sum((out - ref) ** 2) / np.sum(ref ** 2))

    both = nmse({a.name: SCHEMES["channel"].stages(a, 3, fa), b.name: SCHEMES["channel"].stages(b, 3, fb)})
    only_b = nmse({b.name: SCHEMES["channel"].stages(b, 3, fb)})
    assert tables[a.name][3] == pytest.approx(both - only_b, rel=1e-2, abs=1e-9)


DEMO = "models/mnist_vgg/"


@pytest.fixture(scope="module")
def demo():
    return Compressor(DEMO + "mnist_vgg.onnx", DEMO + "calib.npz",
                      CompressConfig(objective="flops", max_images=100, samples_per_image=10))


def test_sensitivity_meets_the_flop_budget_and_reports_damage(demo, capsys):
    res = demo.run(speedup=3.0, allocation="sensitivity", method="linear")
    rep = res.report
    assert rep["flops_before"] / rep["flops_after"] >= 3.0
    assert rep["allocation"] == "sensitivity"
    factorised = [lay for lay in rep["layers"] if lay["rank"] is not None]
    assert factorised and all(lay["damage"] is not None for lay in factorised)
    assert "sensitivity" in capsys.readouterr().err


def test_unknown_allocation_is_a_user_error(demo):
    with pytest.raises(LowRankError, match="--allocation"):
        demo.run(allocation="accuracy")


def test_damage_plot_is_written(demo, tmp_path):
    from onnx_lowrank.damage_plot import damage_plot

    res = demo.run(speedup=3.0, allocation="sensitivity", method="linear")
    assert any(lay["saving_by_rank"] for lay in res.report["layers"])
    path = tmp_path / "damage.png"
    damage_plot(res.report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
