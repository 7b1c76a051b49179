"""The z step of the smooth activations: a vectorised safeguarded Newton descent from several
starts (``u``, a warm start ``z0`` and a preimage of ``a`` on every monotone branch of ``r``),
keeping the cheapest end point: the objective is non-convex for SiLU/GELU, so a single start can
land in the wrong basin. ``act`` below is a ``SmoothKind`` (``derivatives``: exact forms,
``fast_derivs``: the cheap ones used inside the loops)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import Pool, clip_into, keep_better, new

@dataclass(frozen=True)
class _Branch:
    """A monotone branch of ``r`` tabulated on [-12, 12] for inverse interpolation: ``vals``
    ascending with matching ``zs``; ``lo_z``/``hi_z`` bound the preimage starts to where ``r``
    still bends (a flat tail start would let Newton jump straight back to ``u``); the ends with
    a non-negligible slope extrapolate linearly instead (SiLU/GELU right tail)."""

    vals: np.ndarray
    zs: np.ndarray
    slope_lo: float
    slope_hi: float
    lo_z: float
    hi_z: float


_TABLE_CACHE: dict[tuple, tuple[list[_Branch], float]] = {}


def _tables(act) -> tuple[list[_Branch], float]:
    """Monotone branches of ``r`` and the radius of its curved region."""
    key = act.key()
    if key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    zs = np.linspace(-12.0, 12.0, 4801)
    r, r1, r2 = act.derivatives(zs)
    curved = np.abs(r2) >= 1e-4 * np.abs(r2).max()
    radius = float(np.abs(zs[curved]).max())
    sign = np.sign(r1)
    branches = []
    start = 0
    for i in range(1, zs.size + 1):
        if i == zs.size or (sign[i] != sign[start] and sign[i] != 0.0):
            vals, zz, sl = r[start:i], zs[start:i], r1[start:i]
            if vals.size >= 2:
                if vals[0] > vals[-1]:
                    vals, zz, sl = vals[::-1], zz[::-1], sl[::-1]
                steep = np.abs(sl) >= 0.02 * np.abs(sl).max()
                z_steep = zz[steep]
                s_lo, s_hi = float(sl[0]), float(sl[-1])
                bound_a = -np.inf if abs(s_lo) > 1e-3 else None
                bound_b = np.inf if abs(s_hi) > 1e-3 else None
                ends = [z_steep.min(), z_steep.max()]
                # the bound at the low-value end and the high-value end, in z order
                lo_val_end = zz[0]
                lo_z = min(ends)
                hi_z = max(ends)
                if bound_a is not None:
                    if lo_val_end < zz[-1]:
                        lo_z = -np.inf
                    else:
                        hi_z = np.inf
                if bound_b is not None:
                    if zz[-1] > lo_val_end:
                        hi_z = np.inf
                    else:
                        lo_z = -np.inf
                branches.append(
                    _Branch(np.ascontiguousarray(vals), np.ascontiguousarray(zz), s_lo, s_hi, float(lo_z), float(hi_z))
                )
            start = i
    _TABLE_CACHE[key] = (branches, radius)
    return branches, radius


@dataclass(frozen=True)
class _Inverse:
    """A monotone branch's inverse on a grid uniform in the value (a lookup is one index
    computation and one ``take``; ``np.interp`` is ~40x slower here). ``ext``: (slope, value,
    z) of the ends that reach the table's edge |z| = 12 with a non-negligible slope (linear
    extrapolation there, SiLU/GELU right tail); ``clamp_lo``/``clamp_hi`` bound the starts to
    where ``r`` still bends (a flat-tail start would let Newton jump straight back to ``u``);
    ``z_lo``/``z_hi`` the branch's z range (for telling which branch a point is on)."""

    v0: float
    inv_dv: float
    zt: np.ndarray
    ext: tuple
    clamp_lo: float
    clamp_hi: float
    z_lo: float
    z_hi: float
    v_lo: float
    v_hi: float


_INV_CACHE: dict[tuple, list[_Inverse]] = {}
_INV_POINTS = 4096


