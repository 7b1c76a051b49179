"""--max-memory: the samples kept are bounded, each layer keeps its share, the report says so.

The truth is the sampled arrays themselves (their bytes), and row counts counted by hand: 10 images,
2 held back, 36 positions per 6 x 6 map; d = 8, 64, 16 channels.
"""

from __future__ import annotations

import numpy as np
import pytest

from builders import conv_chain

from onnx_lowrank.compressor import Compressor
from onnx_lowrank.config import CompressConfig, parse_size
from onnx_lowrank.errors import LowRankError

WIDTHS = [4, 8, 64, 16]
FAST = dict(method="linear", speedup=None, ranks={"conv0": 2, "conv1": 8, "conv2": 4})


def _compressor(**cfg):
    data = {"input": np.random.default_rng(0).standard_normal((10, 4, 6, 6)).astype(np.float32)}
    return Compressor(conv_chain(WIDTHS, size=6, seed=2, lowrank_bias=4), data, CompressConfig(**FAST, **cfg))


@pytest.mark.parametrize("text,value", [("512M", 512 * 2 ** 20), ("4G", 4 * 2 ** 30), ("1.5g", 3 * 2 ** 29),
                                        ("300KB", 300 * 1024), ("2GiB", 2 * 2 ** 30), (1000, 1000), ("1000", 1000)])
def test_sizes_parse(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["abc", "0", "-1G", 0, True, "4X", ""])
def test_bad_sizes_are_refused_with_the_option_name(bad):
    with pytest.raises(LowRankError, match="--max-memory"):
        _compressor(max_memory=bad)


def _kept_bytes(comp) -> int:
    return sum(a.nbytes for a in comp.samples.rows.values())


def test_default_does_not_bind_on_small_data():
    comp = _compressor()
    report = comp.run().report
    assert report["rows_limited_by_memory"] is False
    # 'auto' on 8 fitted images: ceil(16 d / 8) = 2 d positions, capped at 36: 16, 36, 32 per image
    assert [lay["rows"] for lay in report["layers"]] == [8 * 16, 8 * 36, 8 * 32]
    assert report["samples_bytes"] == _kept_bytes(comp)


