"""Smooth activations: Sigmoid, Tanh, SiLU, GELU (exact erf form and the tanh approximation).

Each gives its value and first two derivatives twice: exactly (SciPy, float64: for ``apply`` and
for building the z-step table) and in cheap forms that keep the dtype of their input (float32 in
the z step): sigma(z) = (1 + tanh(z / 2)) / 2 (float32 tanh is vectorised and several times
cheaper than exp or scipy's expit) and, for the exact GELU, Abramowitz-Stegun 7.1.26 for erfc
(absolute error < 1.5e-7, below float32 resolution; scipy's erf costs ~30 multiplications).
The z step is ``table``'s: a lookup in a per-(kind, lambda) table, then Newton.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf, expit

from . import table
from .base import ActivationKind, f32, keep_better, new, objective_into, register

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_K = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


class SmoothKind(ActivationKind):
    """A smooth activation; its data, given to ``register``: ``table_a``, the range of values ``a``
    the z-step table covers (the range of ``r``, or up to where ``r`` is linear); ``table_u``: it
    covers ``|u| <= table_u``; ``special``."""

    table_a: tuple[float, float]
    table_u: float = 12.0
    #: where r' = 0 or r'' = 0: extra starts for the elements outside the table (a target beyond the
    #: range of r pulls z to r's minimum or into its steep part)
    special: tuple[float, ...] = ()

    def derivatives(self, z):
        """``(r, r', r'')`` at ``z``, exact, float64."""
        raise NotImplementedError

    def fast_derivs(self, z, P=None, value_only=False):
        """``r`` (``value_only``) or ``(r, r', r'')`` in the cheap forms, in ``z``'s dtype, into
        scratch arrays of ``P``."""
        raise NotImplementedError

    def value_block(self, z, P):
        return self.fast_derivs(z, P, value_only=True)

    def block_solver(self, lam):
        return _Solver(self, table.z_table(self, lam), lam)


class _Solver:
    """The block solver of a smooth kind: per block, the table's start, ``table.POLISH`` Newton
    steps, and the candidates ``u`` and ``z0`` (float32 arithmetic). Three small sets of elements
    are collected and revisited once, for all blocks together (``finish``; per block, their Python
    overhead would cost more than their arithmetic): those whose table entry lies next to a basin
    switch, those whose Newton step was long (``table.MOVED``: a flat objective, where one step is
    not enough) and those outside the table. ``loss_u`` sums the cost of ``u``, which the caller
    would otherwise compute again in float64."""

    def __init__(self, kind, t, lam):
        self.kind, self.t, self.lam = kind, t, lam
        # per block: (flat indices,) and for the first their table entries
        self.switch: list[tuple] = []
        self.moved: list[tuple] = []
        self.outside: list[tuple] = []
        self.loss_u = 0.0  # sum of (a - r(u))^2 over the blocks so far (the u candidate's cost)

    def __call__(self, a, u, z0, z_out, P, offset=0):
        kind, lam = self.kind, self.lam
        a, u = a.reshape(-1), u.reshape(-1)  # flat: cheaper scratch arrays
        a32, u32 = f32(a, P), f32(u, P)
        z, outside, idx, entry = table.lookup(self.t, a32, u32, P)
        best_z = new(P, u32)
        np.copyto(best_z, u32)
        best_c = kind.fast_derivs(u32, P, value_only=True)
        np.subtract(a32, best_c, out=best_c)
        best_c *= best_c
        self.loss_u += float(best_c.sum(dtype=np.float64))
        if z0 is not None:
            z0_32 = f32(z0.reshape(-1), P)
            keep_better(best_z, best_c, z0_32, _cost(kind, z0_32, a32, u32, lam, P), new(P, z0_32), P)
        z_start = new(P, z)
        np.copyto(z_start, z)
        table.newton_steps(kind, z, a32, u32, lam, table.POLISH, best_z, best_c, P)
        z_start -= z
        np.abs(z_start, out=z_start)
        if idx.size:
            self.switch.append((offset + idx, entry))
        self.moved.append((offset + np.flatnonzero(z_start > table.MOVED),))
        if outside.any():
            self.outside.append((offset + np.flatnonzero(outside),))
        z_out.reshape(-1)[...] = best_z
        return best_c.reshape(z_out.shape)

    def finish(self, a, u, z, cost):
        """Revisit the collected elements (flat arrays ``z`` and ``cost``, if given, updated in
        place): those near a basin switch (``POLISH + MORE`` Newton steps from the least and from
        the greatest of their entry and its neighbours), then those whose step was long (``MORE``
        Newton steps from the best point so far), then those outside the table (the longer descent
        from the best point so far, ``u`` and ``r``'s special points); the cheapest point seen is
        kept. Returns the change of the sums of the objective and of ``(z - u)^2``."""
        d_obj = d_pen = 0.0
        kind, lam = self.kind, self.lam
        t = self.t

        def polish_both_sides(zi, ai, ui, ci, entry):
            for start in (t.lo[entry], t.hi[entry]):
                table.newton_steps(kind, start, ai, ui, lam, table.POLISH + table.MORE, zi, ci)

        stages = ((self.switch, polish_both_sides),
                  (self.moved, lambda zi, ai, ui, ci: table.newton_steps(
                       kind, zi.copy(), ai, ui, lam, table.MORE, zi, ci)),
                  (self.outside, lambda zi, ai, ui, ci: table.descend(
                       kind, np.stack([zi, ui] + [np.full_like(zi, c) for c in kind.special]), ai, ui, lam, zi, ci)))
        for collected, method in stages:
            if not collected:
                continue
            idx, *more = (np.concatenate(x) for x in zip(*collected))
            collected.clear()
            ai, ui, zi = (x[idx].astype(np.float32) for x in (a, u, z))
            c0 = _cost(kind, zi, ai, ui, lam)
            p0, ci = _pen(zi, ui), c0.copy()
            method(zi, ai, ui, ci, *more)
            z[idx] = zi
            if cost is not None:
                cost[idx] = ci
            d_obj += ci.sum(dtype=np.float64) - c0.sum(dtype=np.float64)
            d_pen += _pen(zi, ui) - p0
        return d_obj, d_pen


def _pen(z, u):
    return np.sum((z - u) ** 2, dtype=np.float64)


def _cost(kind, z, a, u, lam, P=None):
    return objective_into(kind.fast_derivs(z, P, value_only=True), z, a, u, lam, P)


@register("silu", written_out=({},), table_a=(-0.2785, 10.0), special=(-1.2785, -2.3994, 2.3994))
class SiLU(SmoothKind):
    """``y sigmoid(y)`` (Swish): non-monotone, a minimum of about -0.278 at y = -1.28."""

    def value(self, y):
        return y * expit(y)

    def derivatives(self, z):
        s = expit(z)
        s1 = s * (1.0 - s)
        return z * s, s + z * s1, s1 * (2.0 + z * (1.0 - 2.0 * s))

    def fast_derivs(self, z, P=None, value_only=False):
        s = _sig(z, P)
        r = np.multiply(z, s, out=new(P, z))
        if value_only:
            return r
        s1 = np.multiply(s, s, out=new(P, z))
        np.subtract(s, s1, out=s1)  # s (1 - s)
        r1 = np.subtract(s, np.multiply(r, s, out=new(P, z)), out=new(P, z))
        r1 += r  # s + z s (1 - s)
        w = np.multiply(r, -2.0, out=s)
        w += z
        w += 2.0  # 2 + z (1 - 2 s)
        s1 *= w
        return r, r1, s1


@register("gelu", op_types=("Gelu",), written_out=({"approximate": "none"}, {"approximate": "tanh"}),
          table_a=(-0.1701, 10.0), special=(-0.7518, -1.4142, 1.4142))
class GELU(SmoothKind):
    """``y Phi(y)`` (``approximate='none'``) or its tanh approximation (``'tanh'``)."""

    @classmethod
    def normalise(cls, params):
        approx = str(params.get("approximate", "none"))
        if approx not in ("none", "tanh"):
            raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approx!r}")
        return {"approximate": approx}

    @classmethod
    def from_op(cls, node, channels):
        approx = node.attrs.get("approximate", "none")
        return {"approximate": approx} if approx in ("none", "tanh") else None

    @property
    def _tanh(self) -> bool:
        return self.params["approximate"] == "tanh"

    def value(self, y):
        if self._tanh:
            g = _GELU_TANH_K * (y + _GELU_TANH_C * y**3)
            return 0.5 * y * (1.0 + np.tanh(g))
        return 0.5 * y * (1.0 + erf(y / _SQRT2))

    def derivatives(self, z):
        if self._tanh:
            z2 = z * z
            g = _GELU_TANH_K * (z + _GELU_TANH_C * z2 * z)
            g1 = _GELU_TANH_K * (1.0 + 3.0 * _GELU_TANH_C * z2)
            g2 = _GELU_TANH_K * 6.0 * _GELU_TANH_C * z
            t = np.tanh(g)
            sech2 = 1.0 - t * t
            r = 0.5 * z * (1.0 + t)
            r1 = 0.5 * (1.0 + t) + 0.5 * z * sech2 * g1
            r2 = sech2 * g1 + 0.5 * z * sech2 * (g2 - 2.0 * t * g1 * g1)
            return r, r1, r2
        cdf = 0.5 * (1.0 + erf(z / _SQRT2))
        pdf = _INV_SQRT_2PI * np.exp(-0.5 * z * z)
        return z * cdf, cdf + z * pdf, pdf * (2.0 - z * z)

    def fast_derivs(self, z, P=None, value_only=False):
        return (_d_gelu_tanh if self._tanh else _d_gelu_erf)(z, P, value_only)


