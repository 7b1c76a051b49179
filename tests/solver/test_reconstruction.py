"""Linear, asymmetric and nonlinear reconstruction (method.md sections 2-4)."""

import numpy as np
import pytest
from scipy.optimize import minimize

from onnx_lowrank.solver.activations import Activation, z_step
from onnx_lowrank.solver.nonlinear import nonlinear_reconstruction
from onnx_lowrank.solver.reconstruction import (
    Factorisation,
    linear_reconstruction,
    reduced_rank_regression,
    response_spectrum,
)


def _responses(n, d, rng, decay=8.0, shift=0.3):
    """Layer-like responses: anisotropic spectrum (eigenvalues decaying over ~decay channels),
    a non-zero mean, so that low rank captures most but not all of the energy."""
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scales = np.exp(-np.arange(d) / decay) + 0.02
    return (rng.standard_normal((n, d)) * scales) @ basis.T + shift * rng.standard_normal(d)


def _rrr_objective(Z, X, fz: Factorisation) -> float:
    return float(np.sum((Z - fz.predict(X)) ** 2))


def test_symmetric_full_rank_is_exact():
    rng = np.random.default_rng(0)
    Y = _responses(300, 12, rng)
    f = linear_reconstruction(Y, 12)
    np.testing.assert_allclose(f.predict(Y), Y, atol=1e-10)
    assert f.P.shape == f.Q.shape == (12, 12) and f.b.shape == (12,) and f.rank == 12


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_pca_residual_is_the_discarded_energy(rank):
    rng = np.random.default_rng(rank)
    n, d = 500, 10
    Y = _responses(n, d, rng)
    spec = response_spectrum(Y)
    assert spec.shape == (d,) and np.all(np.diff(spec) <= 0) and np.all(spec >= 0)
    f = linear_reconstruction(Y, rank)
    np.testing.assert_allclose(f.P, f.Q)
    np.testing.assert_allclose(f.P.T @ f.P, np.eye(rank), atol=1e-12)
    resid = np.sum((Y - f.predict(Y)) ** 2) / n
    np.testing.assert_allclose(resid, spec[rank:].sum(), rtol=1e-9)
    # and the mean is reproduced exactly
    np.testing.assert_allclose(f.predict(Y).mean(axis=0), Y.mean(axis=0), atol=1e-12)


def _rrr_reference(Z, X, rank):
    """Reduced-rank regression computed differently: least squares by lstsq, then the best rank-r
    approximation of the fitted values by SVD (Eckart-Young)."""
    Xc, Zc = X - X.mean(0), Z - Z.mean(0)
    Mhat_T = np.linalg.lstsq(Xc, Zc, rcond=None)[0]
    _, _, Vt = np.linalg.svd(Xc @ Mhat_T, full_matrices=False)
    V = Vt[:rank].T
    M_T = Mhat_T @ V @ V.T
    b = Z.mean(0) - X.mean(0) @ M_T
    return Factorisation(P=np.eye(Z.shape[1]), Q=M_T, b=b)


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_partial_eigensolver_gives_the_pca_of_a_full_decomposition(rank, monkeypatch):
    """Few of many eigenvectors come from Lanczos (large d); lowered thresholds let a small case take that
    path: the PCA it gives spans what a full eigendecomposition gives and leaves the same residual."""
    import onnx_lowrank.solver.reconstruction as rec

    rng = np.random.default_rng(rank)
    Y = _responses(400, 200, rng, decay=20.0)
    full = linear_reconstruction(Y, rank)
    monkeypatch.setattr(rec, "PARTIAL_MIN_D", 100)
    calls = []
    lanczos = rec._lanczos_top
    monkeypatch.setattr(rec, "_lanczos_top", lambda G, r: calls.append(r) or lanczos(G, r))
    part = linear_reconstruction(Y, rank)
    assert calls == [rank]
    np.testing.assert_allclose(part.P @ part.P.T, full.P @ full.P.T, atol=1e-9)
    np.testing.assert_allclose(part.predict(Y), full.predict(Y), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(part.P, axis=0), 1.0, atol=1e-12)


def test_partial_eigensolver_is_not_used_on_too_few_rows(monkeypatch):
    """Fewer rows than twice the rank: a repeated zero eigenvalue Lanczos cannot resolve; the full
    decomposition answers (and the PCA still reconstructs the rows exactly at their rank)."""
    import onnx_lowrank.solver.reconstruction as rec

    rng = np.random.default_rng(3)
    Y = _responses(13, 200, rng)
    monkeypatch.setattr(rec, "PARTIAL_MIN_D", 100)
    monkeypatch.setattr(rec, "_lanczos_top", lambda G, r: pytest.fail("Lanczos on a rank-deficient matrix"))
    f = linear_reconstruction(Y, 12)
    np.testing.assert_allclose(f.predict(Y), Y, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 4])
