"""Calibration sources: every accepted form gives the same batches, and the same compressed model."""

from __future__ import annotations

import numpy as np
import pytest
from onnxruntime.quantization import CalibrationDataReader

from builders import conv_chain

import onnx_lowrank
from onnx_lowrank.calibration.inputs import FeedSource, InputSpec, open_source
from onnx_lowrank.errors import LowRankError

SPEC = [InputSpec("input", np.dtype(np.float32), (None, 3, 8, 8))]


class Reader(CalibrationDataReader):
    def __init__(self, x, batch):
        self.x, self.batch, self.i = x, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += self.batch
        return {"input": self.x[self.i - self.batch:self.i]}

    def rewind(self):
        self.i = 0


def _data(n=23):
    return np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("batch", [1, 4, 7, 30])
def test_rebatching_preserves_order_and_limit(batch):
    x = _data()
    src = open_source([{"input": x[i:i + 5]} for i in range(0, len(x), 5)], SPEC)
    got = list(src.batches(batch))
    assert all(len(b["input"]) == batch for b in got[:-1]) and 0 < len(got[-1]["input"]) <= batch
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in got]), x)
    limited = np.concatenate([b["input"] for b in src.batches(batch, limit=10)])
    np.testing.assert_array_equal(limited, x[:10])
    # a FeedSource can be iterated again: every pass sees the same data
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in src.batches(batch)]), x)


def test_reader_iterable_dict_and_npz_give_identical_models(tmp_path):
    model = conv_chain([3, 16, 16], size=8, seed=2, lowrank_bias=6)
    x = _data(20)
    np.savez(tmp_path / "c.npz", input=x)
    np.save(tmp_path / "c.npy", x)
    sources = [Reader(x, 3), [{"input": x[i:i + 6]} for i in range(0, 20, 6)], {"input": x},
               str(tmp_path / "c.npz"), str(tmp_path / "c.npy")]
    models = [onnx_lowrank.compress(model, s, ranks={"conv1": 4}, speedup=None, method="linear").model
              for s in sources]
    blobs = {m.SerializeToString() for m in models}
    assert len(blobs) == 1


def test_float64_inputs_are_cast_but_ints_rejected():
    x = _data(4).astype(np.float64)
    src = open_source({"input": x}, SPEC)
    assert next(src.batches(4))["input"].dtype == np.float32
    with pytest.raises(LowRankError, match="expects float32"):
        open_source({"input": np.zeros((2, 3, 8, 8), dtype=bool)}, SPEC)


def test_empty_reader_is_an_error():
    with pytest.raises(LowRankError, match="no samples"):
        open_source(Reader(_data(0), 2), SPEC)


def test_feedsource_total():
    src = FeedSource(lambda: iter([{"input": _data(5)}]), "x", 5)
    assert src.total() == 5 and src.total(3) == 3
