"""Balancing the intermediate channels of a factorisation for INT8 (solver/balance.py)."""

import itertools

import numpy as np
import pytest

from onnx_lowrank.solver.balance import Balanced, balance, intermediate_ranges
from onnx_lowrank.solver.reconstruction import Factorisation, linear_reconstruction


def _case(seed, n=400, d=12, r=5):
    """Conv-like responses (pre-bias ``V``, conv bias ``bc``) and a fitted rank-r factorisation."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    V = (rng.standard_normal((n, d)) * np.exp(-np.arange(d) / 3.0)) @ basis.T
    bc = rng.standard_normal(d)
    f = linear_reconstruction(V + bc, r)
    return f, V, bc


def _skew(f, seed=1):
    """The same function, with the intermediate channels rescaled by 1e-3 .. 1e3 and random signs."""
    rng = np.random.default_rng(seed)
    d = 10.0 ** rng.uniform(-3, 3, f.rank) * rng.choice([-1.0, 1.0], f.rank)
    return Factorisation(f.P * d, f.Q / d, f.b)


def _two_stages(bal, V, bc):
    """What the rewritten graph computes: k x k stage with its bias, then the 1x1 stage."""
    f = bal.factorisation
    Z = V @ f.Q + bal.first_bias(bc)
    return Z, Z @ f.P.T + bal.second_bias()


def _fake_int8(Z, P, b2):
    """Static INT8 as onnxruntime's QDQ does it: per-tensor asymmetric uint8-range activations
    (min/max including 0), per-row symmetric int8 weights."""
    lo, hi = min(Z.min(), 0.0), max(Z.max(), 0.0)
    step = (hi - lo) / 255
    zq = np.round((Z - lo) / step) * step + lo
    ws = np.abs(P).max(axis=1, keepdims=True) / 127
    pq = np.round(P / ws) * ws
    return zq @ pq.T + b2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_function_unchanged(seed):
    f, V, bc = _case(seed)
    for g in (f, _skew(f, seed)):
        _, y = _two_stages(balance(g, V + bc), V, bc)
        ref = f.predict(V + bc)
        assert np.max(np.abs(y - ref)) <= 1e-10 * np.max(np.abs(ref))


def test_ranges_centred_and_equalised():
    f, V, bc = _case(3)
    bal = balance(_skew(f), V + bc)
    Z, _ = _two_stages(bal, V, bc)
    lo, hi = Z.min(axis=0), Z.max(axis=0)
    np.testing.assert_allclose(lo + hi, 0.0, atol=1e-10 * hi.max())
    # Cross-layer equalisation: channel i's activation half-range equals its weight range max |P[:, i]|.
    np.testing.assert_allclose(hi, np.abs(bal.factorisation.P).max(axis=0), rtol=1e-10)
    # Before balancing the skew spread these over orders of magnitude.
    _, half = intermediate_ranges(_skew(f), V + bc)
    assert half.max() / half.min() > 100


def test_independent_of_the_solver_scale_and_sign():
    f, V, bc = _case(4)
    a, b = balance(f, V + bc), balance(_skew(f, 9), V + bc)
    for x, y in [(a.factorisation.P, b.factorisation.P), (a.factorisation.Q, b.factorisation.Q), (a.shift, b.shift)]:
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    P = a.factorisation.P
    assert (P[np.abs(P).argmax(axis=0), np.arange(P.shape[1])] > 0).all()


def test_brute_force_precision_optimum():
    """Nagel et al.'s objective (sum over channels of the relative precision of activation times that
    of the weights) over a grid of scale ratios of a 2-channel case: the balanced point is the best."""
    f, V, bc = _case(5, r=2)
    g = _skew(f)
    _, a = intermediate_ranges(g, V + bc)
    w = np.abs(g.P).max(axis=0)

    def objective(s):
        act, wt = a / s, w * s
        return float(np.sum(act / act.max() * wt / wt.max()))

    grid = 10.0 ** np.linspace(-6, 6, 2401)
    best = max(objective(np.array([1.0, t])) for t in grid)
    bal = balance(g, V + bc)
    s = np.abs(bal.factorisation.P[0] / g.P[0])     # P' = P s: the scales balance chose
    assert objective(s) >= best - 1e-9
    assert objective(np.array([1.0, 1.0])) < best - 0.5   # the skewed starting point is far from it


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_simulation_breaks_skewed_and_holds_balanced(seed):
    f, V, bc = _case(seed, d=16, r=8)
    ref = f.predict(V + bc)
    g = _skew(f, seed)

    def int8_err(bal):
        Z, _ = _two_stages(bal, V, bc)
        y = _fake_int8(Z, bal.factorisation.P, bal.second_bias())
        return np.linalg.norm(y - ref) / np.linalg.norm(ref - ref.mean(axis=0))

    raw = Balanced(g, np.zeros(g.rank))
    assert int8_err(raw) > 0.1
    assert int8_err(balance(g, V + bc)) < 0.02


def test_dead_channel_stays_finite():
    f, V, bc = _case(6)
    Q = f.Q.copy()
    Q[:, 0] = 0.0                              # channel 0 is constant (zero) on every input
    g = Factorisation(f.P, Q, f.b)
    bal = balance(g, V + bc)
    assert all(np.isfinite(x).all() for x in (bal.factorisation.P, bal.factorisation.Q, bal.shift))
    _, y = _two_stages(bal, V, bc)
    np.testing.assert_allclose(y, g.predict(V + bc), atol=1e-9)


def test_all_signs_of_a_diagonal_give_one_answer():
    f, V, bc = _case(7, r=3)
    outs = []
    for signs in itertools.product([-1.0, 1.0], repeat=3):
        d = np.array(signs)
        outs.append(balance(Factorisation(f.P * d, f.Q * d, f.b), V + bc).factorisation.Q)
    for q in outs[1:]:
        np.testing.assert_allclose(q, outs[0], rtol=1e-12, atol=1e-14)


def test_ranges_over_blocks_of_float32_rows_are_those_of_all_rows():
    """Rows kept as float32 and read a block at a time (3,000 rows: eight blocks) give the brute-force ranges of
    all the widened rows at once (up to the product's round-off), the extreme rows placed in different blocks."""
    f, V, bc = _case(4, n=3000)
    Y = (V + bc).astype(np.float32)
    Y[2999] *= 40.0
    Y[5] *= -40.0
    Z = Y.astype(np.float64) @ f.Q
    centre, half = intermediate_ranges(f, Y)
    np.testing.assert_allclose(centre, (Z.min(axis=0) + Z.max(axis=0)) / 2.0, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(half, (Z.max(axis=0) - Z.min(axis=0)) / 2.0, rtol=1e-13)
