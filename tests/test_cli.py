"""The command line, run as a user would: a subprocess per call.

User errors must give exactly one line on stderr starting with ``error:``, exit code 2 and
write nothing. To keep the suite fast every subprocess of this module is started at once by a
module fixture and the tests then inspect the finished runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import conv_chain, model_from, run
from onnx_lowrank.plan import HEAD_REASON

# ---------------------------------------------------------------------------------------------
# fixtures: files and the runs


def _net() -> onnx.ModelProto:
    """input (N, 3, 12, 12) -> conv0 3->8 -> conv1 8->16 -> conv2 16->12 (all 3x3 pad 1, Relu) -> GAP -> Gemm 12->5."""
    m = conv_chain([3, 8, 16, 12], size=12, lowrank_bias=4, seed=21)
    rng = np.random.default_rng(22)
    g = m.graph
    old_out = g.output[0].name
    g.output[0].name = "features"
    for n in g.node:
        if old_out in n.output:
            n.output[0] = "features"
    g.initializer.append(numpy_helper.from_array(rng.standard_normal((12, 5)).astype(np.float32), "fc_w"))
    g.initializer.append(numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fc_b"))
    g.node.append(helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"], name="fc"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]))
    onnx.checker.check_model(m, full_check=True)
    return m


def _no_layer_model() -> onnx.ModelProto:
    """A MatMul of two computed tensors (as attention's) is no layer: nothing to factorise."""
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu"),
             helper.make_node("MatMul", ["input", "r"], ["output"], name="mm")]
    return model_from(nodes, {}, [6, 6], "output", [6, 6])


def _calib(n=12, shape=(3, 12, 12), key="input", seed=0) -> dict:
    return {key: np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)}


def _write_pngs(folder: Path, count=5) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(24)
    for i in range(count):
        h, w = (12, 12) if i % 2 else (20, 15)   # some need a resize + centre crop
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def _setup(case: str, d: Path) -> list[str]:
    """Create the files of one case in ``d``; return the CLI arguments (run with cwd = d)."""
    net = _net()
    model = d / "model.onnx"
    if case == "missing_model":
        np.savez(d / "calib.npz", **_calib())
        return ["compress", "nothere.onnx", "--calib", "calib.npz", "--report", "r.json"]
    if case == "random_bytes":
        model.write_bytes(np.random.default_rng(1).bytes(4096))
    elif case == "text_file":
        model.write_text("this is not an onnx model\nreally not\n")
    elif case == "no_conv":
        onnx.save_model(_no_layer_model(), str(model))
        np.savez(d / "calib.npz", input=np.zeros((6, 6), np.float32))
        return ["compress", "model.onnx", "--calib", "calib.npz", "--report", "r.json"]
    else:
        onnx.save_model(net, str(model))
    if case == "bad_keys":
        np.savez(d / "calib.npz", **_calib(key="images"))
    elif case == "bad_shape":
        np.savez(d / "calib.npz", **_calib(shape=(3, 10, 10)))
    elif case == "bad_rank_dims":
        np.savez(d / "calib.npz", **_calib(shape=(3, 12)))
    elif case == "missing_external":
        onnx.save_model(net, str(model), save_as_external_data=True, location="model.data", size_threshold=0)
        os.remove(d / "model.data")
        np.savez(d / "calib.npz", **_calib())
    else:
        np.savez(d / "calib.npz", **_calib())
    base = ["compress", "model.onnx", "--calib", "calib.npz", "--report", "r.json"]
    extra = {
        "speedup_1000": ["--speedup", "1000"],
        "speedup_half": ["--speedup", "0.5"],
        "unknown_rank_layer": ["--ranks", "conv9=3"],
        "rank_too_big": ["--ranks", "conv1=17"],
        "bad_input_shape": ["--input-shape", "input=1x3"],
        "output_is_input": ["-o", "model.onnx"],
        "missing_calib_file": [],
    }.get(case, [])
    if case == "missing_calib":
        return ["compress", "model.onnx", "--report", "r.json"]
    if case == "missing_calib_file":
        return ["compress", "model.onnx", "--calib", "nothere.npz", "--report", "r.json"]
    return base + extra


