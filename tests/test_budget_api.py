"""The budget in the Python API (``onnx_lowrank.compress(..., max_accuracy_drop=, min_agreement=, speedup="auto")``).

Independent truths: each speed-up the search tried is compressed again on its own and its top-1
agreement with the original is computed here with onnxruntime and NumPy; the CLI run with the
same options must write the same bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnx_lowrank
from onnx_lowrank import BudgetExceeded, LowRankError

DEMO = Path(__file__).resolve().parent.parent / "models" / "mnist_vgg"
MODEL = DEMO / "mnist_vgg.onnx"
CALIB = DEMO / "calib.npz"
HELDOUT = DEMO / "heldout.npz"
#: Fast settings (FLOP objective: deterministic, nothing timed); the search's tries differ in speed-up only.
FAST = dict(objective="flops", method="linear", asymmetric=False, max_images=60, samples_per_image=4)
FAST_CLI = ["--objective", "flops", "--method", "linear", "--no-asymmetric", "--max-images", "60",
            "--samples-per-image", "4", "--no-measure", "-q"]
AGREEMENT = 0.99
N_EVAL = 300


@pytest.fixture(scope="module")
def eval_npz(tmp_path_factory):
    with np.load(HELDOUT) as z:
        x, y = z["input"][:N_EVAL], z["label"][:N_EVAL]
    path = tmp_path_factory.mktemp("eval") / "eval.npz"
    np.savez(path, input=x, label=y)
    return path, x, y


def _logits(model, x):
    import onnxruntime as ort

    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def auto_run(eval_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto")
    res = onnx_lowrank.compress(str(MODEL), str(CALIB), out / "m.onnx", speedup="auto", eval_data=eval_npz[0],
                                min_agreement=AGREEMENT, report=out / "r.json", **FAST)
    return res, out


def test_auto_search_returns_the_largest_tried_speedup_within_the_budget(auto_run, eval_npz):
    res, _ = auto_run
    _, x, _ = eval_npz
    reference = _logits(MODEL, x).argmax(1)
    trials = res.report["search"]
    brute = {}
    for t in trials:   # every try compressed again from scratch, judged here
        try:
            model = onnx_lowrank.compress(str(MODEL), str(CALIB), speedup=t["speedup"], **FAST).model
        except LowRankError:
            brute[t["speedup"]] = "unreachable"
            continue
        agreement = float(np.mean(_logits(model, x).argmax(1) == reference))
        assert t["top1_agreement"] == pytest.approx(agreement, abs=1e-12)
        brute[t["speedup"]] = "passes" if agreement >= AGREEMENT else "fails"
    assert {t["speedup"]: t["status"] for t in trials} == brute
    passing = [s for s, status in brute.items() if status == "passes"]
    chosen = max(passing)
    assert res.report["target_speedup"] == chosen
    assert res.report["budget"] == {"max_accuracy_drop": None, "min_agreement": AGREEMENT, "passed": True}
    # the search brackets the limit: every larger try failed (or was unreachable), the closest within 1.5^(1/8)
    above = [s for s in brute if s > chosen]
    assert above and min(above) <= chosen * 1.5 ** (1 / 8) * 1.001, brute
    assert any(status == "fails" for status in brute.values()), "budget never broke: the test checks nothing"
    # the returned model is the one compressed at that speed-up on its own
    alone = onnx_lowrank.compress(str(MODEL), str(CALIB), speedup=chosen, **FAST).model
    assert alone.SerializeToString() == res.model.SerializeToString()


def test_cli_auto_writes_what_the_api_writes(auto_run, eval_npz, tmp_path):
    res, out = auto_run
    proc = subprocess.run([sys.executable, "-m", "onnx_lowrank", "compress", str(MODEL), "--calib", str(CALIB),
                           "-o", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.json"), "--speedup", "auto",
                           "--eval-data", str(eval_npz[0]), "--min-agreement", str(AGREEMENT), *FAST_CLI],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.onnx").read_bytes() == (out / "m.onnx").read_bytes()
    cli_report, api_report = (json.loads((d / "r.json").read_text()) for d in (tmp_path, out))
    for rep in (cli_report, api_report):
        rep.pop("seconds")
    assert cli_report == api_report
    assert api_report["search"] == json.loads(json.dumps(res.report["search"]))


def test_broken_budget_raises_and_writes_nothing(eval_npz, tmp_path):
    _, x, y = eval_npz
    with pytest.raises(BudgetExceeded, match="top-1 agreement .* is below --min-agreement 0.999") as info:
        onnx_lowrank.compress(str(MODEL), str(CALIB), tmp_path / "m.onnx", speedup=5, eval_data=eval_npz[0],
                              labels="label", min_agreement=0.999, report=tmp_path / "r.json", **FAST)
    assert list(tmp_path.iterdir()) == []
    err = info.value
    assert err.exit_code == 3 and not err.written
    ev = err.result.report["evaluation"]
    # the figures in the report are the ones computed here
    reference, candidate = _logits(MODEL, x).argmax(1), _logits(err.result.model, x).argmax(1)
    assert ev["top1_agreement"] == pytest.approx(np.mean(reference == candidate), abs=1e-12)
    assert ev["top1_agreement"] < 0.999
    assert ev["accuracy_drop_points"] == pytest.approx(100 * (np.mean(reference == y) - np.mean(candidate == y)),
                                                       abs=1e-9)
    assert err.result.report["budget"]["passed"] is False


def test_write_failed_writes_then_raises(eval_npz, tmp_path):
    with pytest.raises(BudgetExceeded, match="written anyway") as info:
        onnx_lowrank.compress(str(MODEL), str(CALIB), tmp_path / "m.onnx", speedup=5, eval_data=eval_npz[0],
                              min_agreement=0.999, report=tmp_path / "r.json", write_failed=True, **FAST)
    assert info.value.written
    assert json.loads((tmp_path / "r.json").read_text())["budget"]["passed"] is False
    np.testing.assert_array_equal(_logits(tmp_path / "m.onnx", eval_npz[1]),
                                  _logits(info.value.result.model, eval_npz[1]))


@pytest.mark.parametrize("kwargs, words", [
    (dict(speedup="auto"), "needs a budget"),
    (dict(speedup="auto", eval_data="EVAL"), "needs a budget"),
    (dict(labels="label"), "give --eval-data too"),
    (dict(min_agreement=0.9), "needs --eval-data"),
    (dict(eval_data="EVAL", max_accuracy_drop=-1, labels="label"), "0 or more"),
    (dict(eval_data="EVAL", max_accuracy_drop=1), "needs --labels"),
    (dict(eval_data="EVAL", labels="nope", max_accuracy_drop=1), "'nope' is not an array"),
])
def test_bad_budget_refused_before_calibration(eval_npz, tmp_path, monkeypatch, kwargs, words):
    import onnx_lowrank.compressor as compressor

    def no_calibration(*args, **kw):
        raise AssertionError("calibrated before refusing")
    monkeypatch.setattr(compressor, "collect_original", no_calibration)
    kwargs = {k: (str(eval_npz[0]) if v == "EVAL" else v) for k, v in kwargs.items()}
    with pytest.raises(LowRankError, match=words) as info:
        onnx_lowrank.compress(str(MODEL), str(CALIB), tmp_path / "m.onnx", **{**FAST, **kwargs})
    assert not isinstance(info.value, BudgetExceeded)
    assert list(tmp_path.iterdir()) == []


def test_evaluation_without_limits_is_reported_not_judged(eval_npz):
    res = onnx_lowrank.compress(str(MODEL), str(CALIB), speedup=2, eval_data=eval_npz[0], labels="label", **FAST)
    assert "budget" not in res.report
    _, x, y = eval_npz
    assert res.report["evaluation"]["accuracy_candidate"] == pytest.approx(
        np.mean(_logits(res.model, x).argmax(1) == y), abs=1e-12)