def test_reduced_rank_regression_is_optimal(rank):
    rng = np.random.default_rng(10 + rank)
    n, d = 400, 8
    X = _responses(n, d, rng)
    Z = np.tanh(X @ rng.standard_normal((d, d))) + 0.1 * rng.standard_normal((n, d)) + 1.0
    f = reduced_rank_regression(Z, X, rank, ridge=0.0)
    assert f.rank == rank and np.linalg.matrix_rank(f.P @ f.Q.T) == rank
    obj = _rrr_objective(Z, X, f)
    ref = _rrr_objective(Z, X, _rrr_reference(Z, X, rank))
    np.testing.assert_allclose(obj, ref, rtol=1e-10)
    # the default ridge changes nothing visible
    np.testing.assert_allclose(_rrr_objective(Z, X, reduced_rank_regression(Z, X, rank)), ref, rtol=1e-6)

    # no rank-r competitor does better: random ones, perturbations, and a local optimiser
    for _ in range(20):
        P, Q = f.P + 0.05 * rng.standard_normal((d, rank)), f.Q + 0.05 * rng.standard_normal((d, rank))
        pred = X @ Q @ P.T
        b = (Z - pred).mean(0)
        assert np.sum((Z - pred - b) ** 2) >= obj
    def loss(theta):
        P, Q = theta[: d * rank].reshape(d, rank), theta[d * rank :].reshape(d, rank)
        pred = X @ Q @ P.T
        return np.sum((Z - pred - (Z - pred).mean(0)) ** 2)

    start = rng.standard_normal(2 * d * rank) * 0.1
    res = minimize(loss, start, method="L-BFGS-B", options={"maxiter": 3000})
    assert res.fun >= obj * (1 - 1e-7)
    assert res.fun <= obj * 1.01  # the brute-force search does reach the same optimum


def test_reduced_rank_regression_on_itself_is_pca():
    rng = np.random.default_rng(3)
    Y = _responses(400, 9, rng)
    a = reduced_rank_regression(Y, Y, 4, ridge=0.0)
    b = linear_reconstruction(Y, 4)
    np.testing.assert_allclose(a.predict(Y), b.predict(Y), atol=1e-9)


def test_dead_channels_give_finite_results():
    rng = np.random.default_rng(4)
    n, d = 600, 16
    Y = _responses(n, d, rng)
    Y[:, [2, 5, 11]] = 0.0
    Y[:, 7] = 3.0  # constant, not zero
    for fz in (
        linear_reconstruction(Y, 4),
        linear_reconstruction(Y, 4, Yhat=Y + 0.01 * rng.standard_normal((n, d)) * (Y != 0)),
        reduced_rank_regression(np.maximum(Y, 0), Y, 16),
        nonlinear_reconstruction(Y, 4, Activation.relu(), schedule=((3, 0.01), (3, 1.0)))[0],
        nonlinear_reconstruction(Y, 4, Activation.silu(), schedule=((2, 0.01),))[0],
    ):
        for arr in (fz.P, fz.Q, fz.b, fz.predict(Y)):
            assert np.all(np.isfinite(arr))
    dead = np.zeros((n, d))
    fz, info = nonlinear_reconstruction(dead, 2, Activation.relu(), schedule=((2, 0.01),))
    assert np.all(np.isfinite(fz.predict(dead))) and info.loss_final == 0.0


def _relu_layer(n, rng, d=64):
    X = _responses(n, d, rng, decay=6.0, shift=0.0)
    return X + 0.4  # ReLU cuts a good part of every channel


def test_nonlinear_beats_linear_on_relu_layer():
    """Pre-activations biased negative (about 60% cut by the ReLU): PCA spends rank on variance
    the ReLU throws away, the nonlinear solution does not."""
    rng = np.random.default_rng(5)
    d, rank = 64, 8
    Y = 3.0 * _responses(6000, d, rng, decay=6.0, shift=0.0) - 1.0
    fit, held = Y[:5000], Y[5000:]
    relu = Activation.relu()
    lin = linear_reconstruction(fit, rank)
    nl, info = nonlinear_reconstruction(fit, rank, relu)
    assert info.iterations == 50 and len(info.objective) == 50
    assert info.loss_final < 0.95 * info.loss_linear

    def err(f, Yp):
        return np.sum((relu.apply(Yp) - relu.apply(f.predict(Yp))) ** 2)

    np.testing.assert_allclose(err(lin, fit), info.loss_linear, rtol=1e-10)
    np.testing.assert_allclose(err(nl, fit), info.loss_final, rtol=1e-10)
    assert err(nl, held) < 0.97 * err(lin, held)


