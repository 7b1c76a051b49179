"""Blocked Gram, sketched spectrum and float32 propagation against brute force (NumPy on the whole rows)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.solver import gram
from onnx_lowrank.solver import reconstruction as R
from onnx_lowrank.solver.reconstruction import Factorisation, centred_gram, pca_rows, response_spectrum


def _brute(Y, rows):
    Z = np.asarray(Y[rows], dtype=np.float64)
    Zc = Z - Z.mean(axis=0)
    return Z.mean(axis=0), Zc.T @ Zc


def _low_rank(n=3000, d=900, k=60, seed=1):
    rng = np.random.default_rng(seed)
    y = (rng.standard_normal((n, k)) * np.logspace(0, -3, k)) @ rng.standard_normal((k, d)) + 2.0
    return y.astype(np.float32), rng.random(n) < 0.8


@pytest.mark.parametrize("block", [gram.GRAM_BLOCK, 1000])
def test_centred_gram_of_masked_float32_rows_is_the_brute_force_one(monkeypatch, block):
    monkeypatch.setattr(gram, "GRAM_BLOCK", block)   # 1000: blocks of 256 rows (many blocks, mirrored in pieces)
    Y, rows = _low_rank(n=2000, d=300)
    mean, G, n = centred_gram(Y, rows)
    ref_mean, ref = _brute(Y, rows)
    assert n == rows.sum() and (G == G.T).all()
    assert np.allclose(mean, ref_mean, rtol=0, atol=1e-12)
    assert np.abs(G - ref).max() <= 1e-12 * np.abs(ref).max()


def test_centred_gram_leaves_float64_rows_alone():
    Y = np.random.default_rng(0).standard_normal((600, 40))
    before = Y.copy()
    centred_gram(Y)
    assert (Y == before).all()


def test_pca_rows_spans_the_top_eigenvectors():
    Y, rows = _low_rank(n=2000, d=300)
    f = pca_rows(Y, rows, 10)
    _, ref = _brute(Y, rows)
    w, V = np.linalg.eigh(ref)
    U = V[:, ::-1][:, :10]
    assert np.abs(f.P @ f.P.T - U @ U.T).max() < 1e-8


def test_spectrum_without_a_bound_is_the_brute_force_one():
    Y, rows = _low_rank(n=1500, d=200, k=200)
    ref = np.clip(np.linalg.eigvalsh(_brute(Y, rows)[1] / rows.sum())[::-1], 0, None)
    assert np.abs(response_spectrum(Y, rows) - ref).max() <= 1e-12 * ref[0]


def test_a_rank_bound_gives_the_same_spectrum_from_a_sketch():
    """Responses of 60 inputs in 900 channels: the sketch's eigenvalues are the covariance's top 60 (to the
    float32 rounding of the samples, relative to the smallest of them), the rest are 0 (round-off before)."""
    Y, rows = _low_rank()
    ref = np.clip(np.linalg.eigvalsh(_brute(Y, rows)[1] / rows.sum())[::-1], 0, None)
    got = response_spectrum(Y, rows, bound=60)
    assert got.shape == ref.shape and (np.diff(got) <= 0).all()
    assert np.abs(got[:60] - ref[:60]).max() <= 1e-5 * ref[59]
    assert (got[70:] == 0).all() and ref[60:].sum() < 1e-9 * ref.sum()


def test_float32_maps_are_transformed_in_float32_like_the_float64_reference():
    rng = np.random.default_rng(2)
    d, r = 64, 12
    f = Factorisation(rng.standard_normal((d, r)), rng.standard_normal((d, r)), rng.standard_normal(d))
    maps = rng.standard_normal((3, d, 50)).astype(np.float32)
    ref = f.apply_channels(maps.astype(np.float64))
    got = f.apply_channels(maps)
    assert ref.dtype == np.float64 and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    rows = f.predict(maps.transpose(0, 2, 1).reshape(-1, d)).reshape(3, 50, d).transpose(0, 2, 1)
    assert np.abs(ref - rows).max() <= 1e-12 * np.abs(ref).max()


def test_pca_with_a_rank_bound_skips_the_gram_and_finds_the_same_directions(monkeypatch):
    Y, rows = _low_rank()
    full = pca_rows(Y, rows, 20)
    monkeypatch.setattr(R, "centred_gram", None)   # the sketch must not need it
    sketched = pca_rows(Y, rows, 20, bound=60)
    assert np.abs(full.P @ full.P.T - sketched.P @ sketched.P.T).max() < 1e-6
    assert np.abs(full.b - sketched.b).max() < 1e-6 * np.abs(full.b).max()


def test_a_repeated_sketch_is_the_first_one_until_the_rows_change():
    """The spectrum then the PCA of the same rows take one sketch (the second call computes nothing); rows written
    in place, another mask or another array are sketched anew (each checked against a fresh computation)."""
    Y, rows = _low_rank(n=1200, d=400, k=30)
    first = gram._sketch(Y, rows, 40)
    calls = []
    real = gram._sketch_rows
    gram._sketch_rows = lambda *a: calls.append(1) or real(*a)
    try:
        again = gram._sketch(Y, rows, 40)
        assert not calls
        for a, b in zip(first[:2], again[:2]):
            np.testing.assert_array_equal(a, b)
        again[1][:] = 0.0  # the caller's copy: the kept result is untouched
        np.testing.assert_array_equal(gram._sketch(Y, rows, 40)[1], first[1])
        Y[5, 7] += 1.0
        other = rows.copy()
        other[3] = not other[3]
        for args in ((Y, rows, 40), (Y, other, 40), (Y.copy(), rows, 40), (Y, rows, 41)):
            n_before = len(calls)
            got = gram._sketch(*args)
            want = real(*args)
            assert len(calls) == n_before + 1
            np.testing.assert_array_equal(got[1], want[1])
    finally:
        gram._sketch_rows = real


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("bound", [None, 30])
def test_non_finite_responses_are_refused_by_name_not_by_eigh(bad, bound):
    """Responses with a NaN or inf (the model overflows on the calibration data): the spectrum and the PCA, through
    the Gram or the sketch, say so instead of failing in eigh ("Eigenvalues did not converge")."""
    Y, rows = _low_rank(n=1200, d=400, k=20)
    Y[7, 3], rows[7] = bad, True
    with pytest.raises(ValueError, match="non-finite"):
        response_spectrum(Y, rows, bound)
    with pytest.raises(ValueError, match="non-finite"):
        pca_rows(Y, rows, 10, bound)
