"""The z step must be the global minimiser of (a - r(z))^2 + lam (z - u)^2, checked against a
dense per-element grid search, for every activation kind, with and without a warm start z0.

Piecewise-linear kinds and HardSwish are solved in closed form: exact to round-off for every
element.  The smooth kinds (SiLU, GELU, Sigmoid, Tanh) start from a precomputed table of the
answer and polish in float32 (``activations/table.py``): the test asks for the grid minimum to a
relative 1e-6 (float32 round-off) on at least 99.5% of the elements -- the rest are next to the
curve where two minima cost the same, where the nearest table entry may lie in the other basin --
for the summed objective within 1e-4 of the grid's, and for a descent guarantee on all of them:
never worse than z = u or z = z0.  A property test (hypothesis) draws single elements and asks
for the grid minimum within 0.1 % (the solver's stated accuracy)."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.solver.activations import (
    IDENTITY,
    KINDS,
    SMOOTH,
    Activation,
    z_objective,
    z_step,
    z_step_with_cost,
)

GRID = np.linspace(-1.0, 1.0, 20001)


def _acts(d):
    rng = np.random.default_rng(7)
    return [
        Activation.identity(),
        Activation.relu(),
        Activation.relu6(),
        Activation.clip(min=-1.0),
        Activation.clip(max=1.5),
        Activation.clip(-0.5, 2.0),
        Activation.leaky_relu(0.1),
        Activation.prelu(rng.uniform(-0.5, 1.5, d)),
        Activation.prelu(0.25),
        Activation.hardsigmoid(),
        Activation.hardsigmoid(alpha=-0.3, beta=0.4),
        Activation.hardswish(),
        Activation.silu(),
        Activation.gelu(),
        Activation.gelu("tanh"),
        Activation.sigmoid(),
        Activation.tanh(),
    ]


def _cases(act, lam, rng, n, d):
    """Half the targets are reachable (r of something, plus noise), half arbitrary, including
    values outside the range of r; u spans small to large scales."""
    y = rng.standard_normal((n, d)) * 3.0
    a = np.where(rng.random((n, d)) < 0.5, act.apply(y) + 0.1 * rng.standard_normal((n, d)), rng.uniform(-3, 6, (n, d)))
    u = rng.standard_normal((n, d)) * rng.choice([0.3, 1.0, 4.0, 20.0], (n, d))
    return a, u


_GRID_MINS: dict = {}


def _grid_min(a, u, lam, act):
    """Per element, the objective's minimum over 20001 points spanning every z that can beat
    z = u: lam (z - u)^2 <= f(u) = (a - r(u))^2. Remembered per (a, u, lam, act): a test checks
    several z steps (cold, warm starts) of one problem against the same minimum."""
    a, u = np.ascontiguousarray(a, dtype=np.float64).ravel(), np.ascontiguousarray(u, dtype=np.float64).ravel()
    key = (hashlib.sha256(a.tobytes() + u.tobytes()).hexdigest(), lam, act.kind, repr(act.params))
    if key not in _GRID_MINS:
        _GRID_MINS[key] = _grid_search(a, u, lam, act)
    return _GRID_MINS[key]


def _grid_search(a, u, lam, act):
    half = np.abs(a - act.apply(u)) / np.sqrt(lam) + 1.0
    best = np.empty(a.size)
    for i in range(0, a.size, 100):
        s = slice(i, i + 100)
        G = u[s, None] + half[s, None] * GRID[None, :]
        best[s] = ((a[s, None] - act.apply(G)) ** 2 + lam * (G - u[s, None]) ** 2).min(axis=1)
    return best


def _apply_rows(act, z, d):
    """``apply`` per element of flattened (n, d) data; PReLU needs its channel axis last."""
    return act.apply(z.reshape(-1, d)).ravel()


def _check_against_grid(act, lam, a, u, z, z0, n, d, optimal=True):
    assert z.shape == (n, d)
    f = z_objective(z, a, u, lam, act).ravel()
    if act.kind in SMOOTH:
        # descent guarantee, every element (float32 round-off allowance only)
        for start in (u,) if z0 is None else (u, z0):
            f_start = z_objective(start, a, u, lam, act).ravel()
            assert np.all(f <= f_start + 1e-6 * (1.0 + f_start)), act
        if optimal:
            fg = _grid_min(a, u, lam, act)
            rel = (f - fg) / (1.0 + fg)
            assert np.count_nonzero(rel > 1e-6) <= 5e-3 * f.size, (act, lam, float(rel.max()))
            assert np.sum(f - fg) <= 1e-4 * np.sum(1.0 + fg), (act, lam)
        return
    if act.kind == "prelu" and np.ndim(act.params["slope"]) == 1:
        # grid per channel: one scalar PReLU per column
        fg = np.concatenate(
            [_grid_min(a[:, j], u[:, j], lam, Activation.prelu(act.params["slope"][j])) for j in range(d)]
        )
        f = f.reshape(n, d).T.ravel()
    else:
        fg = _grid_min(a, u, lam, act)
    excess = f - fg
    assert excess.max() <= 1e-9 * (1.0 + fg.max()), (act, float(excess.max()))


@pytest.mark.parametrize("lam", [0.01, 1.0, 10.0])
def test_z_step_matches_grid_search(lam):
    rng = np.random.default_rng(int(lam * 100))
    n, d = 16, 10
    for act in _acts(d):
        a, u = _cases(act, lam, rng, n, d)
        _check_against_grid(act, lam, a, u, z_step(a, u, lam, act), None, n, d)


@pytest.mark.parametrize("lam", [0.01, 1.0])
@pytest.mark.parametrize("kind", SMOOTH + ("hardswish",))
def test_smooth_z_step_many_elements_and_warm_starts(kind, lam):
    """More elements for the table-based kinds, cold and warm: z0 the solution for a nearby u
    (as in the solver's iterations) and z0 arbitrary: grid-optimal as above either way (the warm
    start is only one more candidate), and never worse than z0."""
    rng = np.random.default_rng([sum(map(ord, kind)), int(lam * 100)])
    n, d = 150, 10
    acts = [a for a in _acts(d) if a.kind == kind]
    for act in acts:
        a, u = _cases(act, lam, rng, n, d)
        near = z_step(a, u + 0.3 * rng.standard_normal((n, d)), lam, act)
        for z0 in (None, near):
            _check_against_grid(act, lam, a, u, z_step(a, u, lam, act, z0=z0), z0, n, d)
        z0 = 5.0 * rng.standard_normal((n, d))
        _check_against_grid(act, lam, a, u, z_step(a, u, lam, act, z0=z0), z0, n, d)


def test_z_step_with_cost_and_blocks():
    """The returned cost is the objective at z; a size that is not a multiple of the block, a
    1-D input and a broadcast u give the same z as element-by-element calls."""
    rng = np.random.default_rng(3)
    for act in (Activation.relu(), Activation.hardswish(), Activation.silu(), Activation.gelu()):
        a = act.apply(rng.standard_normal((1037, 29)) * 2)
        u = rng.standard_normal((1037, 29)) * 2
        z, c = z_step_with_cost(a, u, 0.1, act)
        tol = 1e-5 if act.kind in SMOOTH else 1e-12  # float32 arithmetic
        np.testing.assert_allclose(c, z_objective(z, a, u, 0.1, act), rtol=tol, atol=tol)
        zs = z_step(a[:7].ravel(), u[:7].ravel(), 0.1, act)
        np.testing.assert_allclose(zs, z[:7].ravel(), rtol=1e-7, atol=1e-9)
        zb = z_step(a[:5], u[0], 0.1, act)
        np.testing.assert_allclose(zb[0], z[0], rtol=1e-7, atol=1e-9)


def test_every_kind_is_covered():
    assert {a.kind for a in _acts(4)} == set(KINDS)


def test_relu_closed_form_of_the_paper():
    rng = np.random.default_rng(1)
    a = np.maximum(rng.standard_normal((50, 8)), 0.0)
    u = rng.standard_normal((50, 8))
    lam = 0.5
    z1 = np.minimum(0.0, u)
    c1 = a**2 + lam * (z1 - u) ** 2
    z2 = np.maximum(0.0, (lam * u + a) / (lam + 1.0))
    c2 = (a - z2) ** 2 + lam * (z2 - u) ** 2
    np.testing.assert_allclose(z_step(a, u, lam, Activation.relu()), np.where(c1 <= c2, z1, z2))


def test_identity_closed_form():
    rng = np.random.default_rng(2)
    a, u = rng.standard_normal((2, 30, 5))
    np.testing.assert_allclose(z_step(a, u, 0.3, IDENTITY), (a + 0.3 * u) / 1.3)


def test_apply_values():
    y = np.array([[-4.0, -1.0, 0.0, 0.5, 4.0, 7.0]])
    np.testing.assert_allclose(Activation.relu6().apply(y), [[0, 0, 0, 0.5, 4, 6]])
    np.testing.assert_allclose(Activation.leaky_relu(0.1).apply(y), [[-0.4, -0.1, 0, 0.5, 4, 7]])
    np.testing.assert_allclose(Activation.hardswish().apply(y), y * np.clip(y / 6 + 0.5, 0, 1))
    np.testing.assert_allclose(Activation.hardsigmoid().apply(y), np.clip(0.2 * y + 0.5, 0, 1))
    np.testing.assert_allclose(Activation.silu().apply(y), y / (1 + np.exp(-y)))
    np.testing.assert_allclose(Activation.gelu().apply(np.array([1.0])), [0.8413447460685429])
    slope = np.array([0.1, 0.2, 0.3])
    np.testing.assert_allclose(Activation.prelu(slope).apply(-np.ones((2, 3))), -np.tile(slope, (2, 1)))


def test_activation_equality_and_hash():
    s = np.array([0.1, 0.2])
    assert Activation.prelu(s) == Activation.prelu(s.copy())
    assert hash(Activation.prelu(s)) == hash(Activation.prelu(s.copy()))
    assert Activation.prelu(s) != Activation.prelu(s * 2)
    assert Activation.leaky_relu(0.1) != Activation.leaky_relu(0.2)
    assert Activation("hardsigmoid") == Activation.hardsigmoid(0.2, 0.5)
    assert len({Activation.relu(), Activation("relu"), IDENTITY}) == 2
    assert IDENTITY.is_identity and Activation.clip().is_identity and not Activation.relu().is_identity
    with pytest.raises(ValueError):
        Activation("swish")
    with pytest.raises(ValueError):
        z_step(np.zeros(3), np.zeros(3), 0.0, Activation.relu())


SMOOTH_ACTS = [Activation.silu(), Activation.gelu(), Activation.gelu("tanh"), Activation.sigmoid(), Activation.tanh()]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SMOOTH_ACTS), st.floats(-8.0, 8.0), st.floats(-40.0, 40.0), st.sampled_from([0.01, 0.1, 1.0]),
       st.floats(-0.2, 0.2))
def test_smooth_z_step_property(act, y, u, lam, noise):
    """One element with a reachable target ``a = r(y) + noise`` (clipped into the range of r) and
    any ``u``: the solver's objective is within 0.1 % of the grid minimum, and never above ``u``'s
    (up to ``z`` rounded to float32)."""
    a = float(act.apply(np.array([y]))[0]) + noise
    if act.kind == "sigmoid":
        a = min(max(a, 0.0), 1.0)
    elif act.kind == "tanh":
        a = min(max(a, -1.0), 1.0)
    a_, u_ = np.array([a]), np.array([u])
    z = z_step(a_, u_, lam, act)
    f = float(z_objective(z, a_, u_, lam, act)[0])
    fg = float(_grid_min(a_, u_, lam, act)[0])
    assert f <= fg + 1e-3 * (1e-3 + fg)
    f_u = float(z_objective(u_, a_, u_, lam, act)[0])
    assert f <= f_u * (1 + 1e-6) + lam * (1e-7 * (1.0 + abs(u))) ** 2 + 1e-12  # up to z in float32


def test_named_constructors_match_the_explicit_form():
    """``Activation.<kind>(...)`` is a shorthand: same parameters, the kind's defaults where left out."""
    assert Activation.relu6() == Activation("clip", {"min": 0.0, "max": 6.0})
    assert Activation.clip(max=1.5) == Activation("clip", {"min": None, "max": 1.5})
    assert Activation.clip(-0.5, 2.0).params == {"min": -0.5, "max": 2.0}
    assert Activation.leaky_relu().params == {"alpha": 0.01}
    assert Activation.hardsigmoid(beta=0.4).params == {"alpha": 0.2, "beta": 0.4}
    assert Activation.gelu("tanh").params == {"approximate": "tanh"}
    assert Activation.silu() == Activation("silu")
    with pytest.raises(TypeError, match="at most 0 positional"):
        Activation.relu(1.0)


@pytest.mark.parametrize("act", [Activation.hardswish(), Activation.relu(), Activation.clip(0.0, 6.0)], ids=lambda a: a.kind)
def test_value_block_is_value_bit_for_bit(act):
    """The z step's block form of the exact kinds (scored losses of the loop) gives the bits of ``apply``."""
    from onnx_lowrank.solver.activations.base import Pool

    z = np.random.default_rng(4).standard_normal((300, 7)) * 5.0
    np.testing.assert_array_equal(act.impl.value_block(z, Pool(z.size)), act.apply(z))