@register("sigmoid", op_types=("Sigmoid",), written_out=({},), table_a=(0.0, 1.0), special=(0.0,))
class Sigmoid(SmoothKind):
    def value(self, y):
        return expit(y)

    def derivatives(self, z):
        s = expit(z)
        d1 = s * (1.0 - s)
        return s, d1, d1 * (1.0 - 2.0 * s)

    def fast_derivs(self, z, P=None, value_only=False):
        s = _sig(z, P)
        if value_only:
            return s
        r1 = np.multiply(s, s, out=new(P, z))
        np.subtract(s, r1, out=r1)
        r2 = np.multiply(s, -2.0, out=new(P, z))
        r2 += 1.0
        r2 *= r1
        return s, r1, r2


@register("tanh", op_types=("Tanh",), written_out=({},), table_a=(-1.0, 1.0), special=(0.0,))
class Tanh(SmoothKind):
    def value(self, y):
        return np.tanh(y)

    def derivatives(self, z):
        t = np.tanh(z)
        d1 = 1.0 - t * t
        return t, d1, -2.0 * t * d1

    def fast_derivs(self, z, P=None, value_only=False):
        t = np.tanh(z, out=new(P, z))
        if value_only:
            return t
        r1 = np.multiply(t, t, out=new(P, z))
        np.subtract(1.0, r1, out=r1)
        r2 = np.multiply(t, -2.0, out=new(P, z))
        r2 *= r1
        return t, r1, r2


