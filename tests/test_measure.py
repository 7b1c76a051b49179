"""Tests for onnx_lowrank.measure against tiny hand-built ONNX models whose outputs we know."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.errors import LowRankError
from onnx_lowrank.fidelity import evaluate
from onnx_lowrank.measure import bench, synthetic_feeds
from onnx_lowrank.report import format_bench, format_eval


def _save(tmp_path, name, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return str(path)


def _classifier(tmp_path, name, weight):
    """y = x @ W: a linear classifier with a symbolic batch."""
    d, k = weight.shape
    return _save(
        tmp_path,
        name,
        [helper.make_node("MatMul", ["x", "W"], ["logits"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )


def _matmul_chain(tmp_path, name, depth, width=256):
    rng = np.random.default_rng(1)
    nodes, inits = [], []
    prev = "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / math.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out]))
        prev = out
    return _save(
        tmp_path,
        name,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        inits,
    )


def _conv(tmp_path):
    w = np.random.default_rng(2).standard_normal((8, 3, 3, 3)).astype(np.float32)
    return _save(
        tmp_path,
        "conv",
        [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [numpy_helper.from_array(w, "W")],
    )


def _identity_and_shifted(tmp_path, k):
    """Reference passes x through; candidate returns x + b, with b an extra input only it has."""
    ref = _save(
        tmp_path,
        "identity",
        [helper.make_node("Identity", ["x"], ["out"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", k])],
    )
    cand = _save(
        tmp_path,
        "shifted",
        [helper.make_node("Add", ["x", "b"], ["out"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", k]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", k])],
    )
    return ref, cand


@pytest.fixture
def weights():
    return np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)


def _batches(n_batches=4, batch=16, d=8, seed=3):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, d)).astype(np.float32)} for _ in range(n_batches)]


# --- synthetic_feeds -------------------------------------------------------------------------------


def test_synthetic_feeds_dtypes_and_symbolic_batch(tmp_path):
    path = _save(
        tmp_path,
        "multi",
        [
            helper.make_node("Identity", ["img"], ["o1"]),
            helper.make_node("Identity", ["ids"], ["o2"]),
            helper.make_node("Identity", ["mask"], ["o3"]),
            helper.make_node("Identity", ["scale"], ["o4"]),
        ],
        [
            helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 3, 4, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 5]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [2]),
            helper.make_tensor_value_info("scale", TensorProto.DOUBLE, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("o1", TensorProto.FLOAT, ["batch", 3, 4, 4]),
            helper.make_tensor_value_info("o2", TensorProto.INT64, [None, 5]),
            helper.make_tensor_value_info("o3", TensorProto.BOOL, [2]),
            helper.make_tensor_value_info("o4", TensorProto.DOUBLE, ["batch"]),
        ],
    )
    feeds = synthetic_feeds(path, batch=3, seed=7)
    assert set(feeds) == {"img", "ids", "mask", "scale"}
    assert feeds["img"].shape == (3, 3, 4, 4) and feeds["img"].dtype == np.float32
    assert feeds["ids"].shape == (3, 5) and feeds["ids"].dtype == np.int64
    assert feeds["mask"].shape == (2,) and feeds["mask"].dtype == np.bool_
    assert feeds["scale"].shape == (3,) and feeds["scale"].dtype == np.float64
    assert feeds["img"].min() >= 0.0 and feeds["img"].max() < 1.0
    # Same seed, same data: benchmarks are reproducible.
    again = synthetic_feeds(path, batch=3, seed=7)
    np.testing.assert_array_equal(feeds["img"], again["img"])


def test_synthetic_feeds_needs_override_for_inner_symbolic_dim(tmp_path):
    path = _save(
        tmp_path,
        "seq",
        [helper.make_node("Identity", ["tokens"], ["out"])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "T"])],
    )
    with pytest.raises(LowRankError, match="shape_overrides"):
        synthetic_feeds(path)
    feeds = synthetic_feeds(path, shape_overrides={"tokens": [2, 7]})
    assert feeds["tokens"].shape == (2, 7)
    with pytest.raises(LowRankError, match="unknown input"):
        synthetic_feeds(path, shape_overrides={"nope": [2, 7]})
    with pytest.raises(LowRankError, match="dims"):
        synthetic_feeds(path, shape_overrides={"tokens": [2, 7, 1]})


def test_synthetic_feeds_missing_model(tmp_path):
    with pytest.raises(LowRankError, match="not found"):
        synthetic_feeds(str(tmp_path / "missing.onnx"))


# --- evaluate --------------------------------------------------------------------------------------


def test_evaluate_model_against_itself_is_perfect(tmp_path, weights):
    path = _classifier(tmp_path, "clf", weights)
    batches = _batches()
    labels = np.concatenate([np.argmax(b["x"] @ weights, axis=1) for b in batches])
    result = evaluate(path, path, batches, labels=labels)
    assert result["samples"] == 64
    assert result["output"] == "logits"
    assert result["nmse"] == 0.0
    assert result["max_abs_diff"] == 0.0
    assert result["top1_agreement"] == 1.0
    assert result["top5_overlap"] == 1.0
    assert result["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert result["accuracy_reference"] == pytest.approx(1.0)
    assert result["accuracy_candidate"] == pytest.approx(1.0)
    assert result["accuracy_drop_points"] == pytest.approx(0.0)


def test_evaluate_perturbed_weights(tmp_path, weights):
    ref = _classifier(tmp_path, "clf", weights)
    noise = 0.05 * np.random.default_rng(5).standard_normal(weights.shape).astype(np.float32)
    cand = _classifier(tmp_path, "clf_noisy", weights + noise)
    batches = _batches()
    result = evaluate(ref, cand, iter(batches))  # any iterable, e.g. a generator over a dataset
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    r, c = x @ weights.astype(np.float64), x @ (weights + noise).astype(np.float64)
    assert result["nmse"] == pytest.approx(np.sum((c - r) ** 2) / np.sum(r**2), rel=1e-4)
    assert result["max_abs_diff"] == pytest.approx(np.max(np.abs(c - r)), rel=1e-4)
    assert 0.5 < result["top1_agreement"] <= 1.0
    assert result["kl_divergence"] > 0.0
    assert "accuracy_reference" not in result


def test_evaluate_hand_computed_logits(tmp_path):
    ref, cand = _identity_and_shifted(tmp_path, 6)
    # Sample 0: candidate == reference. Sample 1: candidate raises class 0 by 6, so its argmax moves
    # from 5 to 0 and its top-5 set becomes {0,2,3,4,5} against {1,2,3,4,5}: 4 of 5 shared.
    r0, b0 = [5, 4, 3, 2, 1, 0], [0, 0, 0, 0, 0, 0]
    r1, b1 = [1, 2, 3, 4, 5, 6], [6, 0, 0, 0, 0, 0]
    feeds = [
        {"x": np.array([r0], np.float32), "b": np.array([b0], np.float32)},
        {"x": np.array([r1], np.float32), "b": np.array([b1], np.float32)},
    ]
    labels = np.array([0, 5])
    result = evaluate(ref, cand, feeds, labels=labels, output="out")

    # KL(p || q) for sample 1 with q = softmax(r1 + b1):
    # sum p_i (log p_i - log q_i) = sum p_i (r_i - c_i) - LSE(r1) + LSE(c1) = -6 p_0 - LSE(r1) + LSE(c1).
    lse_r = math.log(sum(math.exp(v) for v in r1))
    lse_c = math.log(math.exp(7) + sum(math.exp(v) for v in r1[1:]))
    p0 = math.exp(1) / sum(math.exp(v) for v in r1)
    kl1 = -6 * p0 - lse_r + lse_c

    assert result["samples"] == 2
    assert result["top1_agreement"] == pytest.approx(0.5)
    assert result["top5_overlap"] == pytest.approx((1.0 + 0.8) / 2)
    assert result["kl_divergence"] == pytest.approx(kl1 / 2, rel=1e-5)
    assert result["nmse"] == pytest.approx(36 / (55 + 91))
    assert result["max_abs_diff"] == pytest.approx(6.0)
    assert result["accuracy_reference"] == pytest.approx(1.0)  # argmax 0 and 5
    assert result["accuracy_candidate"] == pytest.approx(0.5)  # argmax 0 and 0
    assert result["accuracy_drop_points"] == pytest.approx(50.0)


def test_evaluate_uses_probabilities_directly(tmp_path):
    ref, cand = _identity_and_shifted(tmp_path, 3)
    p = np.array([[0.7, 0.2, 0.1]], np.float32)
    q = np.array([[0.5, 0.3, 0.2]], np.float32)
    result = evaluate(ref, cand, [{"x": p, "b": q - p}])
    expected = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    assert result["kl_divergence"] == pytest.approx(expected, rel=1e-4)
    # Small K: top-k uses k = K, so identical class sets give full overlap.
    assert result["top5_overlap"] == pytest.approx(1.0)


def test_evaluate_non_classifier_output_has_no_classifier_metrics(tmp_path):
    path = _conv(tmp_path)
    feeds = [synthetic_feeds(path, batch=2)]
    result = evaluate(path, path, feeds)
    assert result["samples"] == 2 and result["nmse"] == 0.0
    assert "top1_agreement" not in result and "kl_divergence" not in result
    with pytest.raises(LowRankError, match="classifier"):
        evaluate(path, path, feeds, labels=np.array([0, 1]))


def test_evaluate_label_count_mismatch(tmp_path, weights):
    path = _classifier(tmp_path, "clf", weights)
    with pytest.raises(LowRankError, match="labels"):
        evaluate(path, path, _batches(n_batches=2, batch=4), labels=np.zeros(7, dtype=np.int64))
    with pytest.raises(LowRankError, match="labels"):
        evaluate(path, path, _batches(n_batches=2, batch=4), labels=np.zeros(9, dtype=np.int64))


def test_evaluate_output_shape_mismatch(tmp_path, weights):
    ref = _classifier(tmp_path, "clf", weights)
    cand = _classifier(tmp_path, "clf9", weights[:, :9])
    with pytest.raises(LowRankError, match="shape"):
        evaluate(ref, cand, _batches(n_batches=1))


def test_evaluate_unknown_output_and_no_batches(tmp_path, weights):
    path = _classifier(tmp_path, "clf", weights)
    with pytest.raises(LowRankError, match="no output named"):
        evaluate(path, path, _batches(n_batches=1), output="probs")
    with pytest.raises(LowRankError, match="no input batches"):
        evaluate(path, path, [])


def test_format_eval(tmp_path, weights):
    path = _classifier(tmp_path, "clf", weights)
    batches = _batches(n_batches=1)
    labels = np.argmax(batches[0]["x"] @ weights, axis=1)
    text = format_eval(evaluate(path, path, batches, labels=labels))
    assert "top-1 agreement" in text and "accuracy drop" in text and "100.00 %" in text
    lines = text.splitlines()
    # Values start in one column: every key is padded to the longest key plus two spaces.
    column = len("accuracy (reference)") + 2
    assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines)


# --- bench -----------------------------------------------------------------------------------------


def test_bench_times_and_profile(tmp_path):
    path = _conv(tmp_path)
    feeds = synthetic_feeds(path, batch=2)
    result = bench([path, path], feeds, threads=1, runs=5, warmup=1, profile=True)
    assert result["threads"] == 1 and result["batch"] == 2
    assert result["speedup"][0] == 1.0 and len(result["speedup"]) == 2
    for m in result["models"]:
        assert m["path"] == path and m["runs"] == 5
        assert 0 < m["min_ms"] <= m["median_ms"] <= m["max_ms"]
        assert m["min_ms"] <= m["mean_ms"] <= m["max_ms"]
        ops = {p["op_type"]: p for p in m["profile"]}
        assert "Conv" in ops
        assert ops["Conv"]["count"] == 1 and ops["Conv"]["total_ms"] > 0
        assert sum(p["percent"] for p in m["profile"]) == pytest.approx(100.0)
    text = format_bench(result)
    assert "speedup" in text and "1.00x" in text and "Conv" in text


def test_bench_more_work_is_slower(tmp_path):
    one = _matmul_chain(tmp_path, "one", 1)
    twenty = _matmul_chain(tmp_path, "twenty", 20)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.random((64, 256), dtype=np.float32)} for _ in range(3)]  # real-data style list, cycled
    result = bench([one, twenty], feeds, threads=1, runs=15, warmup=2, profile=True)
    fast, slow = result["models"]
    assert slow["median_ms"] > fast["median_ms"]
    assert result["speedup"][0] == 1.0 and result["speedup"][1] < 1.0
    # the speed-up is the median of per-round ratios, with their quartiles
    ratios = sorted(f / s for f, s in zip(fast["times_ms"], slow["times_ms"]))
    assert len(ratios) == result["rounds"] == 15 and result["stable"] is None
    assert result["speedup"][1] == pytest.approx(ratios[7])
    assert result["speedup_spread"][1]["iqr"][0] <= ratios[7] <= result["speedup_spread"][1]["iqr"][1]
    assert result["batch"] == 64
    assert slow["profile"][0]["op_type"] == "MatMul" and slow["profile"][0]["count"] == 20


def test_bench_user_errors(tmp_path):
    path = _conv(tmp_path)
    with pytest.raises(LowRankError, match="not found"):
        bench([str(tmp_path / "missing.onnx")], {})
    with pytest.raises(LowRankError, match="needs input"):
        bench([path], {"other": np.zeros((1, 3, 16, 16), np.float32)}, runs=1, warmup=0)
    with pytest.raises(LowRankError, match="check the input shapes"):
        bench([path], {"x": np.zeros((1, 3, 16), np.float32)}, runs=1, warmup=0)
    with pytest.raises(LowRankError, match="no input batches"):
        bench([path], [])
    with pytest.raises(LowRankError, match="no models"):
        bench([], {})


def test_timed_sessions_do_not_spin_between_runs(monkeypatch):
    """Interleaved timing needs intra-op pools that sleep between runs (runtime.TIMING): bench and the
    latency objective must both time with that profile; calibration keeps its own."""
    from pathlib import Path

    from onnx_lowrank import latency, runtime
    from onnx_lowrank.runtime import sessions

    model = str(Path(__file__).resolve().parent.parent / "models" / "mnist_vgg" / "mnist_vgg.onnx")
    sess = runtime.session(model, runtime.TIMING, threads=2)
    opts = sess.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    calib = runtime.session(model, runtime.CALIBRATION).get_session_options()
    assert calib.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    used = []
    real = sessions.session
    monkeypatch.setattr(sessions, "session", lambda m, profile, *a, **k: used.append(profile) or real(m, profile, *a, **k))
    feeds = synthetic_feeds(model)
    bench([model], feeds, threads=2, runs=2, warmup=0)
    latency.measure_model(onnx.load(model), feeds, 2, seconds=0.01)
    latency.compare_models(onnx.load(model), onnx.load(model), feeds, 2, seconds=0.01)
    assert used and all(p is runtime.TIMING for p in used)


def test_bench_adaptive_rounds_and_table(tmp_path):
    path = _conv(tmp_path)
    feeds = synthetic_feeds(path)
    result = bench([path, path], feeds, threads=1, warmup=1, min_runs=10, max_seconds=0.5)
    assert result["rounds"] >= 10 and isinstance(result["stable"], bool)
    lo, hi = result["speedup_spread"][1]["ci95"]
    assert lo <= result["speedup"][1] <= hi
    text = format_bench(result)
    assert "IQR" in text and f"{result['rounds']} interleaved rounds" in text
