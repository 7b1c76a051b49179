"""The z step of the smooth activations: a table of the answer in (a, u), then Newton.

For a fixed activation ``r`` and penalty ``lam`` the minimiser of ``(a - r(z))^2 + lam (z - u)^2``
is a function of two scalars, so it is tabulated once per (kind, lam) on a grid of ``a`` (the
values ``r`` takes) and ``u``. The table is built exactly, not by search: every stationary point
satisfies ``u = g_a(z) = z + (r(z) - a) r'(z) / lam`` and is a minimum where ``g_a`` increases,
so per grid value of ``a`` each increasing stretch of ``g_a`` (tabulated on a fine z grid) is
inverted by interpolation at all grid values of ``u`` at once, and the cheapest stationary
point is kept -- the global minimiser, up to the interpolation error.

Per element the solve is then a lookup of the nearest entry and ``POLISH`` Newton steps in
float32 (float32 is enough: the objective is flat at its minimum, and exp / tanh are several
times cheaper than in float64), keeping the cheapest point seen, ``u`` and the warm start ``z0``
included (so it never does worse than either, up to z in float32). Elements outside the table
(``|u|`` beyond its range, ``a`` outside the values of ``r``) get a longer safeguarded Newton
descent from the best point so far, ``u`` and the kind's special points, all blocks together.
Near the curve where two minima cost the same the nearest entry may lie in the other basin (a
property test found a SiLU element 2.4 % above the global minimum that way), so where the neighbouring
entries jump to another basin the farthest of them is polished too (for all blocks together, after
the last) and the cheaper end point is kept (:func:`flagged`; ``benchmarks/solver_speed.py``, ``tests/solver/test_activations.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import keep_better, new

POLISH = 2  # Newton steps after the lookup
JUMP = 0.25  # neighbouring entries this far apart (relative) lie in different basins: both are polished
FALLBACK_ITERS = 40  # safeguarded Newton iterations for the elements outside the table
_NA, _NU, _NZ = 384, 768, 12001  # grid of a, grid of u, fine z grid used to build the table


@dataclass(frozen=True)
class ZTable:
    """``z[i * nu + j]`` is the minimiser for ``a = a0 + i / inv_da``, ``u = u0 + j / inv_du``."""

    z: np.ndarray  # float32, (na * nu,)
    switch: np.ndarray  # bool, (na * nu,): a neighbouring entry lies in another basin (see flagged)
    alt: np.ndarray  # float32, (na * nu,): where ``switch``, the entry of the neighbour farthest from ``z``
    a0: float
    inv_da: float
    na: int
    u0: float
    inv_du: float
    nu: int


_CACHE: dict[tuple, ZTable] = {}


def z_table(kind, lam: float) -> ZTable:
    """The table for ``kind`` (a SmoothKind: ``table_a``, ``table_u``, exact ``derivatives``) and
    ``lam``, built on first use (about a tenth of a second) and cached per process."""
    key = (kind.key(), float(lam))
    if key not in _CACHE:
        _CACHE[key] = _build(kind, float(lam))
    return _CACHE[key]


def _build(kind, lam: float) -> ZTable:
    a_lo, a_hi = kind.table_a
    U = kind.table_u
    A = np.linspace(a_lo, a_hi, _NA)
    Ug = np.linspace(-U, U, _NU)
    zg = np.linspace(-U - 4.0, U + 4.0, _NZ)
    r, r1, _ = kind.derivatives(zg)
    T = np.empty((_NA, _NU))
    for i, a in enumerate(A):
        g = zg + (r - a) * r1 / lam
        inc = np.diff(g) > 0.0
        edges = np.flatnonzero(np.diff(inc.astype(np.int8))) + 1  # where the monotonicity flips
        best_z, best_c = Ug.copy(), np.full(_NU, np.inf)
        for s, e in zip(np.r_[0, edges], np.r_[edges, inc.size]):
            if not inc[s] or e - s < 1:
                continue
            gs, zs = g[s:e + 1], zg[s:e + 1]
            zz = np.interp(Ug, gs, zs)
            c = (a - kind.value(zz)) ** 2 + lam * (zz - Ug) ** 2
            c[(Ug < gs[0]) | (Ug > gs[-1])] = np.inf
            better = c < best_c
            best_z[better], best_c[better] = zz[better], c[better]
        T[i] = best_z
    z = np.ascontiguousarray(T.reshape(-1), dtype=np.float32)
    switch, alt = _other_basin(z, _NU)
    return ZTable(z, switch, alt, float(a_lo), (_NA - 1) / (a_hi - a_lo), _NA, float(-U), (_NU - 1) / (2.0 * U), _NU)


def _other_basin(z: np.ndarray, nu: int) -> tuple[np.ndarray, np.ndarray]:
    """Per entry: does a neighbour (one step in ``u`` either way, one in ``a``) lie in another basin
    (its minimiser more than ``JUMP`` away, relative), and the entry of the farthest such neighbour
    (``z`` itself where none): the one start in the other basin that :func:`flagged` polishes."""
    switch = np.zeros(z.size, bool)
    alt, far = z.copy(), np.zeros(z.size, np.float32)
    for off in (-1, 1, -nu, nu):
        nb = z[np.clip(np.arange(z.size) + off, 0, z.size - 1)]
        gap = np.abs(nb - z)
        jump = gap > JUMP * (1.0 + np.abs(z))
        switch |= jump
        farther = jump & (gap > far)
        alt[farther], far[farther] = nb[farther], gap[farther]
    return switch, alt


def lookup(t: ZTable, a: np.ndarray, u: np.ndarray, P=None) -> tuple[np.ndarray, np.ndarray]:
    """The table's entry nearest to (a, u) (float32 in and out), clamped to its edges, and a mask
    of the elements outside the table. Nearest, not interpolated: across the curve where the
    global minimiser jumps from one basin to another an interpolated start would lie between
    the basins; the nearest entry lies in one of them, and Newton takes it from there."""
    x = np.subtract(a, t.a0, out=new(P, a))
    x *= t.inv_da
    y = np.subtract(u, t.u0, out=new(P, a))
    y *= t.inv_du
    out = np.less(x, -0.5, out=P.mask(a) if P is not None else None)
    out |= x > t.na - 0.5
    out |= y < -0.5
    out |= y > t.nu - 0.5
    np.clip(x, 0.0, t.na - 1, out=x)
    np.clip(y, 0.0, t.nu - 1, out=y)
    x += 0.5
    y += 0.5
    k = x.astype(np.int32)
    k *= t.nu
    k += y.astype(np.int32)
    return np.take(t.z, k, out=x), out, k


def flagged(t: ZTable, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elements whose nearest entry ``k`` has a neighbour (one step in ``a`` or ``u``) in another basin
    (flagged when the table is built): near the curve where the global minimiser jumps, the nearest
    entry may be on the wrong side, and Newton would then stay in a local minimum. Returns their indices
    and the other basin's entry (``alt``) as a further start; a few per cent of the elements."""
    idx = np.flatnonzero(np.take(t.switch, k))
    return idx, np.take(t.alt, k[idx])


