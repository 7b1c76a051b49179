"""Static INT8 (onnxruntime quantize_static, QDQ, per-channel weights) of the factorised demo model.

The independent truth is the held-out labels: INT8 of the factorised model must stay within 0.3
points of its fp32 accuracy. A deliberately skewed factorisation (intermediate channels rescaled by
1e-3 .. 1e3, the same function in fp32) shows the check can fail: without balancing it breaks, and
balancing recovers it (that case uses the linear solver: the skew, not the solver, is under test,
and it is three times faster).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_lowrank.solve as solve
from onnx_lowrank.compressor import Compressor
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.solver.balance import Balanced, balance
from onnx_lowrank.solver.reconstruction import Factorisation

ort_quant = pytest.importorskip("onnxruntime.quantization")

DEMO = Path(__file__).resolve().parent.parent / "models" / "mnist_vgg"
MODEL = DEMO / "mnist_vgg.onnx"
CALIB = DEMO / "calib.npz"
HELDOUT = DEMO / "heldout.npz"
QUANT_IMAGES = 100      # calibration images for quantize_static's min/max (of the 500)


def _skew(f: Factorisation) -> Factorisation:
    rng = np.random.default_rng(f.rank)
    d = 10.0 ** rng.uniform(-3, 3, f.rank)
    return Factorisation(f.P * d, f.Q / d, f.b)


class _Reader(ort_quant.CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self._it = iter([{"input": x[i:i + 25]} for i in range(0, len(x), 25)])

    def get_next(self):
        return next(self._it, None)


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i:i + 500]})[0] for i in range(0, len(x), 500)])


def _int8(model: onnx.ModelProto, tmp: Path, name: str, calib: np.ndarray) -> tuple[Path, Path]:
    fp32, int8 = tmp / f"{name}.onnx", tmp / f"{name}.int8.onnx"
    onnx.save(model, fp32)
    logging.disable(logging.WARNING)    # quantize_static's advice to run its pre-processing
    try:
        ort_quant.quantize_static(str(fp32), str(int8), _Reader(calib), quant_format=ort_quant.QuantFormat.QDQ,
                                  per_channel=True, activation_type=ort_quant.QuantType.QInt8,
                                  weight_type=ort_quant.QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return fp32, int8


@pytest.fixture(scope="module")
def data():
    with np.load(CALIB) as c, np.load(HELDOUT) as h:
        return c["input"][:QUANT_IMAGES], h["input"], h["label"]


@pytest.fixture(scope="module")
def compressor():
    return Compressor(str(MODEL), str(CALIB), CompressConfig(objective="flops", rank_multiple=1))


def _accuracies(model, tmp, name, data):
    calib, x, y = data
    fp32, int8 = _int8(model, tmp, name, calib)
    a, b = _logits(fp32, x), _logits(int8, x)
    return 100 * float((a.argmax(1) == y).mean()), 100 * float((b.argmax(1) == y).mean()), a


def test_int8_of_the_balanced_4x_model_within_0_3_points(compressor, data, tmp_path):
    result = compressor.run(speedup=4.0)
    assert result.report["balance"] is True
    assert result.report["speedup_theoretical"] >= 4.0
    fp32, int8, _ = _accuracies(result.model, tmp_path, "balanced", data)
    assert fp32 > 97.0
    assert abs(int8 - fp32) <= 0.3, (fp32, int8)


def test_skewed_factorisation_breaks_int8_unless_balanced(compressor, data, tmp_path, monkeypatch):
    monkeypatch.setattr(solve, "balance", lambda f, yh: Balanced(_skew(f), np.zeros(f.rank)))
    skewed = compressor.run(speedup=4.0, method="linear").model
    monkeypatch.setattr(solve, "balance", lambda f, yh: balance(_skew(f), yh))
    rebalanced = compressor.run(speedup=4.0, method="linear").model
    monkeypatch.undo()
    plain = compressor.run(speedup=4.0, method="linear").model

    fp_plain, _, logits_plain = _accuracies(plain, tmp_path, "plain", data)
    fp_skew, int8_skew, logits_skew = _accuracies(skewed, tmp_path, "skewed", data)
    fp_bal, int8_bal, _ = _accuracies(rebalanced, tmp_path, "rebalanced", data)
    # In fp32 the skew changes nothing ...
    assert np.max(np.abs(logits_skew - logits_plain)) < 1e-3 * np.max(np.abs(logits_plain))
    assert fp_skew == fp_plain == fp_bal
    # ... but INT8 of it collapses, and balancing the same skewed factorisation restores it.
    assert int8_skew < fp_skew - 10, int8_skew
    assert abs(int8_bal - fp_bal) <= 0.3, (fp_bal, int8_bal)


def test_balancing_leaves_the_fp32_function_unchanged(compressor, data):
    """Centring moves a bias across the padded k x k stage: exact only if both biases are rewritten right."""
    import onnxruntime as ort

    _, x, _ = data
    outs = []
    for bal in (True, False):
        model = compressor.run(speedup=4.0, method="linear", balance=bal).model
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"input": x[:200]})[0])
    assert np.max(np.abs(outs[0] - outs[1])) < 1e-4 * np.max(np.abs(outs[1]))
