"""End-to-end on the shipped demo model (real MNIST digits): accuracy, budgets, bench / eval / sweep CLI.

The independent truth is the held-out labels and the original model's outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnx_lowrank
from onnx_lowrank.fidelity import evaluate

DEMO = Path(__file__).resolve().parent.parent / "models" / "mnist_vgg"
MODEL = DEMO / "mnist_vgg.onnx"
CALIB = DEMO / "calib.npz"
HELDOUT = DEMO / "heldout.npz"


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnx_lowrank", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def heldout():
    with np.load(HELDOUT) as z:
        return z["input"], z["label"]


def _accuracy(model, x, labels) -> float:
    import onnxruntime as ort

    src = model if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(str(src) if isinstance(src, Path) else src, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 250]})[0] for i in range(0, len(x), 250)])
    return float((logits.argmax(1) == labels).mean())


def test_demo_2x_loses_at_most_half_a_point(heldout):
    x, y = heldout
    result = onnx_lowrank.compress(str(MODEL), str(CALIB), speedup=2, objective="flops")
    assert result.report["speedup_theoretical"] >= 2.0
    before, after = _accuracy(MODEL, x, y), _accuracy(result.model, x, y)
    assert before > 0.95
    assert 100 * (before - after) <= 0.5, (before, after)


def test_broken_budget_exits_3_and_writes_nothing(tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    res = _cli("compress", MODEL, "--calib", CALIB, "--speedup", "5", "--max-images", "60", "--samples-per-image", "4",
               "--method", "linear", "--no-asymmetric", "--objective", "flops", "-o", out, "--report", rep,
               "--eval-data", HELDOUT, "--labels", "label", "--max-accuracy-drop", "0.01", "-q")
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: budget broken: accuracy drop")
    assert "exceeds --max-accuracy-drop 0.01 by" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_budget_that_holds_writes_model_and_evaluation(tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    res = _cli("compress", MODEL, "--calib", CALIB, "--speedup", "1.5", "--max-images", "100", "-o", out,
               "--report", rep, "--eval-data", HELDOUT, "--labels", "label", "--max-accuracy-drop", "2", "-q")
    assert res.returncode == 0, res.stderr
    report = json.loads(rep.read_text())
    assert report["budget"]["passed"] is True
    ev = report["evaluation"]
    # The report's evaluation agrees with an independent onnxruntime run on the written model.
    with np.load(HELDOUT) as z:
        x, y = z["input"], z["label"]
    assert ev["accuracy_candidate"] == pytest.approx(_accuracy(out, x, y), abs=1e-9)
    assert ev["accuracy_reference"] == pytest.approx(_accuracy(MODEL, x, y), abs=1e-9)


def test_eval_and_bench_json(tmp_path):
    res = _cli("eval", MODEL, MODEL, "--data", HELDOUT, "--labels", "label", "--json", "--max-samples", "300")
    assert res.returncode == 0, res.stderr
    ev = json.loads(res.stdout)
    assert ev["top1_agreement"] == 1.0 and ev["nmse"] == 0.0 and ev["accuracy_drop_points"] == 0.0
    assert ev["samples"] == 300
    res = _cli("bench", MODEL, MODEL, "--runs", "5", "--warmup", "1", "--json")
    assert res.returncode == 0, res.stderr
    b = json.loads(res.stdout)
    assert [m["path"] for m in b["models"]] == [str(MODEL), str(MODEL)]
    assert all(m["min_ms"] <= m["median_ms"] <= m["max_ms"] for m in b["models"])
    assert b["speedup"][0] == 1.0


def test_sweep_writes_csv_and_png(tmp_path):
    res = _cli("sweep", MODEL, "--calib", CALIB, "--eval-data", HELDOUT, "--labels", "label", "--speedups", "2,3",
               "--max-images", "60", "--runs", "3", "--method", "linear", "--no-asymmetric", "--objective", "flops",
               "--out", tmp_path / "sw", "-q")
    assert res.returncode == 0, res.stderr
    import csv

    rows = list(csv.DictReader(open(tmp_path / "sw.csv")))
    assert [float(r["speedup_target"]) for r in rows] == [2.0, 3.0]
    assert all(float(r["speedup_theoretical"]) >= float(r["speedup_target"]) * 0.999 for r in rows)
    assert (tmp_path / "sw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_matches_hand_computed_accuracy(heldout):
    x, y = heldout
    ev = evaluate(str(MODEL), str(MODEL), [{"input": x[:200]}], labels=y[:200])
    assert ev["accuracy_reference"] == pytest.approx(_accuracy(MODEL, x[:200], y[:200]))


def test_sigterm_removes_the_cache_and_writes_nothing(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "out" / "m.onnx"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "onnx_lowrank", "compress", str(MODEL), "--calib", str(CALIB),
                             "--speedup", "4", "--objective", "flops", "-o", str(out), "-q"],
                            env={**os.environ, "TMPDIR": str(tmp)},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp.glob("onnx-lowrank-cache-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)  # wait until the asymmetric pass has created its cache
    assert proc.poll() is None, "compress finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert list(tmp.glob("onnx-lowrank-cache-*")) == [] and not out.exists()
