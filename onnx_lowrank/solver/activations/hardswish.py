"""HardSwish: ``y * clip(y / 6 + 1/2, 0, 1)``, piecewise quadratic, with an exact z step."""

from __future__ import annotations

import math

import numpy as np

from .base import ActivationKind, keep_better, new, objective_into, register
from .piecewise import piecewise_linear


@register
class HardSwish(ActivationKind):
    name = "hardswish"
    op_types = ("HardSwish",)
    written_out = ({},)

    def value(self, y):
        return y * np.clip(y / 6.0 + 0.5, 0.0, 1.0)

    def block_solver(self, lam):
        return lambda a, u, z0, z, P, offset=0: _hardswish(a, u, lam, z, P)


def _hardswish(a, u, lam, z, P=None):
    """HardSwish = 0 on z <= -3, z on z >= 3, z (z + 3) / 6 in between. The outer pieces are
    linear (closed form); on the middle piece the stationary points solve the cubic
    ``z^3 + 4.5 z^2 + (4.5 - 6a + 18 lam) z - 9a - 18 lam u = 0``, i.e. with ``t = z + 1.5``
    ``t^3 + p t + q = 0``, ``p = 18 lam - 6 a - 2.25``, ``q = -18 lam (u + 1.5)`` (solved
    exactly: Cardano in its cancellation-free form for one real root, the trigonometric form
    for three, of which only the outer two can be minima), each root polished by a Newton
    step."""
    inf = math.inf
    c = piecewise_linear(a, u, lam, [(0.0, 0.0, -inf, -3.0), (1.0, 0.0, 3.0, inf)], z, P)
    p = np.multiply(a, -6.0, out=new(P, a))
    p += 18.0 * lam - 2.25
    q = np.add(u, 1.5, out=new(P, a))
    q *= -18.0 * lam
    # disc = (q/2)^2 + (p/3)^3
    disc = np.multiply(q, q, out=new(P, a))
    disc *= 0.25
    t = np.multiply(p, p, out=new(P, a))
    t *= p
    t *= 1.0 / 27.0
    disc += t
    one = np.greater(disc, 0.0, out=new(P, a))  # as 0.0 / 1.0
    # one real root: A = -sign(q) cbrt(|q|/2 + sqrt(disc)), t = A - p / (3 A)
    np.maximum(disc, 0.0, out=t)
    np.sqrt(t, out=t)
    A = np.abs(q, out=disc)
    A *= 0.5
    A += t
    np.cbrt(A, out=A)
    np.negative(q, out=t)
    np.copysign(A, t, out=A)
    np.equal(A, 0.0, out=t)
    A += t
    t_one = np.divide(p, A, out=t)
    t_one *= -1.0 / 3.0
    t_one += A
    # three real roots: m cos(theta), m cos(theta - 4 pi / 3), theta = arccos(3q/(2p) sqrt(-3/p)) / 3
    pn = np.minimum(p, -1e-300, out=p)
    m = np.multiply(pn, -1.0 / 3.0, out=new(P, a))
    np.sqrt(m, out=m)  # sqrt(-p/3)
    arg = np.divide(q, pn, out=A)
    arg *= 1.5
    arg /= m
    np.clip(arg, -1.0, 1.0, out=arg)
    np.arccos(arg, out=arg)
    arg *= 1.0 / 3.0
    cos = np.cos(arg, out=arg)
    m *= 2.0
    sin = np.multiply(cos, cos, out=q)
    np.subtract(1.0, sin, out=sin)
    np.maximum(sin, 0.0, out=sin)
    np.sqrt(sin, out=sin)
    sin *= -0.5 * math.sqrt(3.0)
    tmp = pn
    np.multiply(cos, 0.5, out=tmp)
    sin -= tmp  # cos(theta - 4 pi / 3)
    for root in (cos, sin):
        root *= m
        # root <- where(one, t_one, root) - 1.5, clipped into the middle piece
        np.subtract(t_one, root, out=tmp)
        tmp *= one
        root += tmp
        root -= 1.5
        np.clip(root, -3.0, 3.0, out=root)
        cr = _hardswish_polish(root, a, u, lam, tmp, P)
        keep_better(z, c, root, cr, tmp, P)
    return c


def _hardswish_mid_cost(z, a, u, lam, P=None):
    r = np.add(z, 3.0, out=new(P, z))
    r *= z
    r *= 1.0 / 6.0
    return objective_into(r, z, a, u, lam, P)


def _hardswish_polish(z, a, u, lam, tmp, P=None):
    """One Newton step on the middle-piece quartic to clean up round-off in the cubic roots,
    kept only where it helps; updates ``z`` in place and returns its cost."""
    r = np.add(z, 3.0, out=new(P, z))
    r *= z
    r *= 1.0 / 6.0
    r -= a  # r - a
    r1 = np.multiply(z, 1.0 / 3.0, out=new(P, z))
    r1 += 0.5
    g = np.multiply(r, r1, out=new(P, z))
    np.subtract(z, u, out=tmp)
    tmp *= lam
    g += tmp
    h = r1
    h *= h
    r *= 1.0 / 3.0
    h += r
    h += lam
    safe = np.greater(h, 0.0, out=r)  # as 0.0 / 1.0
    np.subtract(1.0, safe, out=tmp)
    h += tmp  # h -> 1 where not safe, the step is zeroed below
    g /= h
    g *= safe
    z2 = np.subtract(z, g, out=g)
    np.clip(z2, -3.0, 3.0, out=z2)
    c = _hardswish_mid_cost(z, a, u, lam, P)
    c2 = _hardswish_mid_cost(z2, a, u, lam, P)
    keep_better(z, c, z2, c2, tmp, P)
    return c
