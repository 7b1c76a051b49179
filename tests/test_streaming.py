"""Readers and iterables are read batch by batch, never listed; data that cannot teach anything is refused."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from builders import conv_chain

import onnx_lowrank
from onnx_lowrank.calibration.inputs import InputSpec, open_source
from onnx_lowrank.cli import main
from onnx_lowrank.errors import LowRankError

SPEC = [InputSpec("input", np.dtype(np.float32), (None, 3, 8, 8))]
OPTS = dict(speedup=1.5, objective="flops", rank_multiple=1, batch_size=4)


def _x(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


class StrictReader:
    """A CalibrationDataReader that fails if asked for a batch while more than one earlier batch is still
    held by the caller: a tool that lists (or keeps) the data trips it."""

    def __init__(self, x, batch):
        self.x, self.batch, self.i = x, batch, 0
        self.handed: list[weakref.ref] = []
        self.calls = 0

    def get_next(self):
        gc.collect()
        alive = sum(r() is not None for r in self.handed)
        if alive > 1:
            raise AssertionError(f"asked for a batch while {alive} earlier batches are still held")
        self.calls += 1
        if self.i >= len(self.x):
            return None
        a = self.x[self.i:self.i + self.batch].copy()
        self.i += self.batch
        self.handed.append(weakref.ref(a))
        return {"input": a}

    def rewind(self):
        self.i = 0


def test_a_reader_is_never_drained_and_gives_the_same_model_as_arrays():
    model = conv_chain([3, 16, 16, 16], size=8, seed=2, lowrank_bias=6)
    x = _x(24)
    reader = StrictReader(x, 4)
    got = onnx_lowrank.compress(model, reader, samples_per_image=6, **OPTS).model
    assert reader.calls >= 2 * 7   # two passes (sampling, asymmetric), each batch by batch
    want = onnx_lowrank.compress(model, {"input": x}, samples_per_image=6, **OPTS).model
    assert got.SerializeToString() == want.SerializeToString()


def test_the_strict_reader_does_catch_a_listing_consumer():
    reader = StrictReader(_x(12), 4)
    with pytest.raises(AssertionError, match="still held"):
        list(iter(reader.get_next, None))


def test_a_factory_counts_once_for_auto_samples_and_matches_arrays():
    model = conv_chain([3, 16, 16, 16], size=8, seed=2, lowrank_bias=6)
    x = _x(30)
    made = []

    def factory():
        made.append(1)
        return ({"input": x[i:i + 3]} for i in range(0, len(x), 3))

    got = onnx_lowrank.compress(model, factory, **OPTS).model   # samples_per_image="auto" needs the count
    want = onnx_lowrank.compress(model, {"input": x}, **OPTS).model
    assert got.SerializeToString() == want.SerializeToString()
    assert len(made) >= 3


def test_one_shot_sources_are_refused_with_what_to_do():
    with pytest.raises(LowRankError, match=r"one-shot generator.*function that returns a new iterator"):
        open_source(({"input": _x(2)} for _ in range(3)), SPEC)

    class NoRewind:
        def __init__(self):
            self.feeds = iter([{"input": _x(3)}, {"input": _x(3, 1)}])

        def get_next(self):
            return next(self.feeds, None)

    src = open_source(NoRewind(), SPEC)
    assert sum(len(b["input"]) for b in src.batches(2)) == 6   # the first pass works
    with pytest.raises(LowRankError, match=r"no rewind\(\).*function that returns a new reader"):
        next(src.batches(2))


def _dir_files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.mark.parametrize("case,words", [("zeros", "constant"), ("repeated", "copies of one image")])
def test_calibration_data_that_cannot_teach_is_refused(tmp_path, monkeypatch, case, words):
    onnx.save(conv_chain([3, 16, 16], size=8, seed=2, lowrank_bias=6), tmp_path / "m.onnx")
    x = np.zeros((50, 3, 8, 8), np.float32) if case == "zeros" else np.repeat(_x(1), 50, axis=0)
    np.savez(tmp_path / "c.npz", input=x)
    before = _dir_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["compress", "m.onnx", "--calib", "c.npz", "--objective", "flops", "-o", "out.onnx",
                                    "--report", "r.json", "--no-measure"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr
    assert _dir_files(tmp_path) == before


def test_layers_whose_responses_barely_vary_are_named_in_a_warning(capsys):
    from onnx.numpy_helper import from_array, to_array

    from onnx_lowrank import progress

    model = conv_chain([3, 16, 16, 16], size=8, seed=2, lowrank_bias=6)
    w2 = next(i for i in model.graph.initializer if i.name == "w2")
    w2.CopyFrom(from_array(np.zeros_like(to_array(w2)), "w2"))   # conv2 ignores its input: its response is its bias
    progress.set_enabled(True)
    onnx_lowrank.compress(model, {"input": _x(20)}, samples_per_image=6, **OPTS)
    warning = [line for line in capsys.readouterr().err.splitlines() if "barely vary" in line]
    assert len(warning) == 1, warning
    named = warning[0].split(" at ")[1].split(" (")[0].split(", ")
    assert named == ["conv2"]


@pytest.mark.parametrize("start,limit", [(0, None), (5, 7), (6, 100), (11, 1)])
def test_a_shard_of_a_reader_starts_at_its_global_image(start, limit):
    x = _x(23)
    for data in (StrictReader(x, 3), {"input": x}, [{"input": x[i:i + 4]} for i in range(0, 23, 4)]):
        src = open_source(data, SPEC)
        got = np.concatenate([b["input"] for b in src.batches(4, limit, start=start)])
        np.testing.assert_array_equal(got, x[start:None if limit is None else start + limit])


def test_the_flatness_check_sums_variance_and_mean_square_by_blocks_like_numpy():
    from onnx_lowrank.calibration.checks import _spread

    rows = (np.random.default_rng(3).standard_normal((3001, 70)) * 2 + 5).astype(np.float32)
    y = rows.astype(np.float64)
    var, ms = _spread(rows)   # 375 rows a block: 9 blocks
    assert abs(var - y.var(axis=0).sum()) <= 1e-12 * var
    assert abs(ms - (y * y).mean(axis=0).sum()) <= 1e-12 * ms