# Run as subprocesses (the real entry point, exit code and stderr of a fresh interpreter).
ERROR_CASES = [
    "missing_model", "random_bytes", "text_file", "no_conv", "bad_keys", "bad_shape", "speedup_1000",
    "speedup_half", "missing_calib",
]
# More user errors, run in-process with click's CliRunner (same code path, no interpreter start-up).
IN_PROCESS_CASES = [
    "bad_rank_dims", "missing_calib_file", "unknown_rank_layer", "rank_too_big", "bad_input_shape",
    "output_is_input", "missing_external",
]

# What each error's message must mention (a sanity check that it is the right error).
EXPECTED_WORDS = {
    "missing_model": "not found", "random_bytes": "not a readable ONNX model",
    "text_file": "not a readable ONNX model", "no_conv": "no Conv layer", "bad_keys": "input",
    "bad_shape": "shape", "bad_rank_dims": "dims", "speedup_1000": "impossible", "speedup_half": "--speedup",
    "missing_calib": "--calib", "missing_calib_file": "not found", "unknown_rank_layer": "conv9",
    "rank_too_big": "17", "bad_input_shape": "--input-shape", "output_is_input": "--output",
    "missing_external": "external",
}


def _success_cases(root: Path) -> dict[str, tuple[list[str], Path]]:
    ok = root / "ok"
    ok.mkdir()
    onnx.save_model(_net(), str(ok / "model.onnx"))
    np.savez(ok / "calib.npz", **_calib(n=15))
    folder = root / "folder"
    folder.mkdir()
    onnx.save_model(_net(), str(folder / "model.onnx"))
    _write_pngs(folder / "images")
    return {
        "ok": (["compress", "model.onnx", "--calib", "calib.npz", "--speedup", "1.6", "-o", "out/small.onnx",
                "--report", "r.json", "--threads", "1", "--objective", "flops", "--rank-multiple", "1"], ok),
        "folder": (["compress", "model.onnx", "--calib", "images", "--ranks", "conv1=3,conv2=4", "--report",
                    "r.json", "--threads", "1", "-q"], folder),
        "help": (["--help"], root),
        "compress_help": (["compress", "--help"], root),
    }


class Runs:
    def __init__(self):
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.before: dict[str, dict] = {}
        self.dirs: dict[str, Path] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("cli")
    out = Runs()
    jobs = {}
    for case in ERROR_CASES:
        d = root / case
        d.mkdir()
        jobs[case] = (_setup(case, d), d)
    jobs.update(_success_cases(root))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for case, (args, d) in jobs.items():
        out.dirs[case] = d
        out.before[case] = _snapshot(d)
        procs[case] = subprocess.Popen([sys.executable, "-m", "onnx_lowrank", *args], cwd=d, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for case, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out.results[case] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


# ---------------------------------------------------------------------------------------------
# user errors


def _error_params(cases):
    params = []
    for case in cases:
        params.append(pytest.param(case, id=case))
    return params


# Errors found only once calibration has run (an unreachable speed-up needs the layer FLOPs and
# ranks): in a log, the phase lines that ran come before the error line.
LATE_ERRORS = {"speedup_1000"}
PHASE_LINE = re.compile(r"^[a-z ]+: (started( \(\d+ \w+\))?|done, \d+ \w+ in \d+\.\d s, peak \d+ MB)$")


def _check_user_error(returncode, stderr, case):
    lines = stderr.splitlines()
    assert returncode == 2, stderr
    if case in LATE_ERRORS:
        assert lines and all(PHASE_LINE.match(line) for line in lines[:-1]), stderr
        lines = lines[-1:]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    assert EXPECTED_WORDS[case].lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("case", _error_params(ERROR_CASES))
def test_user_error_is_one_line_exit_2_and_writes_nothing(runs, case):
    res = runs.results[case]
    _check_user_error(res.returncode, res.stderr, case)
    assert _snapshot(runs.dirs[case]) == runs.before[case]      # no output model, no report, inputs untouched


@pytest.mark.parametrize("case", _error_params(IN_PROCESS_CASES))
def test_more_user_errors_in_process(tmp_path, monkeypatch, case):
    from click.testing import CliRunner

    from onnx_lowrank.cli import main

    args = _setup(case, tmp_path)
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, args)
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), repr(res.exception)
    _check_user_error(res.exit_code, res.stderr, case)
    assert res.stdout == ""
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# success


