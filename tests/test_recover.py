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
    assert not np.array_equal(y, x)                       # some image took a box (else the loop checks nothing)


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


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(student, teacher, T):
    """Hinton's loss in NumPy: T^2 times the mean over rows of KL(softmax(t / T) || softmax(s / T))."""
    p, q = _softmax(teacher.astype(np.float64) / T), _softmax(student.astype(np.float64) / T)
    return T * T * float((p * (np.log(p) - np.log(q))).sum(-1).mean())


def test_kl_loss_is_hintons_value_by_hand():
    """Teacher logits (0, 0), student (ln 3, 0): at T = 1, p = (1/2, 1/2), q = (3/4, 1/4), so
    KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); at T = 2, q = (r, 1) / (1 + r) with r = sqrt 3, and the
    loss is 4 (1/2 ln((1 + r) / (2 r)) + 1/2 ln((1 + r) / 2)) = 2 ln((1 + r)^2 / (4 r)). A second row with
    equal logits adds 0, so the mean over the two rows is half; two outputs are averaged."""
    torch = pytest.importorskip("torch")
    from onnx_lowrank.recover.losses import resolve

    s = torch.tensor([[np.log(3.0), 0.0], [1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    r = np.sqrt(3.0)
    assert float(resolve("kl", 1.0)([s], [t])) == pytest.approx(0.5 * 0.5 * np.log(4 / 3), rel=1e-12)
    assert float(resolve("kl", 2.0)([s], [t])) == pytest.approx(0.5 * 2 * np.log((1 + r) ** 2 / (4 * r)), rel=1e-12)
    assert float(resolve("kl", 1.0)([s, s], [t, s])) == pytest.approx(0.5 * 0.25 * np.log(4 / 3), rel=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 3, 7)) * 3, rng.standard_normal((5, 3, 7)) * 3   # a sequence: rows are (image, position)
    assert float(resolve("kl", 4.0)([torch.from_numpy(a)], [torch.from_numpy(b)])) == pytest.approx(_kl(a, b, 4.0),
                                                                                                      rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kl_gradient_is_T_times_the_softmax_difference(T):
    """d(T^2 KL)/ds = T (softmax(s / T) - softmax(t / T)) / rows (Hinton et al.), checked by autograd and by
    central differences; zero where the student equals the teacher."""
    torch = pytest.importorskip("torch")
    from onnx_lowrank.recover.losses import resolve

    rng = np.random.default_rng(1)
    s0, t0 = rng.standard_normal((4, 5)) * 2, rng.standard_normal((4, 5)) * 2
    s = torch.tensor(s0, requires_grad=True)
    loss = resolve("kl", T)
    loss([s], [torch.from_numpy(t0)]).backward()
    want = T * (_softmax(s0 / T) - _softmax(t0 / T)) / 4
    np.testing.assert_allclose(s.grad.numpy(), want, atol=1e-12)
    h, fd = 1e-6, np.zeros_like(s0)
    for idx in np.ndindex(s0.shape):
        up, down = s0.copy(), s0.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (_kl(up, t0, T) - _kl(down, t0, T)) / (2 * h)
    np.testing.assert_allclose(fd, want, atol=1e-8)
    same = torch.tensor(t0, requires_grad=True)
    value = loss([same], [torch.from_numpy(t0)])
    value.backward()
    assert abs(value.item()) < 1e-12 and float(same.grad.abs().max()) < 1e-12


def test_set_losses_equal_the_loss_on_the_whole_set():
    """The held-back check sums over batches before the ratio: with batches of 3 over 7 rows it gives what
    one batch of all 7 gives, for NMSE and for KL."""
    pytest.importorskip("torch")
    from onnx_lowrank.recover.losses import resolve
    from onnx_lowrank.recover.train import set_losses

    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((7, 6)).astype(np.float32), rng.standard_normal((7, 6)).astype(np.float32)
    student = lambda feed: [feed["x"] * 2]  # noqa: E731
    got = set_losses(student, {"x": x}, [t], 3, [resolve("kl", 2.0), resolve("nmse", 1.0)])
    assert got[0] == pytest.approx(_kl(2 * x, t, 2.0), rel=1e-6)
    assert got[1] == pytest.approx(_nmse(2.0 * x.astype(np.float64), t.astype(np.float64)), rel=1e-6)


def test_kl_refuses_an_output_without_classes():
    pytest.importorskip("torch")
    from onnx_lowrank.errors import LowRankError
    from onnx_lowrank.recover.losses import resolve

    resolve("kl", 1.0).check("logits", (8, 10))
    for shape in [(8,), (8, 1)]:
        with pytest.raises(LowRankError, match="--loss nmse"):
            resolve("kl", 1.0).check("y", shape)


def test_loss_choices_are_the_registry():
    """The config checks names without importing torch; they must be the registry's."""
    pytest.importorskip("torch")
    from onnx_lowrank.recover.losses import REGISTRY
    from onnx_lowrank.recover.run import LOSS_CHOICES

    assert tuple(REGISTRY) == LOSS_CHOICES


def test_cli_kl_loss_reported_and_judged_by_itself(files, recovered):
    """--loss kl --temperature 2 from the command line: the report's held-back loss before and after is the
    KL at T = 2 recomputed from onnxruntime outputs, the held-back NMSE beside it too; the same seed gives
    the same bytes; and it trains a different model than the default loss."""
    pytest.importorskip("torch")
    import json

    out = [files["tmp"] / f"kl{i}.onnx" for i in range(2)]
    rep = files["tmp"] / "kl.json"
    common = [files["original"], files["factorised"], "--calib", files["calib"], "--epochs", 3, "--augment", "none",
              "--seed", 1, "--loss", "kl", "--temperature", 2]
    r0 = _cli("recover", *common, "-o", out[0], "--report", rep)
    assert r0.exit_code == 0, r0.output
    assert "T^2 KL of softmax at T = 2" in r0.output and "held-back NMSE" in r0.output
    r1 = _cli("recover", *common, "-o", out[1], "-q")
    assert r1.exit_code == 0, r1.output
    assert out[0].read_bytes() == out[1].read_bytes()
    assert out[0].read_bytes() != recovered[0].read_bytes()
    report = json.loads(rep.read_text())
    assert report["loss"] == "kl" and report["temperature"] == 2
    x = np.load(files["calib"])["input"]
    held = {"input": x[np.arange(len(x)) % 5 == 4]}
    teacher = run(onnx.load(files["original"]), held)[0]
    for model, key in [(files["factorised"], "before"), (out[0], "after")]:
        student = run(onnx.load(model), held)[0]
        assert report[f"held_back_loss_{key}"] == pytest.approx(_kl(student, teacher, 2.0), rel=1e-3)
        assert report[f"held_back_nmse_{key}"] == pytest.approx(_nmse(student, teacher), rel=1e-3)
    assert report["held_back_loss_after"] < report["held_back_loss_before"]


def test_cli_refuses_an_unknown_loss(files, tmp_path):
    r = _cli("recover", files["original"], files["factorised"], "--calib", files["calib"], "-o", tmp_path / "o.onnx",
             "--loss", "ce")
    assert r.exit_code == 2 and "ce" in r.output
    from onnx_lowrank.errors import LowRankError
    from onnx_lowrank.recover import RecoverConfig

    with pytest.raises(LowRankError, match="--temperature"):
        RecoverConfig(loss="kl", temperature=0).check()
