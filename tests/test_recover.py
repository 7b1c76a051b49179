"""Recovery by distillation (onnx_lowrank.recover) on the demo model, checked against onnxruntime.

The factorised model is the demo compressed fast (10x FLOPs, linear); recovery runs a few epochs on
100 calibration images. Losses are recomputed here from onnxruntime outputs of the original,
factorised and recovered models, never taken from the recovery's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from builders import run

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "mnist_vgg"
IMAGES = 100   # calibration images recovery uses: 80 fit, 20 held back (every 5th)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from onnx_lowrank import compress

    tmp = tmp_path_factory.mktemp("recover")
    calib = tmp / "calib.npz"
    np.savez(calib, input=np.load(DEMO / "calib.npz")["input"][::5][:IMAGES])   # the file is sorted by class
    factorised = tmp / "f.onnx"
    compress(str(DEMO / "mnist_vgg.onnx"), str(calib), str(factorised), speedup=10, objective="flops",
             rank_multiple=1, method="linear")
    return {"tmp": tmp, "calib": calib, "factorised": factorised, "original": DEMO / "mnist_vgg.onnx"}


def _cli(*args):
    from onnx_lowrank.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def recovered(files):
    pytest.importorskip("torch")
    out = [files["tmp"] / f"r{i}.onnx" for i in range(3)]
    common = [files["original"], files["factorised"], "--calib", files["calib"], "--epochs", 3, "--augment", "none",
              "-q"]
    results = [_cli("recover", *common, "-o", out[0], "--seed", 1),
               _cli("recover", *common, "-o", out[1], "--seed", 1),
               _cli("recover", *common, "-o", out[2], "--seed", 2)]
    for r in results:
        assert r.exit_code == 0, r.output
    return out


def _nmse(a, b):
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def test_same_nodes_and_ranks_only_weights_change(files, recovered):
    fact, rec = onnx.load(files["factorised"]), onnx.load(recovered[0])
    assert [(n.op_type, n.name, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
            for n in fact.graph.node] == \
           [(n.op_type, n.name, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
            for n in rec.graph.node]
    fi = {t.name: numpy_helper.to_array(t) for t in fact.graph.initializer}
    ri = {t.name: numpy_helper.to_array(t) for t in rec.graph.initializer}
    assert {k: v.shape for k, v in fi.items()} == {k: v.shape for k, v in ri.items()}
    changed = {k for k in fi if not np.array_equal(fi[k], ri[k])}
    lowrank = {k for k in fi if "_lowrank" in k}
    assert changed and changed <= lowrank          # only the factorised stages train by default
    assert fact.graph.input == rec.graph.input and fact.graph.output == rec.graph.output


def test_held_back_loss_is_lower(files, recovered):
    x = np.load(files["calib"])["input"]
    held = x[np.arange(len(x)) % 5 == 4]           # the images recovery held back, never trained on
    teacher = run(onnx.load(files["original"]), {"input": held})[0]
    before = _nmse(run(onnx.load(files["factorised"]), {"input": held})[0], teacher)
    after = _nmse(run(onnx.load(recovered[0]), {"input": held})[0], teacher)
    assert after < 0.9 * before


def test_same_seed_same_bytes(recovered):
    a, b, c = (p.read_bytes() for p in recovered)
    assert a == b
    assert a != c    # the seed does reach the training


def test_writeback_matches_torch():
    """Every binder (Conv, Gemm as nn.Linear with alpha and transB=0, MatMul and Add kept as buffers):
    perturb the torch weights, write them back, and onnxruntime must compute what torch computes."""
    torch = pytest.importorskip("torch")
    from onnx_lowrank.recover.student import Student

    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"cw": f32(4, 3, 3, 3), "cb": f32(4), "gw": f32(4, 6), "gb": f32(6), "mw": f32(6, 5), "ab": f32(5)}
    nodes = [helper.make_node("Conv", ["input", "cw", "cb"], ["c"], name="c_lowrank0", pads=[0, 0, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="g_lowrank1", alpha=0.5, beta=2.0, transB=0),
             helper.make_node("MatMul", ["g", "mw"], ["m"], name="m_lowrank0"),
             helper.make_node("Add", ["m", "ab"], ["output"], name="m_lowrank0_bias")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [2, 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = f32(2, 3, 4, 4)
    student = Student(model, ["output"])
    assert set(student.bindings) == set(inits)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
        want = student({"input": torch.from_numpy(x)})[0].numpy()
    written = student.written()
    got = run(written, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, run(model, {"input": x})[0], atol=1e-2)   # the perturbation is really there


def test_compress_recover_budget_judges_recovered_model(files, tmp_path):
    pytest.importorskip("torch")
    from onnx_lowrank import compress

    held = dict(np.load(DEMO / "heldout.npz"))
    held = {"input": held["input"][::10], "label": held["label"][::10]}   # sorted by class: every class
    res = compress(str(files["original"]), str(files["calib"]), str(tmp_path / "o.onnx"), speedup=10,
                   objective="flops", rank_multiple=1, method="linear", recover=1, eval_data=held, labels="label",
                   max_accuracy_drop=100.0)
    assert res.report["recovery"]["epoch_kept"] in (0, 1)
    teacher = run(onnx.load(files["original"]), {"input": held["input"]})[0]
    written = run(onnx.load(tmp_path / "o.onnx"), {"input": held["input"]})[0]
    assert res.report["evaluation"]["nmse"] == pytest.approx(_nmse(written, teacher), rel=1e-3)


@pytest.mark.parametrize("command", ["recover", "compress"])
def test_without_the_extra_one_line_and_exit_2(files, tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "torch", None)        # as if not installed: import and find_spec fail
    monkeypatch.setitem(sys.modules, "onnx2torch", None)
    out = tmp_path / "o.onnx"
    if command == "recover":
        r = _cli("recover", files["original"], files["factorised"], "--calib", files["calib"], "-o", out)
    else:
        r = _cli("compress", files["original"], "--calib", files["calib"], "-o", out, "--recover", 2)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and 'pip install "onnx-lowrank[recover]"' in lines[0]
    assert not out.exists()


def test_nothing_imports_torch_unless_recovery_is_asked():
    code = ("import sys, onnx_lowrank, onnx_lowrank.cli, onnx_lowrank.recover.run; "
            "assert 'torch' not in sys.modules and 'onnx2torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_fit_loss_before_training_is_the_factorised_models_error_on_the_fit_images(files):
    """The report's fit loss before training, recomputed with onnxruntime on the images not held back."""
    pytest.importorskip("torch")
    from onnx_lowrank.recover import recover

    rep = recover(str(files["original"]), str(files["factorised"]), str(files["calib"]), epochs=1,
                  augment="none").report
    x = np.load(files["calib"])["input"]
    fit = x[np.arange(len(x)) % 5 != 4]
    want = _nmse(run(onnx.load(files["factorised"]), {"input": fit})[0], run(onnx.load(files["original"]),
                                                                             {"input": fit})[0])
    assert rep["fit_loss_before"] == pytest.approx(want, rel=1e-3)
    assert rep["epochs"][0]["fit_loss"] == rep["fit_loss_before"]


