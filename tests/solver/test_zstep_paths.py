"""The z step's special paths against brute force (a two-level grid search per element).

- HardSwish's closed form (the two outer roots of the middle piece's cubic, from a float32 estimate
  and a float64 Newton step) on targets and penalties that reach every case: one or three real
  roots, roots outside the middle piece, ``u + 1.5`` near zero, the kinks at -3 and 3.
- The smooth kinds' elements whose table entry lies next to a basin switch (polished from the
  other basin's entry too) and those whose first Newton step was long (flat objective: more steps),
  both revisited after the last block.
"""

import numpy as np
import pytest

from onnx_lowrank.solver.activations import Activation, z_objective, z_step
from onnx_lowrank.solver.activations import smooth, table


def _brute_min(a, u, lam, act, kinks=()):
    """Per element, the objective's minimum over a grid spanning every z that can beat z = u (and
    the kinks), refined once around the best grid point: resolution 1e-6 of the span."""
    a, u = np.ravel(a), np.ravel(u)
    half = np.abs(a - act.apply(u)) / np.sqrt(lam) + 1.0
    best = np.empty(a.size)
    coarse, fine = np.linspace(-1.0, 1.0, 2001), np.linspace(-1.0, 1.0, 2001)
    for i in range(0, a.size, 200):
        s = slice(i, i + 200)
        ai, ui, hi = a[s, None], u[s, None], half[s, None]
        G = np.concatenate([ui + hi * coarse, np.broadcast_to(np.array(kinks, float), (ui.shape[0], len(kinks)))], 1)
        F = (ai - act.apply(G)) ** 2 + lam * (G - ui) ** 2
        zc = G[np.arange(G.shape[0]), F.argmin(1)][:, None]
        G2 = zc + 2e-3 * hi * fine  # two coarse steps either side
        F2 = (ai - act.apply(G2)) ** 2 + lam * (G2 - ui) ** 2
        best[s] = np.minimum(F.min(1), F2.min(1))
    return best