def newton_steps(kind, z, a, u, lam, steps, best_z, best_c, P=None, safeguard=False):
    """``steps`` Newton steps on the objective from ``z`` (updated in place), all elements at once,
    keeping in ``best_z``/``best_c`` the cheapest point seen. Where the Newton curvature is not
    clearly positive the Gauss-Newton one (``r'^2 + lam``) is used. ``safeguard``: where a step did
    not lower the objective, the next one is half of it from the best point (for long descents)."""
    step = None
    for it in range(steps + 1):
        r, r1, r2 = kind.fast_derivs(z, P)
        res = np.subtract(r, a, out=r)
        dz = np.subtract(z, u, out=new(P, z))
        c = np.multiply(res, res, out=new(P, z))
        t = np.multiply(dz, dz, out=new(P, z))
        t *= lam
        c += t
        worse = np.greater_equal(c, best_c) if safeguard and step is not None else None
        keep_better(best_z, best_c, z, c, t, P)
        if it == steps:
            break
        g = np.multiply(res, r1, out=t)
        dz *= lam
        g += dz
        gn = np.multiply(r1, r1, out=r1)
        gn += lam
        res *= r2
        h = np.add(res, gn, out=c)
        ok = np.greater(h, np.multiply(gn, 0.05, out=r2), out=P.mask(z) if P is not None else None)
        res *= ok
        res += gn  # the Newton curvature where it is clearly positive, else Gauss-Newton
        d = np.divide(g, res, out=g)
        d *= -1.0
        if not safeguard:
            z += d
        elif step is None:
            step = d.copy()
            z += step
        else:
            step *= 0.5
            d -= step
            d *= ~worse
            step += d  # the new step where the last one helped, else half the last one
            np.add(best_z, step, out=z)
        if safeguard and np.all(np.abs(step) <= 1e-6 * (1.0 + np.abs(best_z))):
            break  # converged (checked on the few elements a safeguarded descent runs on)
    return best_z, best_c


def descend(kind, starts, a, u, lam, best_z, best_c) -> None:
    """A longer safeguarded Newton descent for the few elements outside the table, from each row
    of ``starts`` (k, m) at once; the cheapest end point per element replaces ``best_z`` (m,)
    where it is cheaper than ``best_c``."""
    own_z, own_c = starts.copy(), np.full_like(starts, np.inf)
    newton_steps(kind, starts, a, u, lam, FALLBACK_ITERS, own_z, own_c, None, safeguard=True)
    k = np.argmin(own_c, axis=0)
    cols = np.arange(own_c.shape[1])
    keep_better(best_z, best_c, own_z[k, cols], own_c[k, cols], np.empty_like(best_z))