def _batch(seed=0, n=6, h=12, w=10):
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


def test_mixup_blends_each_image_with_one_of_its_batch():
    from onnx_lowrank.recover.augment import REGISTRY

    x = _batch()
    y = REGISTRY["mixup"](x, (2, 3), np.random.default_rng(1))
    for out, own in zip(y, x):
        fits = []
        for other in x:   # out = lam * own + (1 - lam) * other: least-squares lam, then the residual
            d = (own - other).ravel()
            lam = float(d @ (out - other).ravel()) / float(d @ d) if d.any() else 1.0
            fits.append((np.abs(lam * own + (1 - lam) * other - out).max(), lam))
        err, lam = min(fits)
        assert err < 1e-5 and -1e-6 <= lam <= 1 + 1e-6
    assert not np.allclose(y, x)


def test_cutmix_pastes_one_box_of_another_image():
    from onnx_lowrank.recover.augment import REGISTRY

    x = _batch()
    y = REGISTRY["cutmix"](x, (2, 3), np.random.default_rng(2))
    for i, out in enumerate(y):
        changed = np.any(out != x[i], axis=0)             # pixels (H, W) that came from elsewhere
        if not changed.any():
            continue
        rows, cols = np.where(changed.any(1))[0], np.where(changed.any(0))[0]
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        assert changed[box].all()                         # one filled rectangle
        assert any(np.array_equal(out[:, box[0], box[1]], o[:, box[0], box[1]]) for o in x)
        assert rows[-1] - rows[0] + 1 <= 6 and cols[-1] - cols[0] + 1 <= 5   # at most half of each side


def test_zoom_enlarges_a_window_without_padding():
    """Bilinear sampling keeps a ramp a ramp: along each axis the slope is the zoom (0.8 to 1) and the
    values stay inside the image's range, so no padded border appears."""
    from onnx_lowrank.recover.augment import REGISTRY

    h, w = 16, 20
    ramp = np.broadcast_to(np.arange(w, dtype=np.float32), (4, 3, h, w)).copy()
    y = REGISTRY["zoom"](ramp, (2, 3), np.random.default_rng(3))
    assert y.min() >= 0 and y.max() <= w - 1
    for img in y:
        slope = np.diff(img[0, 0])
        assert np.allclose(slope, slope[0], atol=1e-4) and 0.8 - 1e-4 <= slope[0] <= 1 + 1e-4
        assert np.allclose(img, img[0, 0])                # constant along the other axis, as the ramp is
    assert not np.allclose(y, ramp)


def test_no_augmentation_unless_asked():
    """Crop + noise raised EfficientNet-Lite0's held-back loss from the first epoch (section_recover2.md):
    recovery augments only on request, from the API and from the command line."""
    from onnx_lowrank.cli_recover import recover_cmd
    from onnx_lowrank.recover import RecoverConfig
    from onnx_lowrank.recover.augment import resolve

    images = {"input": _batch()}
    assert resolve(RecoverConfig().augment, images) == []
    assert resolve([p for p in recover_cmd.params if p.name == "augment"][0].default, images) == []
    assert resolve("auto", images) == ["crop", "noise"]


def test_warmup_scales_the_first_steps(files):
    """With a warm-up of 10^6 steps the first epoch's steps are a millionth of the default's: the weights
    barely move, while the default (one epoch of warm-up) moves them."""
    pytest.importorskip("torch")
    from onnx_lowrank.recover import recover

    fact = {t.name: numpy_helper.to_array(t) for t in onnx.load(files["factorised"]).graph.initializer}

    def moved(**kw):
        m = recover(str(files["original"]), str(files["factorised"]), str(files["calib"]), epochs=1, patience=5,
                    **kw).model
        return max(float(np.abs(numpy_helper.to_array(t) - fact[t.name]).max() / (np.abs(fact[t.name]).max() + 1e-12))
                   for t in m.graph.initializer)

    default, slow = moved(), moved(warmup=10 ** 6)
    assert default > 1e-4 and slow < default * 1e-3
