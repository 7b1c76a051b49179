"""HardSwish: ``y * clip(y / 6 + 1/2, 0, 1)``, piecewise quadratic, with an exact z step."""

from __future__ import annotations

import math

import numpy as np

from .base import ActivationKind, clip, f32, keep_better, new, objective_into, register
from .piecewise import piecewise_linear

CUBIC_NEWTON = 1  # float64 Newton steps on the cubic after the float32 estimate of its root


@register("hardswish", op_types=("HardSwish",), written_out=({},))
class HardSwish(ActivationKind):
    def value(self, y):
        return y * np.clip(y / 6.0 + 0.5, 0.0, 1.0)

    def value_block(self, z, P):
        """:meth:`value`'s arithmetic (the same bits) in a scratch array: the z step's loss of each prediction."""
        t = np.divide(z, 6.0, out=P(z))
        t += 0.5
        clip(t, 0.0, 1.0, out=t)
        t *= z
        return t

    def block_solver(self, lam):
        return lambda a, u, z0, z, P, offset=0: _hardswish(a, u, lam, z, P)


def _hardswish(a, u, lam, z, P=None):
    """HardSwish = 0 on z <= -3, z on z >= 3, z (z + 3) / 6 in between. The outer pieces are
    linear (closed form, their ends included). On the middle piece, with ``t = z + 1.5`` and
    ``v = u + 1.5``, the objective is ``(t^2 / 6 - c)^2 + lam (t - v)^2`` (``c = a + 3/8``), whose
    stationary points solve ``t^3 + p t + q = 0``, ``p = 18 lam - 6 a - 9/4``, ``q = -18 lam v``.
    The term ``-2 lam v t`` makes the root on the side of ``v`` the global minimum of the quartic:
    ``sign(v) s`` where ``s`` is the largest root of ``t^3 + p t - |q|`` (positive; a simple root,
    so Newton converges fast). Where there are three real roots the other local minimum is the most
    negative of the other two, which sum to ``-s`` and multiply to ``|q| / s``: ``sign(v) r`` with
    ``r = -(s + sqrt(s^2 - 4 |q| / s)) / 2``. Both, clipped into the piece, are candidates (an
    interior minimum of the piece is one of them; its ends belong to the outer pieces too).
    ``s`` is estimated in float32 (Cardano's formula where there is one real root, the
    trigonometric one where three: no float64 cos, which costs twenty times as much) and made exact
    by ``CUBIC_NEWTON`` float64 Newton steps."""
    inf = math.inf
    c = piecewise_linear(a, u, lam, [(0.0, 0.0, -inf, -3.0), (1.0, 0.0, 3.0, inf)], z, P)
    p = np.multiply(a, -6.0, out=new(P, a))
    p += 18.0 * lam - 2.25
    v = np.add(u, 1.5, out=new(P, a))
    Q = np.abs(v, out=new(P, a))
    Q *= 18.0 * lam
    s = _largest_root(p, Q, P)
    # the other local minimum: sign(v) r, r = -(s + sqrt(max(s^2 - 4 Q / s, 0))) / 2 (where not real:
    # -s / 2, a harmless extra candidate)
    r = clip(s, 1e-300, math.inf, out=new(P, a))
    np.divide(Q, r, out=r)
    r *= -4.0
    t = np.multiply(s, s, out=p)
    r += t
    clip(r, 0.0, math.inf, out=r)
    np.sqrt(r, out=r)
    r += s
    r *= 0.5  # |r|
    np.copysign(r, v, out=r)
    np.negative(r, out=r)  # sign(v) r
    np.copysign(s, v, out=s)  # sign(v) s
    tmp = Q
    for root in (s, r):
        root -= 1.5
        clip(root, -3.0, 3.0, out=root)
        keep_better(z, c, root, _mid_cost(root, a, u, lam, P), tmp, P)
    return c


def _largest_root(p, Q, P=None):
    """The largest root of ``t^3 + p t - Q`` (``Q >= 0``) per element, float64: a float32
    estimate, then Newton. The root is simple, and from above (where the cubic is convex and
    increasing) Newton converges monotonically; a start a little below it jumps above."""
    p32, Q32 = f32(p, P), f32(Q, P)
    half = np.multiply(Q32, 0.5, out=new(P, Q32))
    # one real root (disc > 0): A = cbrt(Q/2 + sqrt(disc)), s = A - p / (3 A)
    disc = np.multiply(half, half, out=new(P, Q32))
    m3 = np.multiply(p32, p32, out=new(P, Q32))
    m3 *= p32
    m3 *= 1.0 / 27.0
    disc += m3  # (Q/2)^2 + (p/3)^3
    one = np.greater(disc, 0.0, out=P.mask(Q32) if P is not None else None)
    clip(disc, 0.0, math.inf, out=disc)
    np.sqrt(disc, out=disc)
    A = np.add(half, disc, out=disc)
    np.cbrt(A, out=A)
    clip(A, 1e-30, math.inf, out=A)
    sc = np.divide(p32, A, out=new(P, Q32))
    sc *= -1.0 / 3.0
    sc += A
    # three real roots (disc <= 0, p < 0): s = 2 m cos(arccos(Q / (2 m^3)) / 3), m = sqrt(-p / 3)
    m = np.multiply(p32, -1.0 / 3.0, out=m3)
    clip(m, 1e-10, math.inf, out=m)
    np.sqrt(m, out=m)
    cos = np.divide(half, m, out=half)
    cos /= m
    cos /= m  # Q / (2 m^3)
    clip(cos, -1.0, 1.0, out=cos)
    np.arccos(cos, out=cos)
    cos *= 1.0 / 3.0
    np.cos(cos, out=cos)
    cos *= m
    cos *= 2.0
    sc -= cos
    sc *= one
    sc += cos  # Cardano's where one real root, else the trigonometric one
    s = new(P, p)
    np.copyto(s, sc, casting="same_kind")
    f, d = new(P, p), new(P, p)
    for _ in range(CUBIC_NEWTON):
        np.multiply(s, s, out=d)
        np.add(d, p, out=f)
        f *= s
        f -= Q  # s^3 + p s - Q
        d *= 3.0
        d += p
        d += 1e-300  # > 0: 3 s^2 + p > 0 at (and near) the largest root but where p = Q = 0, s = 0
        f /= d
        s -= f
    return s


def _mid_cost(z, a, u, lam, P=None):
    r = np.add(z, 3.0, out=new(P, z))
    r *= z
    r *= 1.0 / 6.0
    return objective_into(r, z, a, u, lam, P)