def _inverse_tables(act) -> list[_Inverse]:
    key = act.key()
    if key not in _INV_CACHE:
        branches, _ = _tables(act)
        out = []
        for br in branches:
            if not br.vals[-1] - br.vals[0] > 1e-9:
                continue  # a flat stretch (GELU's far left tail in float64), no use as a start
            v = np.linspace(br.vals[0], br.vals[-1], _INV_POINTS)
            zt = np.interp(v, br.vals, br.zs)
            _, sl, _ = act.derivatives(br.zs)
            steep = br.zs[np.abs(sl) >= 0.02 * np.abs(sl).max()]
            clamp_lo, clamp_hi = float(steep.min()), float(steep.max())
            ext = []
            for slope, val, zv in ((br.slope_lo, br.vals[0], br.zs[0]), (br.slope_hi, br.vals[-1], br.zs[-1])):
                if abs(slope) > 1e-3 and abs(zv) >= 12.0:
                    ext.append((float(slope), float(val), float(zv), val == br.vals[-1]))
                    if zv > 0:
                        clamp_hi = math.inf
                    else:
                        clamp_lo = -math.inf
            zmin, zmax = float(br.zs.min()), float(br.zs.max())
            z_lo = -math.inf if zmin <= -12.0 else zmin
            z_hi = math.inf if zmax >= 12.0 else zmax
            # the branch's value range, tails beyond |z| = 12 included (with a margin for the
            # saturating ones): for the lower bound in ``_smooth``
            v_lo, v_hi = float(br.vals[0]) - 1e-4, float(br.vals[-1]) + 1e-4
            for slope, val, zv, high in ext:
                if high:
                    v_hi = math.inf
                else:
                    v_lo = -math.inf
            out.append(_Inverse(float(v[0]), (_INV_POINTS - 1) / float(v[-1] - v[0]), zt, tuple(ext),
                                clamp_lo, clamp_hi, z_lo, z_hi, v_lo, v_hi))
        _INV_CACHE[key] = out
    return _INV_CACHE[key]


def _preimage(a: np.ndarray, inv: _Inverse, out: np.ndarray, P=None) -> np.ndarray:
    """Approximately the z on this branch with r(z) = a (clamped to the branch's steep part),
    written into ``out``."""
    x = np.subtract(a, inv.v0, out=new(P, a))
    x *= inv.inv_dv
    np.clip(x, 0.0, _INV_POINTS - 1, out=x)
    np.rint(x, out=x)
    z = np.take(inv.zt, x.astype(np.intp), out=out)
    for slope, v, zv, high in inv.ext:
        beyond = (np.greater if high else np.less)(a, v, out=P.mask(a) if P is not None else None)
        e = np.subtract(a, v, out=x)
        e *= 1.0 / slope
        e += zv
        e -= z
        e *= beyond
        z += e
    return clip_into(z, inv.clamp_lo, inv.clamp_hi, z)


_TOL = 3e-4  # a step below _TOL (1 + |z|) is the last one (see _descend)
_BLOCK_ITERS = 8  # iterations per block; the few elements still moving then finish together
_MAX_ITERS = 80


def _branch_lower_bound(a, u, lam, inv, P=None):
    """A lower bound of the objective over the branch's z range: ``dist(a, values)^2 +
    lam dist(u, z range)^2`` (each term minimised separately)."""
    lb = np.subtract(a, inv.v_hi, out=new(P, a))
    np.maximum(lb, 0.0, out=lb)
    t = np.subtract(inv.v_lo, a, out=new(P, a))
    np.maximum(t, 0.0, out=t)
    lb += t  # one of the two is zero
    lb *= lb
    if inv.z_hi < math.inf:
        np.subtract(u, inv.z_hi, out=t)
    else:
        t[...] = 0.0
    np.maximum(t, 0.0, out=t)
    if inv.z_lo > -math.inf:
        w = np.subtract(inv.z_lo, u, out=new(P, a))
        np.maximum(w, 0.0, out=w)
        t += w
    t *= t
    t *= lam
    lb += t
    return lb