def _sig(z, P=None):
    s = np.multiply(z, 0.5, out=new(P, z))
    np.tanh(s, out=s)
    s *= 0.5
    s += 0.5
    return s


def _d_gelu_tanh(z, P=None, value_only=False):
    z2 = np.multiply(z, z, out=new(P, z))
    g = np.multiply(z2, _GELU_TANH_C, out=new(P, z))
    g += 1.0
    g *= z
    g *= _GELU_TANH_K
    t = np.tanh(g, out=g)
    r = np.add(t, 1.0, out=new(P, z))
    r *= z
    r *= 0.5
    if value_only:
        return r
    sech2 = np.multiply(t, t, out=new(P, z))
    np.subtract(1.0, sech2, out=sech2)
    g1 = np.multiply(z2, 3.0 * _GELU_TANH_C * _GELU_TANH_K, out=z2)
    g1 += _GELU_TANH_K
    r1 = np.add(t, 1.0, out=new(P, z))
    r1 *= 0.5
    hz = np.multiply(z, 0.5, out=new(P, z))
    hz *= sech2
    w = np.multiply(hz, g1, out=new(P, z))
    r1 += w
    # r2 = sech2 g1 + 0.5 z sech2 (g2 - 2 t g1^2), g2 = 6 c k z
    np.multiply(g1, g1, out=w)
    w *= t
    w *= -2.0
    np.multiply(z, 6.0 * _GELU_TANH_C * _GELU_TANH_K, out=t)
    w += t
    w *= hz
    r2 = np.multiply(sech2, g1, out=sech2)
    r2 += w
    return r, r1, r2


_AS_P = 0.3275911
_AS = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)  # a5 .. a1


def _d_gelu_erf(z, P=None, value_only=False):
    """GELU from Phi(-|z|) = erfc(|z| / sqrt 2) / 2 by Abramowitz-Stegun 7.1.26; the exp it needs
    is also the normal density's."""
    x = np.abs(z, out=new(P, z))
    x *= 1.0 / _SQRT2
    t = np.multiply(x, _AS_P, out=new(P, z))
    t += 1.0
    np.divide(1.0, t, out=t)
    poly = np.multiply(t, _AS[0], out=new(P, z))
    for c in _AS[1:]:
        poly += c
        poly *= t
    x *= x
    np.negative(x, out=x)
    e = np.exp(x, out=x)  # exp(-z^2 / 2)
    poly *= e
    poly *= 0.5  # Phi(-|z|)
    # Phi(z) = Phi(-|z|) for z < 0, 1 - Phi(-|z|) for z >= 0
    pos = np.greater_equal(z, 0.0, out=P.mask(z) if P is not None else None)
    np.multiply(poly, -2.0, out=t)
    t += 1.0
    t *= pos
    cdf = np.add(poly, t, out=poly)
    r = np.multiply(z, cdf, out=new(P, z))
    if value_only:
        return r
    pdf = np.multiply(e, _INV_SQRT_2PI, out=e)
    r1 = np.multiply(z, pdf, out=t)
    r1 += cdf
    r2 = np.multiply(z, z, out=cdf)
    np.subtract(2.0, r2, out=r2)
    r2 *= pdf
    return r, r1, r2