def _solve_bytes(comp) -> int:
    """By hand: a linear fit (``method="linear"``) of a 3 x 3 Conv (fitted on approximated inputs, or on its
    core's response where the rows are too few: an array like them either way) holds 6 float64 arrays of the widest layer's fitted rows (8 of 10 images) and 6 (d, d) matrices; plus two
    layers' float32 rows of the approximated samples; conv1 (64 channels) is the widest, with no shortcut."""
    rows = comp.samples.rows[f"{1}:{comp.layers[1].output}"]
    assert rows.shape[1] == 64
    return 8 * 6 * (len(rows) * 8 // 10) * 64 + 8 * 6 * 64 * 64 + 2 * 4 * len(rows) * 64


def test_a_small_cap_bounds_the_rows_and_holds():
    free = _compressor()
    need = _kept_bytes(free) + _solve_bytes(free)
    assert free.memory["samples_and_solve_bytes"] == need
    cap = need // 3
    comp = _compressor(max_memory=cap)
    report = comp.run().report
    assert report["rows_limited_by_memory"] is True and report["max_memory_bytes"] == cap
    assert _kept_bytes(comp) + _solve_bytes(comp) <= cap
    assert report["samples_bytes"] == _kept_bytes(comp)
    rows = [lay["rows"] for lay in report["layers"]]
    assert all(r <= full for r, full in zip(rows, [8 * 16, 8 * 36, 8 * 32]))
    assert sum(rows) < 8 * (16 + 36 + 32)
    assert all(r >= 8 for r in rows)          # at least one position per fitted image


def test_a_cap_too_small_for_one_position_per_image_is_an_error():
    with pytest.raises(LowRankError, match="--max-memory .* one sampled position per image"):
        _compressor(max_memory=100)


def test_joining_the_sampled_pieces_holds_them_about_once():
    """The peak while the per-batch pieces become one array per layer is the pieces plus one layer's
    array, not twice the samples (measured by tracemalloc, which sees numpy's buffers)."""
    import tracemalloc

    from onnx_lowrank.calibration.sampling import _joined

    sizes = [1 << 20] * 8   # 8 layers of 1 MiB each, in 16 pieces of 64 KiB
    tracemalloc.start()
    try:
        pieces = {f"k{i}": [np.ones(s // 4 // 16, np.float32) for _ in range(16)] for i, s in enumerate(sizes)}
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        joined = _joined(pieces)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert pieces == {}
    assert [a.nbytes for a in joined.values()] == sizes and all(np.all(a == 1) for a in joined.values())
    assert peak <= max(sizes) + (64 << 10), f"peak {peak} bytes above the samples ({sum(sizes)}) plus one layer"


def test_the_asymmetric_cache_keeps_in_memory_only_what_the_samples_leave(monkeypatch):
    """Samples + the largest solve + cached feature maps stay within --max-memory; what does not fit goes to disk, same output."""
    from onnx_lowrank.calibration import sampling

    held: list[int] = []
    save = sampling.Propagator._save

    def spy(self, b, name, a):
        save(self, b, name, a)
        held.append(self._mem_bytes)

    monkeypatch.setattr(sampling.Propagator, "_save", spy)
    free = _compressor()
    kept = _kept_bytes(free)
    unbounded = free.run().model.SerializeToString()
    assert max(held) > 4096   # with the default cap the cache holds more than the tight cap below leaves
    held.clear()
    tight = _compressor(max_memory=kept + _solve_bytes(free) + 4096)
    assert _kept_bytes(tight) == kept   # the samples fit: only the cache is squeezed
    assert tight.run().model.SerializeToString() == unbounded
    assert held and max(held) <= 4096


@pytest.mark.parametrize("expected", [None, 42, 50, 7])
def test_rows_kept_in_final_arrays_are_the_rows_joined_from_pieces(expected):
    """Knowing the image count (exact, too high or too low) changes how rows are kept, never which:
    the truth is the rows gathered batch by batch and joined."""
    import tracemalloc

    from onnx_lowrank.calibration.sampling import SampledTensor, _Sampler, gather

    rng = np.random.default_rng(3)
    sizes = [4] * 10 + [2]
    batches = [rng.standard_normal((n, 32, 16, 16)).astype(np.float32) for n in sizes]
    starts = np.cumsum([0] + sizes[:-1])
    tensors = [SampledTensor("a", 0), SampledTensor("a", 1)]
    k = {0: 40, 1: 300}   # 300 > 256 positions: every position of layer 1
    truth = {t.key: np.concatenate([gather(b, seen, t.layer_id, 0, k[t.layer_id]) for b, seen in
                                    zip(batches, starts)]) for t in tensors}
    sampler = _Sampler(tensors, 0, k, expected=expected)
    tracemalloc.start()
    try:
        for b in batches:
            sampler.add(len(b), lambda name, b=b: b)
        got = sampler.result()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.images == 42 and set(got.rows) == set(truth)
    for key in truth:
        np.testing.assert_array_equal(got.rows[key], truth[key])
        np.testing.assert_array_equal(got.image[key], np.repeat(np.arange(42), len(truth[key]) // 42))
    kept = sum(a.nbytes for a in truth.values())
    if expected == 42:   # exactly known: the rows are never held twice (slack: one batch's gathering)
        assert peak <= kept + 4 * batches[0].nbytes < 2 * kept, (peak, kept)


def _traced_run(model, data, cfg) -> tuple[int, int, bool]:
    """(traced peak of the compress's run() beyond what was held before it, bytes of the samples, limited):
    tracemalloc sees every NumPy buffer (samples, cached maps, the solver's arrays), not the tool's accounting."""
    import tracemalloc

    tracemalloc.start()
    try:
        comp = Compressor(model, data, cfg)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        report = comp.run().report
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, _kept_bytes(comp), report["rows_limited_by_memory"]


def test_the_nonlinear_asymmetric_compress_stays_within_the_cap():
    """Samples + everything the asymmetric nonlinear solve allocates stay within --max-memory (before, the cap
    bounded the samples only and the solve's float64 copies came on top: 8 x the samples here), and what the
    run holds grows no faster than the cap: the part the cap does not bound (one batch of feature maps, the
    rewritten model) is fixed."""
    from onnx_lowrank.config import CompressConfig

    cfg = dict(method="nonlinear", speedup=None, ranks={"conv0": 24, "conv1": 32, "conv2": 24}, threads=1,
               schedule=((2, 0.01), (2, 1.0)))
    data = {"input": np.random.default_rng(0).standard_normal((20, 8, 12, 12)).astype(np.float32)}
    model = conv_chain([8, 96, 128, 96], size=12, seed=2, lowrank_bias=8)
    need = Compressor(model, data, CompressConfig(**cfg)).memory["samples_and_solve_bytes"]
    totals = {}
    for cap in (need, need // 2, need // 8):
        peak, kept, limited = _traced_run(model, data, CompressConfig(**cfg, max_memory=cap))
        assert limited is (cap < need)
        totals[cap] = peak + kept
        if cap >= need // 2:
            assert peak + kept <= cap, f"{(peak + kept) / cap:.2f} x --max-memory {cap}"
    assert totals[need // 2] - totals[need // 8] <= need // 2 - need // 8


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k", [3, 20, 21])
def test_gather_takes_each_images_drawn_positions_channel_vectors(channels_last, k):
    """Against a loop over images and positions: row j of image i is the channel vector at the j-th position
    sample_positions draws (all 20 positions, in order, once k reaches them), channels first or last."""
    from onnx_lowrank.calibration.sampling import gather, sample_positions, to_channels_first

    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 4, 5, 6)).astype(np.float32) if channels_last else \
        rng.standard_normal((3, 6, 4, 5)).astype(np.float32)
    batch = to_channels_first(a) if channels_last else a
    got = gather(batch, 2, 9, 1, k)
    want = []
    for i in range(3):
        for p in sample_positions(1, 9, 2 + i, 20, k):
            want.append([a[i].reshape(20, 6)[p, ch] if channels_last else a[i, ch].reshape(20)[p] for ch in range(6)])
    assert got.shape == (3 * min(k, 20), 6)
    np.testing.assert_array_equal(got, np.array(want, dtype=np.float32))
