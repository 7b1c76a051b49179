"""The nonlinear loop's M step (solver/mstep.py) against the plain computations it replaces."""

import numpy as np
import pytest

import onnx_lowrank.solver.mstep as ms
from onnx_lowrank.solver.activations import Activation
from onnx_lowrank.solver.nonlinear import nonlinear_reconstruction
from onnx_lowrank.solver.reconstruction import _RRR, reduced_rank_regression


def _data(n, d, seed):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, d)) * np.exp(-np.arange(d) / (d / 4))) @ np.linalg.qr(
        rng.standard_normal((d, d)))[0] + rng.standard_normal(d)
    Z = X @ rng.standard_normal((d, d)) * 0.3 + np.tanh(X) + 0.05 * rng.standard_normal((n, d))
    return X, Z


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("rank", [3, 20])
def test_whitened_fit_is_the_reduced_rank_regression(rank, with_offset):
    """Float32 products on whitened inputs: the same regression as the float64 one, to float32 precision."""
    X, Z = _data(500, 40, rank)
    off = np.random.default_rng(1).standard_normal(Z.shape) if with_offset else None
    want = reduced_rank_regression(Z if off is None else Z - off, X, rank)
    rrr = _RRR(X, 1e-6)
    got = ms.WhitenedFit(rrr.Xc, rrr.xbar, rrr.V, rrr.inv, rrr.sqrt_s, off, rank).fit(Z)
    scale = np.abs(want.predict(X)).max()
    np.testing.assert_allclose(got.predict(X), want.predict(X), atol=1e-4 * scale)
    np.testing.assert_allclose(got.P.T @ got.P, np.eye(rank), atol=1e-6)


def _spectrum_matrix(d, seed, gap_at=None):
    rng = np.random.default_rng(seed)
    V = np.linalg.qr(rng.standard_normal((d, d)))[0]
    w = np.exp(-np.arange(d) / 15.0)
    if gap_at is not None:
        w[gap_at:] *= 0.5
    return (V * w) @ V.T


@pytest.mark.parametrize("rank", [5, 16])
def test_warm_eigensolver_captures_the_top_energy_of_each_matrix(rank, monkeypatch):
    """A drifting sequence of matrices: each answer captures the energy of the exact top-r eigenvectors
    (within the stop tolerance of the energy left out) and spans them where the spectrum has a gap."""
    monkeypatch.setattr(ms, "WARM_MIN_D", 50)
    d = 120
    G0, E = _spectrum_matrix(d, 0, gap_at=rank), _spectrum_matrix(d, 1)
    eig = ms.WarmEig(d, rank, rows=1000)
    assert eig.warm
    for t in range(6):
        G = G0 + 0.02 * t * E
        U = eig.top(G)
        w, V = np.linalg.eigh(G)
        best, rest = w[::-1][:rank].sum(), w[::-1][rank:].sum()
        got = np.trace(U.T @ G @ U)
        np.testing.assert_allclose(U.T @ U, np.eye(rank), atol=1e-10)
        assert best - got <= 10 * ms.WARM_TOL * rest + 1e-12 * best
        top = V[:, ::-1][:, :rank]
        np.testing.assert_allclose(U @ U.T, top @ top.T, atol=1e-3)
    assert eig.steps and max(eig.steps) < ms.WARM_MAX_STEPS


def test_narrow_layers_take_the_full_eigendecomposition():
    assert not ms.WarmEig(100, 10, rows=1000).warm          # narrower than WARM_MIN_D
    assert not ms.WarmEig(1024, 600, rows=10000).warm       # rank too large a share
    assert not ms.WarmEig(1024, 64, rows=150).warm           # too few rows for the rank


@pytest.mark.parametrize("kind", ["gelu", "relu"])
def test_nonlinear_loop_with_the_warm_eigensolver_matches_the_full_one(kind, monkeypatch):
    """The whole loop, warm-started eigenvectors against a full eigh per step: the same final loss."""
    X, _ = _data(1500, 120, 3)
    Y = X + 0.1 * np.random.default_rng(4).standard_normal(X.shape)
    act = Activation(kind, {})
    full, info_full = nonlinear_reconstruction(Y, 10, act, Yhat=X, schedule=[(6, 0.01), (6, 1.0)], tol=0)
    monkeypatch.setattr(ms, "WARM_MIN_D", 50)
    calls = []
    krylov = ms._block_krylov
    monkeypatch.setattr(ms, "_block_krylov", lambda *a: calls.append(1) or krylov(*a))
    warm, info_warm = nonlinear_reconstruction(Y, 10, act, Yhat=X, schedule=[(6, 0.01), (6, 1.0)], tol=0)
    assert len(calls) == info_warm.iterations and info_warm.loss_final < info_warm.loss_linear
    np.testing.assert_allclose(info_warm.loss_final, info_full.loss_final, rtol=1e-3)


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("rank", [3, 30])
def test_prediction_through_the_whitened_inputs_is_the_fits_prediction(rank, with_offset):
    """``fit(..., predict=out)`` writes the returned factorisation's float64 prediction on the fitted rows (plus the
    offset), to float32 precision, through both product orders (rank below and above half the width), over
    several blocks of rows and with a near-dead input channel."""
    X, Z = _data(3000, 40, rank)
    X[:, 7] = X[:, 7] * 1e-5 + 2.0
    off = np.random.default_rng(2).standard_normal(Z.shape) if with_offset else None
    rrr = _RRR(X, 1e-6)
    fit = ms.WhitenedFit(rrr.Xc, rrr.xbar, rrr.V, rrr.inv, rrr.sqrt_s, off, rank)
    fit.block = 256
    out = np.full(Z.shape, np.nan)
    f = fit.fit(Z, predict=out)
    want = f.predict(X) + (0.0 if off is None else off)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())
