"""Sampled positions per layer: 'auto' sizes them from the layer's width, an explicit N is kept.

Expected row counts are counted by hand from the data layout: with 10 calibration images, images
4 and 9 are held back (every 5th), so 8 images are fitted; each output map is 6 x 6 = 36 positions.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from builders import conv_chain

from onnx_lowrank import sampling_plan as samples
from onnx_lowrank.compressor import Compressor
from onnx_lowrank.config import CompressConfig

WIDTHS = [4, 8, 64, 16]       # output channels d = 8, 64, 16
POSITIONS = 36
FAST = dict(method="linear", speedup=None, ranks={"conv0": 2, "conv1": 8, "conv2": 4})


def _data(n, seed=0):
    return {"input": np.random.default_rng(seed).standard_normal((n, 4, 6, 6)).astype(np.float32)}


def _rows(n_images, **cfg):
    model = conv_chain(WIDTHS, size=6, seed=2, lowrank_bias=4)
    comp = Compressor(model, _data(n_images), CompressConfig(**FAST, **cfg))
    report = comp.run().report
    return {lay["name"]: lay["rows"] for lay in report["layers"]}, comp, report


def test_auto_reaches_rows_per_channel_or_all_positions():
    m = samples.ROWS_PER_CHANNEL
    rows, _, report = _rows(10)
    assert report["samples_per_image"] == "auto"
    for name, d in zip(["conv0", "conv1", "conv2"], WIDTHS[1:]):
        if m * d <= 8 * POSITIONS:
            # enough rows, and not more than one more position per image beyond what was needed
            assert m * d <= rows[name] < m * d + 8, (name, rows[name])
        else:
            assert rows[name] == 8 * POSITIONS, (name, rows[name])
    assert rows["conv1"] == 8 * POSITIONS      # 64 channels need more than the 288 positions there are


def test_auto_never_below_the_old_floor():
    rows, _, _ = _rows(40)                    # 32 fitted images: 16 x 8 rows would need only 4 per image
    assert rows["conv0"] == 32 * samples.MIN_SAMPLES_PER_IMAGE


@pytest.mark.parametrize("n, per_image", [(3, 3), (100, POSITIONS)])
def test_explicit_samples_per_image_is_kept_for_every_layer(n, per_image):
    rows, _, report = _rows(10, samples_per_image=n)
    assert report["samples_per_image"] == n
    assert set(rows.values()) == {8 * per_image}


def test_auto_sampling_is_deterministic_and_keyed_by_seed():
    _, a, ra = _rows(10)
    _, b, rb = _rows(10)
    _, c, _ = _rows(10, seed=1)
    assert a.samples.rows.keys() == b.samples.rows.keys()
    for key in a.samples.rows:
        np.testing.assert_array_equal(a.samples.rows[key], b.samples.rows[key])
    assert a.run().model.SerializeToString() == b.run().model.SerializeToString()
    wide = next(k for k in a.samples.rows if k.endswith(":c2"))
    assert not np.array_equal(a.samples.rows[wide], c.samples.rows[wide])


def test_cli_rejects_a_bad_samples_per_image(tmp_path):
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(conv_chain(WIDTHS, size=6, seed=2), model)
    np.savez(tmp_path / "c.npz", **_data(4))
    out = tmp_path / "out.onnx"
    p = subprocess.run([sys.executable, "-m", "onnx_lowrank", "compress", str(model), "--calib",
                        str(tmp_path / "c.npz"), "-o", str(out), "--samples-per-image", "many", "-q"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--samples-per-image" in p.stderr
    assert not out.exists()


def test_cli_help_states_the_auto_rule():
    from click.testing import CliRunner

    from onnx_lowrank.cli import main

    text = " ".join(CliRunner().invoke(main, ["compress", "--help"]).output.split())
    assert f"at least {samples.ROWS_PER_CHANNEL} fitted rows per output channel" in text
    assert f"never fewer than {samples.MIN_SAMPLES_PER_IMAGE}" in text