def _conv_flops(c, d, kh, kw, positions):
    return 2 * c * d * kh * kw * positions


def test_help_exits_0(runs):
    for case in ("help", "compress_help"):
        res = runs.results[case]
        assert res.returncode == 0, res.stderr
        assert "Usage" in res.stdout
    assert "compress" in runs.results["help"].stdout
    assert "--calib" in runs.results["compress_help"].stdout
    assert "--speedup" in runs.results["compress_help"].stdout


def test_compress_writes_model_and_report(runs):
    res = runs.results["ok"]
    d = runs.dirs["ok"]
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(set(_snapshot(d)) - set(runs.before["ok"])) == ["out", "out/small.onnx", "r.json"]
    assert _snapshot(d)["model.onnx"] == runs.before["ok"]["model.onnx"]   # input untouched

    new = onnx.load(str(d / "out" / "small.onnx"))
    onnx.checker.check_model(new, full_check=True)
    orig = onnx.load(str(d / "model.onnx"))
    x = _calib(n=2, seed=5)
    assert run(new, x)[0].shape == run(orig, x)[0].shape == (2, 5)
    assert [o.name for o in new.graph.output] == ["logits"]

    rep = json.loads((d / "r.json").read_text())
    for key in ("flops_before", "flops_after", "speedup_theoretical", "layers"):
        assert key in rep
    # Hand-derived FLOPs: three 3x3 pad-1 convs on 12x12 maps, the 12 -> 5 Gemm, one per output element
    # of the three Relus, one per input element of the GlobalAveragePool, none for Flatten.
    shapes = {"conv0": (3, 8), "conv1": (8, 16), "conv2": (16, 12)}
    total = sum(_conv_flops(c, dd, 3, 3, 144) for c, dd in shapes.values()) + 2 * 12 * 5 + (8 + 16 + 12) * 144 \
        + 12 * 144
    assert rep["flops_before"] == total
    assert [lay["name"] for lay in rep["layers"]] == ["conv0", "conv1", "conv2", "fc"]
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    nodes = {n.name: n for n in new.graph.node}
    (fc,) = [lay for lay in rep["layers"] if lay["name"] == "fc"]  # the Gemm writing the logits: the output head
    assert (fc["in_channels"], fc["out_channels"], fc["status"], fc["flops_before"]) == (12, 5, "skipped", 2 * 12 * 5)
    assert fc["reason"] == HEAD_REASON and "fc" in nodes
    for lay in rep["layers"][:3]:
        for key in ("name", "in_channels", "out_channels", "kernel", "status", "reason", "rank", "flops_before",
                    "flops_after", "rel_error"):
            assert key in lay, key
        c, dd = shapes[lay["name"]]
        assert (lay["in_channels"], lay["out_channels"], lay["kernel"]) == (c, dd, [3, 3])
        assert lay["flops_before"] == _conv_flops(c, dd, 3, 3, 144)
        if lay["status"] == "factorised":
            r = lay["rank"]
            assert lay["flops_after"] == 2 * (r * c * 9 + dd * r) * 144
            assert inits[nodes[lay["name"] + "_lowrank0"].input[1]].shape == (r, c, 3, 3)
            assert inits[nodes[lay["name"] + "_lowrank1"].input[1]].shape == (dd, r, 1, 1)
            assert lay["name"] not in nodes
            assert 0 <= lay["rel_error"] < 1
        else:
            assert lay["rank"] is None and lay["flops_after"] == lay["flops_before"] and lay["reason"]
            assert lay["name"] in nodes
    assert any(lay["status"] == "factorised" for lay in rep["layers"])
    saved = sum(lay["flops_before"] - lay["flops_after"] for lay in rep["layers"])
    assert saved == rep["flops_before"] - rep["flops_after"]
    assert rep["flops_after"] <= rep["flops_before"] / 1.6
    assert rep["speedup_theoretical"] == pytest.approx(rep["flops_before"] / rep["flops_after"])
    assert "wrote" in res.stdout


