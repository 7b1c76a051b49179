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
entries jump to another basin (flagged when the table is built) the least and the greatest of them
are polished too, for all blocks together after the last, and the cheapest end point is kept
(``smooth._Solver.finish``; ``tests/solver/test_zstep_paths.py``). The start is the nearest entry
moved along its gradient (first order), so one Newton step suffices where the objective is not
flat; where that step was long (``MOVED``) a few more follow, again after the last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import clip, keep_better, new

POLISH = 1  # Newton steps after the lookup
MOVED = 3e-3  # where that step moved z further than this (a flat objective) ...
MORE = 3  # ... this many more are taken
JUMP = 0.25  # neighbouring entries this far apart (relative) lie in different basins: both are polished
FALLBACK_ITERS = 40  # safeguarded Newton iterations for the elements outside the table
_NA, _NU, _NZ = 384, 768, 12001  # grid of a, grid of u, fine z grid used to build the table


@dataclass(frozen=True)
class ZTable:
    """Row ``i * nu + j`` of ``rows`` is for ``a = a0 + i / inv_da``, ``u = u0 + j / inv_du``: the
    minimiser ``z`` there, its change per grid step in ``a`` and in ``u`` (central differences; zero
    where a neighbour lies in another basin) and 1 where a neighbour lies in another basin, else 0.
    Four float32 in a row: one gather per element. ``lo`` / ``hi``: the least / greatest of an entry
    and its four neighbours, the further starts for the elements next to a basin switch."""

    rows: np.ndarray  # float32, (na * nu, 4): z, dz/di, dz/dj, switch
    lo: np.ndarray  # float32, (na * nu,)
    hi: np.ndarray  # float32, (na * nu,)
    a0: float
    inv_da: float
    na: int
    u0: float
    inv_du: float
    nu: int
    any_switch: bool  # some entry lies next to a basin switch (not so for Sigmoid at lambda >= 0.1)


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
    T = T.astype(np.float32)
    switch, lo, hi = _other_basin(T)
    rows = np.empty((_NA, _NU, 4), np.float32)
    rows[..., 0], rows[..., 3] = T, switch
    rows[..., 1], rows[..., 2] = np.gradient(T)  # per grid step; one-sided at the edges
    rows[switch, 1:3] = 0.0
    return ZTable(rows.reshape(-1, 4), lo.reshape(-1), hi.reshape(-1), float(a_lo), (_NA - 1) / (a_hi - a_lo), _NA,
                  float(-U), (_NU - 1) / (2.0 * U), _NU, bool(switch.any()))


def _other_basin(T: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per entry of the (na, nu) table: does a neighbour (one step in ``a`` or ``u`` either way) lie
    in another basin (its minimiser more than ``JUMP`` away, relative); and the least and the
    greatest of the entry and its neighbours. Both extremes, not only the neighbour across the jump:
    an entry on a flat stretch between two basins (built by interpolation there) may have the
    other basin on either side."""
    P = np.pad(T, 1, mode="edge")
    switch = np.zeros(T.shape, bool)
    lo, hi = T.copy(), T.copy()
    for nb in (P[:-2, 1:-1], P[2:, 1:-1], P[1:-1, :-2], P[1:-1, 2:]):
        switch |= np.abs(nb - T) > JUMP * (1.0 + np.abs(T))
        np.minimum(lo, nb, out=lo)
        np.maximum(hi, nb, out=hi)
    return switch, lo, hi


def lookup(t: ZTable, a: np.ndarray, u: np.ndarray, P=None):
    """Start points from the table (float32 in and out): per element the nearest entry, moved to
    (a, u) along the entry's gradient (first order: the start is then within a few 1e-4 of the
    answer where the table is smooth, and one Newton step polishes it); a mask of the elements
    outside the table (clamped to its edges); the indices of the elements whose entry lies next to
    a basin switch, and their entries' (row indices of ``rows``). Nearest, not interpolated between
    entries: across the curve where the global minimiser jumps from one basin to another an
    interpolated start would lie between the basins; the nearest entry lies in one of them (its
    gradient is zero there), and the extremes of the neighbouring entries are polished too."""
    out = P.mask(a) if P is not None else np.empty(a.shape, bool)
    far = P.mask(a) if P is not None else np.empty(a.shape, bool)
    ij = []
    for v, scale, v0, n in ((a, t.inv_da, t.a0, t.na), (u, t.inv_du, t.u0, t.nu)):
        x = np.multiply(v, scale, out=new(P, a))
        x -= v0 * scale  # grid position
        if ij:
            out |= np.less(x, -0.5, out=far)
        else:
            np.less(x, -0.5, out=out)
        out |= np.greater(x, n - 0.5, out=far)
        clip(x, 0.0, n - 1, out=x)
        i = np.rint(x, out=new(P, a))
        x -= i  # offset from the nearest grid point
        ij.append((x, i.astype(np.int32)))
    (fx, i), (fy, j) = ij
    i *= t.nu
    i += j
    # mode="clip": the indices are in range already, and the default "raise" checks cost half the gather
    g = np.take(t.rows.view(np.complex128).reshape(-1), i.reshape(-1), mode="clip",
                out=(P(a, "D") if P is not None else np.empty(a.shape, np.complex128)).reshape(-1))
    g = g.view(np.float32).reshape(-1, 4)
    z = np.multiply(fx.reshape(-1), g[:, 1], out=fx.reshape(-1))
    fy = fy.reshape(-1)
    fy *= g[:, 2]
    z += fy
    z += g[:, 0]
    if not t.any_switch:
        return z.reshape(a.shape), out, _NONE, _NONE
    near = np.not_equal(g[:, 3], 0.0, out=far.reshape(-1))
    idx = np.flatnonzero(near)
    return z.reshape(a.shape), out, idx, i.reshape(-1)[idx]


_NONE = np.empty(0, np.intp)


def newton_steps(kind, z, a, u, lam, steps, best_z, best_c, P=None, safeguard=False):
    """``steps`` Newton steps on the objective from ``z`` (updated in place), all elements at once,
    keeping in ``best_z``/``best_c`` the cheapest point seen. Where the Newton curvature is not
    clearly positive the Gauss-Newton one (``r'^2 + lam``) is used. ``safeguard``: where a step did
    not lower the objective, the next one is half of it from the best point (for long descents)."""
    step = None
    for it in range(steps + 1):
        mark = P.mark() if P is not None else None
        if it == steps:  # only the cost is needed at the last point
            r = kind.fast_derivs(z, P, value_only=True)
        else:
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
        if not safeguard:
            z -= d
            if P is not None:
                P.release(mark)
            continue
        d *= -1.0
        if step is None:
            step = d.copy()
            z += step
        else:
            step *= 0.5
            d -= step
            d *= ~worse
            step += d  # the new step where the last one helped, else half the last one
            np.add(best_z, step, out=z)
        if np.all(np.abs(step) <= 1e-6 * (1.0 + np.abs(best_z))):
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