def _smooth(a, u, z0, lam, act, tables, z_out, P=None):
    """Safeguarded Newton descent (``_descend``) from a few starts, keeping per element the
    cheapest end point (written into ``z_out``; its objective is returned).

    First ``z0`` and ``u`` (without ``z0``: ``u`` and a preimage of ``a`` on the main branch of
    ``r``) descend together, as rows of one (2, m) array.  Then a preimage of ``a`` on each other
    monotone branch (with ``z0``: on each branch ``z0`` is not on; one branch: its preimage)
    descends too, but only for the elements where a lower bound of the objective over that
    branch is below the best value found so far -- the others cannot gain anything there.
    Also returns the elements still moving after ``_BLOCK_ITERS`` iterations (``_finish``
    takes those further, all blocks together) as (start, element, zb, fb, step)."""
    shape = a.shape
    a1, u1 = a.reshape(-1), u.reshape(-1)
    m = a1.size
    nb = len(tables)
    main = max(range(nb), key=lambda k: tables[k].v_hi - tables[k].v_lo)
    zs = np.empty((2, m))
    if z0 is None:
        zs[0] = u1
        _preimage(a1, tables[main], zs[1], P)
        extra = [k for k in range(nb) if k != main]
    else:
        z01 = z0.reshape(-1)
        zs[0] = z01
        zs[1] = u1
        extra = list(range(nb))
    zb, fb, left = _descend(zs, None, None, a1, u1, lam, act, _BLOCK_ITERS)
    z1 = z_out.reshape(-1)
    z1[:] = zb[0]
    c = fb[0].copy()
    tmp = new(P, a1)
    keep_better(z1, c, zb[1], fb[1], tmp, P)
    lefts = []
    if left is not None:
        lefts.append((left[0] // m, left[0] % m) + left[1:])
    for n_extra, k in enumerate(extra):
        inv = tables[k]
        need = np.less(_branch_lower_bound(a1, u1, lam, inv, P), c, out=P.mask(a1) if P is not None else None)
        if z0 is not None and nb > 1:
            need &= (z01 < inv.z_lo) | (z01 > inv.z_hi)
        sel = np.flatnonzero(need)
        if sel.size == 0:
            continue
        a_s, u_s = a1[sel], u1[sel]
        zk, fk, left = _descend(_preimage(a_s, inv, np.empty(sel.size)), None, None, a_s, u_s, lam, act,
                                _BLOCK_ITERS)
        better = fk < c[sel]
        z1[sel[better]] = zk[better]
        c[sel[better]] = fk[better]
        if left is not None:
            lefts.append((np.full(left[0].size, 2 + n_extra), sel[left[0]]) + left[1:])
    # the end points' values may be those before a last unverified small step
    _smooth_cost(z1, a1, u1, lam, act, c, P)
    if not lefts:
        return c.reshape(shape), None
    left = tuple(np.concatenate([x[i] for x in lefts]) for i in range(5))
    return c.reshape(shape), left


def _smooth_cost(z, a, u, lam, act, out, P=None):
    """The objective at ``z`` (into ``out``), with the fast forms of ``r``."""
    r = act.fast_derivs(z, P, value_only=True)
    np.subtract(a, r, out=r)
    np.multiply(r, r, out=out)
    np.subtract(z, u, out=r)
    r *= r
    r *= lam
    out += r
    return out


def _finish(tails, a, u, lam, act, z, cost):
    """Continue the descent of the leftover elements of all blocks in one set of arrays, then
    let their end points compete with each element's current best. ``tails``: (offset of the
    block in the flattened data, leftover of ``_smooth``); ``a, u, z, cost`` flattened."""
    k = np.concatenate([t[1][0] for t in tails])
    g = np.concatenate([off + t[1] for off, t in tails])
    zb, fb, step = (np.concatenate([t[1][i] for t in tails]) for i in (2, 3, 4))
    zb, fb, _ = _descend(zb, fb, step, a[g], u[g], lam, act, _MAX_ITERS - _BLOCK_ITERS)
    for kk in np.unique(k):
        sel = np.flatnonzero(k == kk)  # one start: every element at most once
        gs, zk, fk = g[sel], zb[sel], fb[sel]
        better = fk < cost[gs]
        z[gs[better]] = zk[better]
        cost[gs[better]] = fk[better]
    # the end points' values may be those before a last unverified small step
    g = np.unique(g)
    zg = z[g]
    cost[g] = _smooth_cost(zg, a[g], u[g], lam, act, np.empty(g.size))


def _descend(zb, fb, step, a, u, lam, act, max_iter):
    """Monotone descent on the 1-D objective, all elements (and starts) at once: Newton where
    the curvature is clearly positive, else the Gauss-Newton step (curvature ``r'^2 + lam > 0``).
    A trial point is accepted when the objective decreases, else the step is halved from the
    last accepted point; the objective at a trial point comes with the derivatives there, so an
    iteration costs one evaluation of ``r, r', r''``.  Steps are capped by a trust radius: 0.5
    inside the curved region of ``r`` (so that a step cannot jump over a basin into a worse
    one, e.g. from a flat-tail start straight back to ``u``), growing with the distance to
    that region (where the objective is nearly quadratic) and doubling while steps are accepted
    at the cap.  Converged elements (step below ``_TOL (1 + |z|)``) leave the working arrays.

    ``fb`` None: start at ``zb``; else continue from accepted points ``zb`` (objective ``fb``)
    with the pending step ``step``.  ``a``, ``u`` broadcast against ``zb``.  Returns the last
    accepted points and their objective values (shape of ``zb``) and, when ``max_iter`` ran
    out, the elements still moving as (flat index, zb, fb, step), else None."""
    derivs = act.fast_derivs
    radius = _tables(act)[1]
    shape = zb.shape
    zb = np.array(zb, dtype=np.float64)
    zt = np.empty(shape)
    first = fb is None
    if first:
        fb = np.empty(shape)
        step = np.zeros(shape)
        zt[...] = zb
    else:
        fb = np.array(fb, dtype=np.float64)
        step = np.array(step, dtype=np.float64)
        np.add(zb, step, out=zt)
    T = Pool(zb.size)
    zb_all = fb_all = None
    A, U = a, u
    idx = None
    n_active = zb.size
    live = None
    for it in range(max_iter):
        T.reset()
        r, r1, r2 = derivs(zt, T)
        res = np.subtract(r, A, out=r)
        dz = np.subtract(zt, U, out=T(zt))
        ft = np.multiply(res, res, out=T(zt))
        g = np.multiply(dz, dz, out=T(zt))
        g *= lam
        ft += g
        cap = np.abs(zb, out=T(zt))
        cap -= radius
        np.maximum(cap, 0.0, out=cap)
        cap += 0.5
        if first:
            fb[...] = ft
            acc = None
            first = False
        else:
            acc = np.less(ft, fb, out=T.mask(zt))
            np.minimum(fb, ft, out=fb)
            np.multiply(step, acc, out=g)
            zb += g  # = zt where accepted (zt was formed as zb + step)
            np.abs(g, out=g)
            g *= 2.0
            np.maximum(cap, g, out=cap)
        # Newton / Gauss-Newton step from the (new) accepted point
        np.multiply(res, r1, out=g)
        dz *= lam
        g += dz
        gn = np.multiply(r1, r1, out=r1)
        gn += lam
        res *= r2  # (r - a) r''
        h = np.add(res, gn, out=ft)
        np.multiply(gn, 0.05, out=r2)
        ok = np.greater(h, r2, out=T.mask(zt))
        res *= ok
        res += gn  # the Newton curvature where it is clearly positive, else Gauss-Newton
        new = np.divide(g, res, out=g)
        new *= -1.0
        np.minimum(new, cap, out=new)
        cap *= -1.0
        np.maximum(new, cap, out=new)
        if acc is None:
            step[...] = new
        else:
            step *= 0.5  # rejected: halve the step from the last accepted point
            new -= step
            new *= acc
            step += new
        # converged: a step below _TOL (1 + |z|).  Such a step is taken without evaluating
        # the objective there (where it was proposed from an accepted point): it is a Newton or
        # Gauss-Newton step with curvature >= 0.05 (r'^2 + lam), so it decreases the objective
        # by ~ h step^2 / 2 while the cubic term is orders of magnitude smaller at this size,
        # and the distance left to the minimiser is second order in the step.
        thr = np.abs(zb, out=cap)
        thr += 1.0
        thr *= _TOL
        conv = np.less_equal(np.abs(step, out=res), thr, out=T.mask(zt))
        np.multiply(step, conv, out=r2)
        if acc is not None:
            r2 *= acc
        zb += r2
        live = np.logical_not(conv, out=conv)
        n_live = int(np.count_nonzero(live))
        if n_live == 0:
            break
        if n_live <= 0.75 * n_active and it + 1 < max_iter:
            # write back the finished elements and keep only the live ones
            if idx is None:
                zb_all, fb_all = zb.reshape(-1).copy(), fb.reshape(-1).copy()
                keep = np.flatnonzero(live.reshape(-1))
                idx = keep
                if np.ndim(a) == 1 and zb.ndim == 2:
                    col = keep % zb.shape[1]
                    A, U = a[col], u[col]
                else:
                    A = np.broadcast_to(a, shape).reshape(-1)[keep]
                    U = np.broadcast_to(u, shape).reshape(-1)[keep]
                zb, fb, step = zb.reshape(-1)[keep], fb.reshape(-1)[keep], step.reshape(-1)[keep]
            else:
                zb_all[idx] = zb
                fb_all[idx] = fb
                keep = np.flatnonzero(live)
                idx = idx[keep]
                A, U, zb, fb, step = A[keep], U[keep], zb[keep], fb[keep], step[keep]
            zt = np.empty(zb.shape)
            live = None
            n_active = idx.size
        np.add(zb, step, out=zt)
    left = None
    if live is not None and int(np.count_nonzero(live)):
        keep = np.flatnonzero(live.reshape(-1))
        flat = keep if idx is None else idx[keep]
        left = (flat, zb.reshape(-1)[keep], fb.reshape(-1)[keep], step.reshape(-1)[keep])
    if idx is None:
        return zb.reshape(shape), fb.reshape(shape), left
    zb_all[idx] = zb
    fb_all[idx] = fb
    return zb_all.reshape(shape), fb_all.reshape(shape), left