def test_progress_is_logged_per_phase_when_stderr_is_not_a_terminal(runs):
    """CI logs (stderr is a pipe here) get a started and a done line per phase; -q silences them."""
    lines = runs.results["ok"].stderr.splitlines()
    phases = [line for line in lines if PHASE_LINE.match(line)]
    assert phases[:2] == ["calibration: started (15 img)", phases[1]]
    assert phases[1].startswith("calibration: done, 15 img in ")       # the 15 samples of calib.npz
    started = [line.split(":")[0] for line in phases if ": started" in line]
    done = [line.split(":")[0] for line in phases if ": done," in line]
    assert started == done and "asymmetric solve" in started, lines
    for line in phases:   # the done count is the announced total
        if ": started (" in line:
            name, total = line.split(": started (")
            assert any(p.startswith(f"{name}: done, {total.split()[0]} ") for p in phases), phases
    # one line per solved layer, counting up to the announced total, each naming the layer and its rank
    solving = [line for line in lines if re.match(r"asymmetric solve: layer \d+ of \d+ \(", line)]
    n = int(next(p for p in phases if p.startswith("asymmetric solve: started")).split("(")[1].split()[0])
    assert [int(line.split()[3]) for line in solving] == list(range(1, n + 1)), solving
    assert all(re.search(r"\(\S+, \d+ -> \d+\), \d+\.\d s", line) for line in solving), solving
    assert not any(PHASE_LINE.match(line) for line in runs.results["folder"].stderr.splitlines())


def test_compress_from_image_folder(runs):
    res = runs.results["folder"]
    d = runs.dirs["folder"]
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""                     # -q
    assert sorted(set(_snapshot(d)) - set(runs.before["folder"])) == ["model.lowrank.onnx", "r.json"]
    rep = json.loads((d / "r.json").read_text())
    assert rep["calibration_images"] == 5
    assert {lay["name"]: lay["rank"] for lay in rep["layers"]} == {"conv0": None, "conv1": 3, "conv2": 4, "fc": None}
    new = onnx.load(str(d / "model.lowrank.onnx"))
    onnx.checker.check_model(new, full_check=True)
    convs = [n.name for n in new.graph.node if n.op_type == "Conv"]
    assert convs == ["conv0", "conv1_lowrank0", "conv1_lowrank1", "conv2_lowrank0", "conv2_lowrank1"]


def test_directory_as_model_is_one_line_error(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from onnx_lowrank.cli import main

    (tmp_path / "model.onnx").mkdir()
    np.savez(tmp_path / "calib.npz", **_calib())
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["compress", "model.onnx", "--calib", "calib.npz"])
    assert _snapshot(tmp_path) == before
    _check_user_error(res.exit_code, res.stderr, "directory_model")


EXPECTED_WORDS["directory_model"] = "directory"


def test_fixed_batch_model_with_sample_count_not_a_multiple(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from onnx_lowrank.cli import main

    onnx.save_model(conv_chain([3, 8, 16], size=12, lowrank_bias=3, batch=4, seed=3), str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", **_calib(n=10))
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["compress", "model.onnx", "--calib", "calib.npz", "--ranks", "conv1=3",
                                    "--threads", "1", "-q"])
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), repr(res.exception)
    if res.exit_code == 2:   # refusing with a clear message is acceptable
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert _snapshot(tmp_path) == before
    else:                    # so is using all 10 samples (or the 8 of full batches)
        assert res.exit_code == 0, res.stderr
        new = onnx.load(str(tmp_path / "model.lowrank.onnx"))
        assert run(new, _calib(n=4, seed=3))[0].shape == (4, 16)