@pytest.mark.parametrize("kind", ["relu", "leaky_relu", "silu", "hardswish"])
def test_relaxed_objective_never_increases_within_a_lambda(kind):
    rng = np.random.default_rng(6)
    act = {"relu": Activation.relu(), "leaky_relu": Activation.leaky_relu(0.1), "silu": Activation.silu(),
           "hardswish": Activation.hardswish()}[kind]
    Y = _relu_layer(1500, rng, 24)
    _, info = nonlinear_reconstruction(Y, 4, act, schedule=((8, 0.01), (8, 1.0)), tol=0.0)
    assert info.lambdas == [0.01] * 8 + [1.0] * 8
    obj = np.array(info.objective)
    # SiLU's z step keeps the better of its candidates by costs in float32 arithmetic, and the loop's predictions
    # are float32 products: at convergence the objective may then rise by float32 round-off of its sum
    rise = 1e-8 if kind == "silu" else 1e-9
    for seg in (obj[:8], obj[8:]):
        assert np.all(np.diff(seg) <= rise * np.abs(seg[:-1]))
    assert info.loss_final <= info.loss_linear


@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_a_stage_stops_when_the_objective_stops_improving(tol):
    """Each stage runs until an iteration improves the relaxed objective by less than ``tol``
    (relative), and no further; the full schedule (tol 0) reaches an objective at least as low."""
    rng = np.random.default_rng(6)
    Y = _relu_layer(1500, rng, 24)
    _, info = nonlinear_reconstruction(Y, 4, Activation.silu(), schedule=((25, 0.01), (25, 1.0)), tol=tol)
    _, full = nonlinear_reconstruction(Y, 4, Activation.silu(), schedule=((25, 0.01), (25, 1.0)), tol=0.0)
    lams = np.array(info.lambdas)
    obj = np.array(info.objective)
    for lam in (0.01, 1.0):
        seg = obj[lams == lam]
        gains = -np.diff(seg) / seg[:-1]
        assert seg.size == 25 or gains[-1] <= tol  # stopped because it stalled (or ran out)
        assert np.all(gains[:-1] > tol)  # and not before
    assert info.iterations < full.iterations == 50
    assert full.objective[-1] <= obj[-1] * (1 + 1e-9)


def test_relaxed_objective_matches_its_definition():
    """One iteration by hand: z step on the linear prediction, then the M step."""
    rng = np.random.default_rng(8)
    Y = _relu_layer(800, rng, 16)
    relu = Activation.relu()
    lam = 0.01
    lin = linear_reconstruction(Y, 3)
    A = relu.apply(Y)
    Z = z_step(A, lin.predict(Y), lam, relu)
    m = reduced_rank_regression(Z, Y, 3)
    expect = np.sum((A - relu.apply(Z)) ** 2) + lam * np.sum((Z - m.predict(Y)) ** 2)
    _, info = nonlinear_reconstruction(Y, 3, relu, schedule=((1, lam),))
    np.testing.assert_allclose(info.objective[0], expect, rtol=1e-9)


def test_never_worse_than_linear_and_identity_is_linear():
    rng = np.random.default_rng(9)
    Y = _relu_layer(500, rng, 12)
    lin = linear_reconstruction(Y, 3)
    f, info = nonlinear_reconstruction(Y, 3, Activation.identity())
    assert info.iterations == 0 and info.objective == []
    np.testing.assert_allclose(f.predict(Y), lin.predict(Y))
    # a huge lambda freezes z at the prediction: the iterations can only tie the linear loss
    _, info = nonlinear_reconstruction(Y, 3, Activation.relu(), schedule=((3, 1e8),))
    assert info.loss_final <= info.loss_linear


def test_offsets_are_a_residual_before_the_activation():
    rng = np.random.default_rng(11)
    n, d = 2000, 16
    Y = _relu_layer(n, rng, d)
    S = rng.standard_normal((n, d))
    relu = Activation.relu()
    f, info = nonlinear_reconstruction(Y, 4, relu, offset=S, schedule=((10, 0.01), (10, 1.0)))
    loss = np.sum((relu.apply(Y + S) - relu.apply(f.predict(Y) + S)) ** 2)
    np.testing.assert_allclose(loss, info.loss_final, rtol=1e-10)
    assert info.loss_final < info.loss_linear