@pytest.mark.parametrize("lam", [1e-3, 0.01, 0.3, 1.0, 10.0])
def test_hardswish_closed_form_is_the_global_minimum(lam):
    rng = np.random.default_rng(int(lam * 1000))
    n = 4000
    act = Activation.hardswish()
    a = np.concatenate([rng.uniform(-1.0, 8.0, n // 2), act.apply(rng.uniform(-5, 6, n // 2)) + 0.05 * rng.standard_normal(n // 2)])
    u = np.concatenate([rng.standard_normal(n // 4) * rng.choice([0.3, 2.0, 10.0], n // 4),
                        -1.5 + 1e-6 * rng.standard_normal(n // 4),  # the cubic's q near zero
                        rng.choice([-3.0, 3.0], n // 4) + 0.01 * rng.standard_normal(n // 4),
                        rng.uniform(-6.0, 6.0, n // 4)])
    z = z_step(a, u, lam, act)
    f = z_objective(z, a, u, lam, act)
    fb = _brute_min(a, u, lam, act, kinks=(-3.0, 3.0))
    assert np.all(f <= fb + 1e-9 * (1.0 + fb)), float(np.max(f - fb))


SMOOTH = [Activation.silu(), Activation.gelu(), Activation.gelu("tanh"), Activation.sigmoid(), Activation.tanh()]


def _near_switch(act, lam, rng, n):
    """Points within half a grid step of table entries flagged as next to a basin switch."""
    t = table.z_table(act.impl, lam)
    flagged = np.flatnonzero(t.rows[:, 3])
    if not flagged.size:
        pytest.skip(f"no basin switch in the {act.kind} table at lambda {lam}")
    k = rng.choice(flagged, n)
    i, j = np.divmod(k, t.nu)
    a = t.a0 + (i + rng.uniform(-0.5, 0.5, n)) / t.inv_da
    u = t.u0 + (j + rng.uniform(-0.5, 0.5, n)) / t.inv_du
    return a, u


@pytest.mark.parametrize("lam", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("act", SMOOTH, ids=lambda a: f"{a.kind}-{a.params.get('approximate', '')}")
def test_smooth_elements_next_to_a_basin_switch(act, lam):
    """Elements whose nearest table entry lies next to a basin switch: within the solver's stated
    0.1 % of the global minimum, all of them, and within float32 round-off (1e-6) nearly all."""
    rng = np.random.default_rng([len(act.kind), int(lam * 100)])
    a, u = _near_switch(act, lam, rng, 3000)
    a32, u32 = a.astype(np.float32), u.astype(np.float32)
    idx = table.lookup(table.z_table(act.impl, lam), a32, u32)[2]
    assert idx.size >= 0.9 * a.size  # the path under test is the one taken
    z = z_step(a, u, lam, act)
    f, fb = z_objective(z, a, u, lam, act), _brute_min(a, u, lam, act)
    rel = (f - fb) / (1e-3 + fb)
    assert rel.max() <= 1e-3, float(rel.max())
    assert np.mean(rel > 1e-6) <= 0.01, float(np.mean(rel > 1e-6))


@pytest.mark.parametrize("act", SMOOTH[:3], ids=["silu", "gelu", "gelu_tanh"])
def test_smooth_elements_on_a_flat_objective(act):
    """Targets just above the minimum of SiLU / GELU with a small penalty: the objective is flat
    between the two solutions of r(z) = a, one Newton step from the table's start is not enough,
    and the elements whose step was long get more (``table.MORE``) after the last block."""
    rng = np.random.default_rng(len(act.kind) + len(act.params.get("approximate", "")))
    lam, n = 0.01, 3000
    zmin = act.impl.special[0]
    rmin = float(act.apply(np.array([zmin]))[0])
    a = rmin + rng.uniform(0.0, 0.12, n)
    u = zmin + rng.uniform(-1.0, 1.0, n)
    solver = act.impl.block_solver(lam)
    z, cost = np.empty(n), None
    solver(a, u, None, z, None)
    moved = np.concatenate([i for (i,) in solver.moved])
    assert moved.size >= 0.05 * n  # the path under test is taken
    zs = z_step(a, u, lam, act)
    f, fb = z_objective(zs, a, u, lam, act), _brute_min(a, u, lam, act)
    rel = (f - fb) / (1e-3 + fb)
    assert rel.max() <= 1e-3, float(rel.max())
    assert np.mean(rel > 1e-6) <= 0.01, float(np.mean(rel > 1e-6))
    f1 = z_objective(z, a, u, lam, act)  # before the revisit: the revisit must help, never hurt
    assert np.all(f <= f1 + 1e-6 * (1.0 + f1)) and np.sum(f) < np.sum(f1)


@pytest.mark.parametrize("kind", ["relu", "hardswish", "silu", "gelu"])
def test_two_threads_give_the_serial_answer(kind, monkeypatch):
    """Above THREAD_MIN_ELEMENTS the rows are solved in two halves on two threads: every z and cost equals the
    one-loop answer exactly (elementwise work), and the sums agree to round-off (added per half)."""
    from onnx_lowrank.solver.activations import zstep

    rng = np.random.default_rng(5)
    act = getattr(Activation, kind)()
    n, d = 9000, 120
    assert n * d >= zstep.THREAD_MIN_ELEMENTS and len(zstep._chunks(n, zstep._BLOCK // d, d)) == 2
    a = act.apply(2 * rng.standard_normal((n, d))) + 0.1 * rng.standard_normal((n, d))
    u, z0 = 2 * rng.standard_normal((n, d)), 2 * rng.standard_normal((n, d))
    z2, c2, s2 = zstep._z_solve(a, u, 0.3, act, z0, want_cost=True, want_sums=True)
    monkeypatch.setattr(zstep, "THREAD_MIN_ELEMENTS", 10 ** 12)
    assert len(zstep._chunks(n, zstep._BLOCK // d, d)) == 1
    z1, c1, s1 = zstep._z_solve(a, u, 0.3, act, z0, want_cost=True, want_sums=True)
    np.testing.assert_array_equal(z2, z1)
    np.testing.assert_array_equal(c2, c1)
    for f in ("fit", "pen", "loss_u"):
        assert getattr(s2, f) == pytest.approx(getattr(s1, f), rel=1e-12)


@pytest.mark.parametrize("kind", ["hardswish", "relu"])
def test_sums_without_the_loss_of_u_are_the_same_sums(kind):
    """Leaving out ``loss_u`` (a loop stopped on held-back rows never reads it) changes no z and no other sum; asked
    for, it is the brute-force loss of ``u``."""
    from onnx_lowrank.solver.activations import Activation
    from onnx_lowrank.solver.activations.zstep import _z_solve

    act = Activation(kind, {})
    rng = np.random.default_rng(9)
    y = 3.0 * rng.standard_normal((700, 50))
    a, u = act.apply(y), y + 0.5 * rng.standard_normal(y.shape)
    z1, _, s1 = _z_solve(a, u, 0.3, act, y, want_sums=True)
    z2, _, s2 = _z_solve(a, u, 0.3, act, y, want_sums=True, want_loss_u=False)
    np.testing.assert_array_equal(z1, z2)
    assert (s1.fit, s1.pen) == (s2.fit, s2.pen) and s2.loss_u == 0.0
    np.testing.assert_allclose(s1.loss_u, np.sum((a - act.apply(u)) ** 2), rtol=1e-12)
