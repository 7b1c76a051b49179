"""More bad inputs: each is one clear error (LowRankError / `error:` line), never a traceback or a wrong model."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# Bad data never passes silently: refused up front, before the model is loaded or calibrated.


@pytest.fixture
def stages(monkeypatch):
    """Names of the stages of work that ran: "load" (the model), "calibration", "evaluation"."""
    import onnx_lowrank.graph.loading as loading
    import onnx_lowrank.fidelity as fidelity
    import onnx_lowrank.compressor as compressor
    import onnx_lowrank.sweep as sweep

    ran = []

    def spy(module, name, stage):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            ran.append(stage)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    spy(loading, "load_model", "load")
    spy(compressor, "load_model", "load")
    spy(sweep, "load_model", "load")
    spy(compressor, "collect_original", "calibration")
    spy(fidelity, "evaluate", "evaluation")
    return ran


def _refused(args, tmp_path, monkeypatch, words, ran, before):
    """An `error:` line naming ``words``, exit 2, nothing new on disk, and stage ``before`` never ran."""
    _cli_error(args, tmp_path, monkeypatch, words)
    assert before not in ran, ran


def _unwritable_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.access(d, os.W_OK):   # root ignores mode bits; the kernel still refuses new files in /sys
        return Path("/sys")
    return d


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int64])
def test_integer_calibration_data_for_a_float_model(tmp_path, monkeypatch, stages, dtype):
    """Raw pixels used unscaled gave a 10 % model with exit 0: now refused with what to do."""
    _model_and_data(tmp_path)
    np.savez(tmp_path / "c.npz", input=np.random.default_rng(0).integers(0, 100, (12, 3, 8, 8)).astype(dtype))
    _refused(["compress", "m.onnx", "--calib", "c.npz"], tmp_path, monkeypatch, np.dtype(dtype).name, stages,
             "calibration")
    res = CliRunner().invoke(main, ["compress", "m.onnx", "--calib", "c.npz"])
    assert "/ 255" in res.stderr and "--scale" in res.stderr


def test_integer_data_refused_in_npy_api_and_eval(tmp_path, monkeypatch, stages):
    _, path, x = _model_and_data(tmp_path)
    pixels = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    np.save(tmp_path / "u8.npy", pixels)
    np.savez(tmp_path / "u8.npz", input=pixels, label=np.zeros(12, np.int64))
    _refused(["compress", "m.onnx", "--calib", "u8.npy"], tmp_path, monkeypatch, "uint8", stages, "calibration")
    _refused(["compress", "m.onnx", "--calib", "c.npz", "--eval-data", "u8.npz", "--labels", "label",
              "--max-accuracy-drop", "1"], tmp_path, monkeypatch, "uint8", stages, "calibration")
    _refused(["eval", "m.onnx", "m.onnx", "--data", "u8.npz"], tmp_path, monkeypatch, "uint8", stages, "evaluation")
    with pytest.raises(LowRankError, match="uint8"):
        onnx_lowrank.compress(str(path), {"input": pixels})
    with pytest.raises(LowRankError, match="uint8"):
        onnx_lowrank.compress(str(path), [{"input": pixels[:6]}, {"input": pixels[6:]}])
    assert "calibration" not in stages


@pytest.mark.parametrize("n, extra", [(1, []), (4, []), (12, ["--max-images", "3"])])
def test_too_few_calibration_images(tmp_path, monkeypatch, stages, n, extra):
    """One image gave a 28 % model and "0 % error on held-back images": fewer than 5 are refused."""
    _, _, x = _model_and_data(tmp_path)
    np.savez(tmp_path / "c.npz", input=x[:n])
    _refused(["compress", "m.onnx", "--calib", "c.npz", *extra], tmp_path, monkeypatch, "at least 5", stages,
             "calibration")


def test_error_is_reported_only_on_held_back_images(tmp_path):
    """With nothing held back the report says so (no error figure) instead of a fitted 0 %."""
    from onnx_lowrank.report import format_report

    _, path, x = _model_and_data(tmp_path)
    five = onnx_lowrank.compress(str(path), {"input": x[:5]}, speedup=None, ranks={"conv1": 4}, method="linear")
    assert five.report["held_back_images"] == 1          # image 4 of 0..4
    factorised = [lay for lay in five.report["layers"] if lay["status"] == "factorised"]
    assert factorised and all(lay["rel_error"] > 0 for lay in factorised)
    none = onnx_lowrank.compress(str(path), {"input": x[:7]}, speedup=None, ranks={"conv1": 4}, method="linear",
                                 holdout_every=10)
    assert none.report["held_back_images"] == 0
    layer = {lay["name"]: lay for lay in none.report["layers"]}["conv1"]
    assert layer["status"] == "factorised" and layer["rel_error"] is None and layer["rel_error_linear"] is None
    assert "none held back" in format_report(none.report)


@pytest.mark.parametrize("option", ["-o", "--report"])
@pytest.mark.parametrize("where", ["directory", "under_a_file", "read_only"])
def test_unwritable_output_refused_before_loading(tmp_path, monkeypatch, stages, option, where):
    """Such outputs ended in a traceback after all the work (and a model without its report)."""
    _model_and_data(tmp_path)
    if where == "directory":
        (tmp_path / "out").mkdir()
        target, words = "out", "directory"
    elif where == "under_a_file":
        (tmp_path / "afile").write_text("x")
        target, words = "afile/sub/out.json", "not a directory"
    else:
        target, words = str(_unwritable_dir(tmp_path) / "new" / "out.json"), "not writable"
    _refused(["compress", "m.onnx", "--calib", "c.npz", option, target], tmp_path, monkeypatch, words, stages, "load")


def test_sweep_output_refused_before_loading(tmp_path, monkeypatch, stages):
    _model_and_data(tmp_path)
    (tmp_path / "afile").write_text("x")
    _refused(["sweep", "m.onnx", "--calib", "c.npz", "--eval-data", "c.npz", "--out", "afile/s"], tmp_path,
             monkeypatch, "not a directory", stages, "load")


def test_report_that_fails_to_write_leaves_no_model(tmp_path, monkeypatch):
    """Model and report are committed together: a full disk while writing the report writes neither."""
    import errno

    import onnx_lowrank.api as api

    _model_and_data(tmp_path)

    def full_disk(path, obj):
        with open(path, "w") as f:
            f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(api, "_write_json", full_disk)
    _cli_error(["compress", "m.onnx", "--calib", "c.npz", "--ranks", "conv1=4", "--method", "linear", "-q",
                "-o", "new/dir/m2.onnx", "--report", "r.json"], tmp_path, monkeypatch, "No space left")


@pytest.mark.parametrize("args, words", [
    (["--max-accuracy-drop", "-1"], "--max-accuracy-drop"),
    (["--max-accuracy-drop", "nan"], "--max-accuracy-drop"),
    (["--min-agreement", "1.5"], "--min-agreement"),
    (["--min-agreement", "-0.1"], "--min-agreement"),
    (["--min-agreement", "nan"], "--min-agreement"),
])
def test_budget_values_refused_before_loading(tmp_path, monkeypatch, stages, args, words):
    """A negative budget ran 30 s and then exited 3."""
    _, _, x = _model_and_data(tmp_path)
    np.savez(tmp_path / "e.npz", input=x, label=np.arange(12) % 16)
    _refused(["compress", "m.onnx", "--calib", "c.npz", "--eval-data", "e.npz", "--labels", "label", *args],
             tmp_path, monkeypatch, words, stages, "load")


def test_labels_without_eval_data(tmp_path, monkeypatch, stages):
    _model_and_data(tmp_path)
    _refused(["compress", "m.onnx", "--calib", "c.npz", "--labels", "label"], tmp_path, monkeypatch,
             "--eval-data", stages, "load")


@pytest.mark.parametrize("case, words", [
    ("missing_key", "it has input, label"),
    ("npy", ".npz"),
    ("float_labels", "integer"),
    ("short_labels", "one label per sample"),
    ("wrong_shape", "evaluation input"),
    ("wrong_key", "no array for model input"),
])
def test_eval_data_and_labels_checked_before_calibration(tmp_path, monkeypatch, stages, case, words):
    """--labels with a missing key was found only after compressing."""
    _, _, x = _model_and_data(tmp_path)
    labels = np.arange(12) % 16
    data = {"missing_key": dict(input=x, label=labels), "float_labels": dict(input=x, lbl=labels + 0.5),
            "short_labels": dict(input=x, lbl=labels[:10]), "wrong_shape": dict(input=x[:, :, :4], lbl=labels),
            "wrong_key": dict(images=x, lbl=labels)}
    if case == "npy":
        np.save(tmp_path / "e.npy", x)
        eval_path = "e.npy"
    else:
        np.savez(tmp_path / "e.npz", **data[case])
        eval_path = "e.npz"
    args = ["--eval-data", eval_path, "--labels", "lbl", "--max-accuracy-drop", "1"]
    _refused(["compress", "m.onnx", "--calib", "c.npz", *args], tmp_path, monkeypatch, words, stages, "calibration")
    if case != "wrong_shape":   # the same files given to `eval` are refused before any model runs
        _refused(["eval", "m.onnx", "m.onnx", "--data", eval_path, "--labels", "lbl"], tmp_path, monkeypatch, words,
                 stages, "evaluation")


def test_extra_npz_keys_are_ignored_alike_in_calibration_and_eval(tmp_path, monkeypatch):
    """Calibration refused a `label` array beside the input that eval accepted: both now accept it,
    give the same model as without it, and say once which arrays they ignore."""
    _, _, x = _model_and_data(tmp_path)
    np.savez(tmp_path / "extra.npz", input=x, label=np.arange(12) % 16, ids=np.arange(12))
    monkeypatch.chdir(tmp_path)
    common = ["--ranks", "conv1=4", "--method", "linear"]
    plain = CliRunner().invoke(main, ["compress", "m.onnx", "--calib", "c.npz", "-o", "a.onnx", *common])
    extra = CliRunner().invoke(main, ["compress", "m.onnx", "--calib", "extra.npz", "-o", "b.onnx",
                                      "--eval-data", "extra.npz", *common])
    assert plain.exit_code == 0 and extra.exit_code == 0, extra.stderr
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    notes = [line for line in extra.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and all("'ids', 'label'" in n for n in notes), extra.stderr
    assert sorted(n.split()[1] for n in notes) == ["calibration", "evaluation"]
    ev = CliRunner().invoke(main, ["eval", "m.onnx", "b.onnx", "--data", "extra.npz"])
    assert ev.exit_code == 0 and "'ids', 'label'" in ev.stderr


# ---------------------------------------------------------------------------------------------
# Progress in CI logs


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_phase_lines_only_when_stderr_is_not_a_terminal(monkeypatch, tty):
    from onnx_lowrank import progress

    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    progress.set_enabled(True)
    with progress.bar("calibration", 7, "img") as update:
        for _ in range(7):
            update(1)
    with pytest.raises(ValueError):
        with progress.bar("solve", 3, "layer") as update:
            update(1, "conv1, 64 -> 16")
            raise ValueError
    progress.set_enabled(False)
    with progress.bar("quiet phase", 2, "img") as update:
        update(2)
    progress.set_enabled(True)
    lines = err.getvalue().splitlines()
    if tty:   # a tqdm bar (carriage returns), never a log line
        assert "calibration" in err.getvalue() and not any("started" in line or "done," in line for line in lines)
    else:     # started / done with count and seconds; a failed phase has no done line; quiet has none
        assert lines[0] == "calibration: started (7 img)"
        assert re.fullmatch(r"calibration: done, 7 img in \d+\.\d s, peak \d+ MB", lines[1])
        # an item gets its own line: which one, how far, time so far and the rest estimated
        assert lines[2] == "solve: started (3 layer)"
        assert re.fullmatch(r"solve: layer 1 of 3 \(conv1, 64 -> 16\), \d+\.\d s, ETA \d+ s", lines[3])
        assert lines[4:] == []


def _writer(text, fail=False):
    def write(tmp):
        Path(tmp).write_text(text)
        Path(tmp + ".data").write_text(text + " weights")   # a sibling, like external model data
        if fail:
            raise OSError(28, "No space left on device")
    return write


@pytest.mark.parametrize("failing", [0, 1])
def test_outputs_are_written_together_or_not_at_all(tmp_path, failing):
    from onnx_lowrank.files import write_together

    (tmp_path / "old.json").write_text("previous")
    outputs = [(tmp_path / "new" / "deep" / "m.onnx", _writer("model", failing == 0)),
               (tmp_path / "old.json", _writer("report", failing == 1))]
    with pytest.raises(LowRankError, match="No space left.*nothing was written"):
        write_together(outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]   # no temporaries, no created folders
    assert (tmp_path / "old.json").read_text() == "previous"
    write_together([(path, _writer(text)) for (path, _), text in zip(outputs, ["model", "report"])])
    assert (tmp_path / "new" / "deep" / "m.onnx").read_text() == "model"
    assert (tmp_path / "new" / "deep" / "m.onnx.data").read_text() == "model weights"
    assert (tmp_path / "old.json").read_text() == "report"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "old.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old.json", "old.json.data"]


def test_check_writable_creates_nothing(tmp_path):
    from onnx_lowrank.files import check_writable

    check_writable(tmp_path / "a" / "b" / "out.onnx", "--output")    # missing folders are created later
    check_writable(tmp_path / "out.onnx", "--output")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LowRankError, match="--report .* is a directory"):
        check_writable(tmp_path, "--report")


@pytest.mark.parametrize("budget", [["--labels", "label", "--max-accuracy-drop", "1"], ["--min-agreement", "0.9"]])
def test_budget_on_a_non_classifier_output_refused_before_calibration(tmp_path, monkeypatch, stages, budget):
    """Labels and top-1 agreement need (N, classes) scores; a feature-map output was found only after compressing."""
    import onnx

    from builders import conv_node, model_from

    rng = np.random.default_rng(3)
    m = model_from([conv_node("conv0", "input", "y", "w", None, pads=[1, 1, 1, 1], kernel_shape=[3, 3])],
                   {"w": rng.standard_normal((16, 3, 3, 3)).astype(np.float32)}, ["N", 3, 8, 8], "y",
                   ["N", 16, 8, 8])
    onnx.save(m, str(tmp_path / "m.onnx"))
    x = rng.standard_normal((12, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", input=x)
    np.savez(tmp_path / "e.npz", input=x, label=np.arange(12) % 16)
    _refused(["compress", "m.onnx", "--calib", "c.npz", "--eval-data", "e.npz", *budget], tmp_path, monkeypatch,
             "classifier output", stages, "calibration")


def test_api_output_checked_before_calibration(tmp_path, stages):
    _, path, x = _model_and_data(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LowRankError, match="not a directory"):
        onnx_lowrank.compress(str(path), {"input": x}, output=str(tmp_path / "afile" / "out.onnx"))
    with pytest.raises(LowRankError, match="is a directory"):
        onnx_lowrank.compress(str(path), {"input": x}, output=str(tmp_path))
    assert stages == [] and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "c.npz", "m.onnx"]
