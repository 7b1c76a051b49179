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
    for dtype in (np.uint8, np.int8, np.uint16, np.int32):   # raw pixels: never cast silently
        ints = np.ones((2, 3, 8, 8), dtype=dtype)
        with pytest.raises(LowRankError, match=r"x.astype\('float32'\) / 255"):
            open_source({"input": ints}, SPEC)
        with pytest.raises(LowRankError, match="evaluation input"):
            open_source([{"input": ints}], SPEC, role="evaluation")


def test_extra_arrays_are_ignored_with_one_note_and_missing_ones_refused(capsys):
    from onnx_lowrank import progress

    progress.set_enabled(True)
    x = _data(6)
    label = np.arange(6)
    for data in ({"input": x, "label": label}, [{"input": x[:3], "label": label[:3]}, {"input": x[3:], "id": label[3:]}]):
        src = open_source(data, SPEC)
        batches = list(src.batches(4))
        assert all(set(b) == {"input"} for b in batches)
        np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), x)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "note: calibration data arrays: ignoring 'label' (not a model input)"
    assert err[1].startswith("note: calibration data iterable of feed dicts: ignoring 'id', 'label'")
    assert len(err) == 2   # one note per source, not one per feed
    for role in ("calibration", "evaluation"):
        with pytest.raises(LowRankError, match=f"{role} data arrays has no array for model input"):
            open_source({"images": x, "label": label}, SPEC, role=role)


def test_empty_reader_is_an_error():
    with pytest.raises(LowRankError, match="no samples"):
        open_source(Reader(_data(0), 2), SPEC)


def test_feedsource_total():
    src = FeedSource(lambda: iter([{"input": _data(5)}]), "x", 5)
    assert src.total() == 5 and src.total(3) == 3
