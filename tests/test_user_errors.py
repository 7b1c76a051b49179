"""More bad inputs: each is one clear error (LowRankError / `error:` line), never a traceback or a wrong model."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from builders import conv_chain, run

import onnx_lowrank
from onnx_lowrank.cli import main
from onnx_lowrank.errors import LowRankError


def _model_and_data(tmp_path):
    m = conv_chain([3, 16, 16], size=8, seed=1, lowrank_bias=6)
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    x = np.random.default_rng(0).standard_normal((12, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", input=x)
    return m, path, x


def _cli_error(args, tmp_path, monkeypatch, words):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_report_path_that_would_overwrite_the_model(tmp_path, monkeypatch):
    _model_and_data(tmp_path)
    _cli_error(["compress", "m.onnx", "--calib", "c.npz", "--report", "m.onnx"], tmp_path, monkeypatch, "--report")


def test_nan_in_calibration_data(tmp_path, monkeypatch):
    _, _, x = _model_and_data(tmp_path)
    x[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "c.npz", input=x)
    _cli_error(["compress", "m.onnx", "--calib", "c.npz"], tmp_path, monkeypatch, "NaN")


def test_empty_calibration_data(tmp_path, monkeypatch):
    _model_and_data(tmp_path)
    np.savez(tmp_path / "c.npz", input=np.zeros((0, 3, 8, 8), np.float32))
    _cli_error(["compress", "m.onnx", "--calib", "c.npz"], tmp_path, monkeypatch, "no samples")


def test_mean_with_wrong_channel_count(tmp_path, monkeypatch):
    from PIL import Image

    _model_and_data(tmp_path)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    _cli_error(["compress", "m.onnx", "--calib", "imgs", "--mean", "0.4,0.5"], tmp_path, monkeypatch, "--mean")


def test_non_integer_rank_in_json(tmp_path, monkeypatch):
    _model_and_data(tmp_path)
    (tmp_path / "r.json").write_text('{"conv1": 3.7}')
    _cli_error(["compress", "m.onnx", "--calib", "c.npz", "--ranks", "r.json"], tmp_path, monkeypatch, "integer")


def test_spatial_size_the_model_rejects(tmp_path, monkeypatch):
    """A fixed-size model fed other-sized data: onnxruntime's complaint becomes one line."""
    import onnx

    m, _, _ = _model_and_data(tmp_path)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = 8, 8
    onnx.save(m, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", input=np.ones((4, 3, 8, 9), np.float32))
    _cli_error(["compress", "m.onnx", "--calib", "c.npz"], tmp_path, monkeypatch, "expects")


def test_api_refuses_to_overwrite_its_input(tmp_path):
    _, path, x = _model_and_data(tmp_path)
    data = path.read_bytes()
    with pytest.raises(LowRankError, match="input model"):
        onnx_lowrank.compress(str(path), {"input": x}, output=str(path))
    assert path.read_bytes() == data


def test_duplicate_node_names_each_get_their_own_factors(tmp_path):
    """Two Convs with the same node name (onnxruntime itself refuses such a model): the tool renames
    the second, and each Conv is rewritten with its own weights."""
    reference, _, x = _model_and_data(tmp_path)
    m = type(reference)()
    m.CopyFrom(reference)
    for node in m.graph.node:
        if node.op_type == "Conv":
            node.name = "conv"
    res = onnx_lowrank.compress(m, {"input": x}, speedup=None, method="linear",
                                ranks={"conv": 16, "conv_1": 16})
    names = [lay["name"] for lay in res.report["layers"]]
    assert names == ["conv", "conv_1"]
    # rank 16 of 16 filters is above break-even: both stay, and the model is unchanged numerically
    want = run(reference, {"input": x})[0]
    np.testing.assert_allclose(run(res.model, {"input": x})[0], want, rtol=1e-5, atol=1e-6)
    res = onnx_lowrank.compress(m, {"input": x}, speedup=None, method="linear", ranks={"conv_1": 4})
    assert [lay["rank"] for lay in res.report["layers"]] == [None, 4]
    err = run(res.model, {"input": x})[0] - want
    assert np.sum(err ** 2) < 0.5 * np.sum(want ** 2)