def test_asymmetric_beats_symmetric_pca_on_the_approximated_input():
    rng = np.random.default_rng(12)
    n, d, rank = 3000, 20, 5
    Y = _responses(n, d, rng, decay=4.0)
    # the approximated network's responses: a mixed, scaled copy plus structured noise
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d))
    noise = rng.standard_normal((n, 3)) @ rng.standard_normal((3, d))
    Yhat = Y @ mix.T + 0.5 * noise
    asym = linear_reconstruction(Y, rank, Yhat=Yhat)
    sym = linear_reconstruction(Yhat, rank)
    held = slice(2000, None)
    asym_fit = linear_reconstruction(Y[:2000], rank, Yhat=Yhat[:2000])
    err = lambda f, s: np.sum((Y[s] - f.predict(Yhat[s])) ** 2)  # noqa: E731
    assert err(asym, slice(None)) < 0.5 * err(sym, slice(None))
    assert err(asym_fit, held) < 0.5 * err(sym, held)
    # the nonlinear asymmetric solve starts from that regression and keeps improving on it
    relu = Activation.relu()
    _, info = nonlinear_reconstruction(Y, rank, relu, Yhat=Yhat, schedule=((10, 0.01), (5, 1.0)))
    lin_loss = np.sum((relu.apply(Y) - relu.apply(asym.predict(Yhat))) ** 2)
    np.testing.assert_allclose(info.loss_linear, lin_loss, rtol=1e-8)
    assert info.loss_final < info.loss_linear


def test_input_validation():
    Y = np.zeros((10, 4))
    with pytest.raises(ValueError):
        linear_reconstruction(Y, 0)
    with pytest.raises(ValueError):
        linear_reconstruction(Y, 5)
    with pytest.raises(ValueError):
        linear_reconstruction(Y, 2, Yhat=np.zeros((10, 3)))
    with pytest.raises(ValueError):
        nonlinear_reconstruction(Y, 2, Activation.relu(), schedule=((3, 0.0),))
    Y[0, 0] = np.nan
    with pytest.raises(ValueError):
        response_spectrum(Y)


def test_held_back_rows_stop_the_loop_and_pick_the_best_held_iterate():
    """Few rows per channel (the fit overfits): with held-back rows the loop stops once their error stops
    improving and returns the iterate with the lowest held-back error, measured here independently."""
    from onnx_lowrank.solver.nonlinear import HELD_PATIENCE, HeldOut

    rng = np.random.default_rng(7)
    d, r = 60, 12
    Yall = _responses(260, d, rng, decay=15.0)
    Xall = Yall + 0.3 * rng.standard_normal(Yall.shape)
    act = Activation("gelu", {})
    Y, X, Yh, Xh = Yall[:160], Xall[:160], Yall[160:], Xall[160:]
    sched = [(25, 0.01), (25, 1.0)]
    held = HeldOut(Xh, act.apply(Yh))
    f, info = nonlinear_reconstruction(Y, r, act, Yhat=X, schedule=sched, tol=0, held=held)
    _, full = nonlinear_reconstruction(Y, r, act, Yhat=X, schedule=sched, tol=0)
    assert full.iterations == 50 and info.iterations < 50
    assert len(info.held_error) == info.iterations

    def err(fz):
        return float(np.sum((act.apply(Yh) - act.apply(fz.predict(Xh))) ** 2))

    lin = linear_reconstruction(Y, r, X)
    # the loop scores the held-back rows in float32 products (HeldOut.error)
    np.testing.assert_allclose(err(f), min([err(lin)] + info.held_error), rtol=1e-5)
    if info.best_iteration:
        np.testing.assert_allclose(err(f), info.held_error[info.best_iteration - 1], rtol=1e-5)
    # each stage ended after HELD_PATIENCE iterations without a HELD_TOL improvement, or ran out
    assert info.lambdas.count(0.01) < 25 or info.lambdas.count(1.0) < 25
    assert info.lambdas.count(0.01) >= HELD_PATIENCE


@pytest.mark.parametrize("rank", [5, 40])
def test_held_back_error_in_float32_is_the_float64_error(rank):
    """HeldOut.error on float32 rows with an offset (float32 products and activation, float64 sums): the
    brute-force float64 squared error to float32 precision, through both product orders, over several blocks."""
    from onnx_lowrank.solver.nonlinear import HeldOut

    rng = np.random.default_rng(8)
    d = 64
    X = _responses(3000, d, rng, decay=10.0) + 0.5
    off = 0.2 * rng.standard_normal(X.shape)
    act = Activation.hardswish()
    f = linear_reconstruction(X + 0.1 * rng.standard_normal(X.shape), rank, X)
    A = act.apply(X + off + 0.05 * rng.standard_normal(X.shape))
    want = float(np.sum((A - act.apply(f.predict(X) + off)) ** 2))
    got = HeldOut(X.astype(np.float32), A.astype(np.float32), off.astype(np.float32)).error(f, act)
    np.testing.assert_allclose(got, want, rtol=1e-4)
