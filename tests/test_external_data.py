"""Models with external data / over the size limit (graph/external.py), on a tiny model: the size
limit is lowered with $ONNX_LOWRANK_LARGE_MODEL_BYTES so that it takes the same path as a model over
2 GB. The truth is the same compression of the same model stored inline."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from builders import conv_chain
from onnx_lowrank import runtime
from onnx_lowrank.graph import external
from onnx_lowrank.graph.loading import load_model
from onnx_lowrank.graph.normalise import normalise

SMALL = {"ONNX_LOWRANK_LARGE_MODEL_BYTES": "1000"}
COMMON = ["--speedup", "1.5", "--objective", "flops", "--samples-per-image", "8", "--no-measure", "--threads", "1"]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "onnx_lowrank", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ext")
    m = conv_chain([3, 24, 32, 32], size=12, lowrank_bias=6)
    inline = d / "inline.onnx"
    onnx.save(m, str(inline))
    ext_dir = d / "ext"
    ext_dir.mkdir()
    ext = ext_dir / "model.onnx"
    onnx.save_model(copy.deepcopy(m), str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
                    size_threshold=0)  # even the biases: small ones are read into the proto on load
    x = np.random.default_rng(0).random((24, 3, 12, 12), dtype=np.float32)
    np.savez(d / "calib.npz", input=x)
    return d, inline, ext, m


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _loaded(path):
    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}, [n.SerializeToString() for n in m.graph.node]


def test_external_model_compresses_like_the_inline_one_and_keeps_external_data(models, tmp_path):
    d, inline, ext, m = models
    before = {p: _sha(p) for p in (ext, ext.parent / "weights.bin")}
    a = tmp_path / "a.onnx"
    r = _cli("compress", inline, "--calib", d / "calib.npz", *COMMON, "-o", a)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "a.onnx.data").exists()
    b = tmp_path / "out" / "b.onnx"
    rep = tmp_path / "b.json"
    r = _cli("compress", ext, "--calib", d / "calib.npz", *COMMON, "-o", b, "--report", rep, env=SMALL)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "b.onnx.data").exists() and "weights in" in r.stdout and "external data" in r.stdout
    assert '"external_data": "b.onnx.data"' in rep.read_text()
    assert sorted(os.listdir(tmp_path / "out")) == ["b.onnx", "b.onnx.data"]  # nothing else left behind
    assert {p: _sha(p) for p in before} == before  # the input model and its data untouched
    # the written model refers to its data file, relatively, and holds the same graph and weights
    proto = onnx.load(str(b), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"b.onnx.data"}
    wa, na = _loaded(a)
    wb, nb = _loaded(b)
    assert na == nb and wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    x = np.random.default_rng(1).random((2, 3, 12, 12), dtype=np.float32)
    ya = ort.InferenceSession(str(a), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    yb = ort.InferenceSession(str(b), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.array_equal(ya, yb)


def test_layers_on_an_external_model_knows_the_shapes(models):
    _, _, ext, _ = models
    r = _cli("layers", ext, env=SMALL)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("conv")]
    assert len(rows) == 3 and all("12x12" in line for line in rows)


def test_loaded_external_model_stays_small_and_reads_the_same_weights(models, monkeypatch):
    _, _, ext, m = models
    monkeypatch.setenv("ONNX_LOWRANK_LARGE_MODEL_BYTES", "1000")
    loaded = load_model(ext)
    assert external.has_external_data(loaded) and loaded.ByteSize() < 4096
    truth = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for t in loaded.graph.initializer:
        assert np.array_equal(external.tensor_array(t), truth[t.name])
    # a session from the in-memory proto (written beside its data) computes what the original does
    x = np.random.default_rng(2).random((1, 3, 12, 12), dtype=np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = runtime.run(runtime.session(loaded, runtime.CALIBRATION), None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not [f for f in os.listdir(os.path.dirname(external.tensor_array(loaded.graph.initializer[0]).filename))
                if f.startswith(".session-")]


def test_large_inline_proto_goes_through_a_file_and_is_not_changed(models, monkeypatch):
    _, _, _, m = models
    monkeypatch.setenv("ONNX_LOWRANK_LARGE_MODEL_BYTES", "1000")
    blob = m.SerializeToString()
    x = np.random.default_rng(3).random((1, 3, 12, 12), dtype=np.float32)
    want = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = runtime.run(runtime.session(m, runtime.TIMING), None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert m.SerializeToString() == blob
    norm = normalise(m)  # normalised copies of large models keep their weights in data files
    assert external.has_external_data(norm) and m.SerializeToString() == blob


def test_save_with_external_data_round_trips(models, tmp_path):
    _, _, _, m = models
    blob = m.SerializeToString()
    path = tmp_path / "m.onnx"
    external.save_with_external_data(m, path)
    assert m.SerializeToString() == blob
    again = onnx.load(str(path))
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in again.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}


def test_latency_key_does_not_depend_on_where_the_weights_are_kept(models):
    from onnx_lowrank.costs.table import model_key

    _, _, ext, _ = models
    a, b = load_model(ext), load_model(ext)
    where = [{e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"} for m in (a, b)]
    assert where[0] != where[1]  # two links in two folders
    feed = {"input": np.zeros((1, 3, 12, 12), np.float32)}
    assert model_key(a, feed) == model_key(b, feed)
    b.graph.initializer[0].name = "renamed"
    assert model_key(a, feed) != model_key(b, feed)
