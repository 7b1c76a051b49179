"""Smooth activations: Sigmoid, Tanh, SiLU, GELU (exact erf form and the tanh approximation).

Each gives its value and first two derivatives twice: exactly (SciPy) and in cheap forms for the
solver's inner loops -- sigma(z) = 1 / (1 + exp(-z)) (scipy's expit is ~15x slower than that on
this hardware), and for the exact GELU an erfc approximation with relative error < 1.2e-7
(Numerical Recipes' erfcc; scipy's erf is ~40x slower than exp) during the descent, then one exact
Newton step with scipy's erf at the end (``polish``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf, expit

from . import newton
from .base import ActivationKind, keep_better, new, register

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_K = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


class SmoothKind(ActivationKind):
    """A smooth activation: z step by ``newton`` (iterative, leftovers finished across blocks)."""

    iterative = True

    def derivatives(self, z):
        """``(r, r', r'')`` at ``z``, exact."""
        raise NotImplementedError

    def fast_derivs(self, z, P=None, value_only=False):
        """``r`` (``value_only``) or ``(r, r', r'')`` in the cheap forms, into scratch arrays."""
        raise NotImplementedError

    def value_block(self, z, P):
        return self.fast_derivs(z, P, value_only=True)

    def key(self) -> tuple:
        return (self.name, tuple(sorted(self.params.items())))

    def block_solver(self, lam):
        tables = newton._inverse_tables(self)
        return lambda a, u, z0, z, P: newton._smooth(a, u, z0, lam, self, tables, z, P)

    def finish(self, tails, a, u, lam, z, cost):
        newton._finish(tails, a, u, lam, self, z, cost)


@register
class SiLU(SmoothKind):
    """``y sigmoid(y)`` (Swish): non-monotone, a minimum of about -0.278 at y = -1.28."""

    name = "silu"
    written_out = ({},)

    def value(self, y):
        return y * expit(y)

    def derivatives(self, z):
        s = expit(z)
        s1 = s * (1.0 - s)
        return z * s, s + z * s1, s1 * (2.0 + z * (1.0 - 2.0 * s))

    def fast_derivs(self, z, P=None, value_only=False):
        return _d_silu(z, P, value_only)


@register
class GELU(SmoothKind):
    """``y Phi(y)`` (``approximate='none'``) or its tanh approximation (``'tanh'``)."""

    name = "gelu"
    op_types = ("Gelu",)
    written_out = ({"approximate": "none"}, {"approximate": "tanh"})

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

    def value_block(self, z, P):
        return self.fast_derivs(z, P, value_only=True) if self._tanh else self.value(z)

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
        return _d_gelu(z, self._tanh, P, value_only)

    def polish(self, z, a, u, lam):
        return None if self._tanh else _gelu_exact_polish(z, a, u, lam)


@register
class Sigmoid(SmoothKind):
    name = "sigmoid"
    op_types = ("Sigmoid",)
    written_out = ({},)

    def value(self, y):
        return expit(y)

    def derivatives(self, z):
        s = expit(z)
        d1 = s * (1.0 - s)
        return s, d1, d1 * (1.0 - 2.0 * s)

    def fast_derivs(self, z, P=None, value_only=False):
        return _d_sigmoid(z, P, value_only)


@register
class Tanh(SmoothKind):
    name = "tanh"
    op_types = ("Tanh",)
    written_out = ({},)

    def value(self, y):
        return np.tanh(y)

    def derivatives(self, z):
        t = np.tanh(z)
        d1 = 1.0 - t * t
        return t, d1, -2.0 * t * d1

    def fast_derivs(self, z, P=None, value_only=False):
        return _d_tanh(z, P, value_only)


_EXACT_GELU = GELU({"approximate": "none"})


def _sig(z, P=None):
    e = np.negative(z, out=new(P, z))
    np.exp(e, out=e)
    e += 1.0
    return np.divide(1.0, e, out=e)


def _d_sigmoid(z, P=None, value_only=False):
    s = _sig(z, P)
    if value_only:
        return s
    r1 = np.multiply(s, s, out=new(P, z))
    np.subtract(s, r1, out=r1)
    r2 = np.multiply(s, -2.0, out=new(P, z))
    r2 += 1.0
    r2 *= r1
    return s, r1, r2


def _d_tanh(z, P=None, value_only=False):
    t = np.tanh(z, out=new(P, z))
    if value_only:
        return t
    r1 = np.multiply(t, t, out=new(P, z))
    np.subtract(1.0, r1, out=r1)
    r2 = np.multiply(t, -2.0, out=new(P, z))
    r2 *= r1
    return t, r1, r2


def _d_silu(z, P=None, value_only=False):
    s = _sig(z, P)
    r = np.multiply(z, s, out=new(P, z))
    if value_only:
        return r
    r1 = np.multiply(r, s, out=new(P, z))
    np.subtract(r, r1, out=r1)
    r1 += s  # s + z s (1 - s)
    w = np.multiply(r, -2.0, out=new(P, z))
    w += z
    w += 2.0  # 2 + z (1 - 2 s)
    r2 = np.multiply(s, s, out=new(P, z))
    np.subtract(s, r2, out=r2)
    r2 *= w
    return r, r1, r2


_NR_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
            -0.82215223, 0.17087277)


def _ndtr_fast(z, P=None):
    """Standard normal CDF, relative error < 1.2e-7 (Numerical Recipes' erfcc)."""
    x = np.abs(z, out=new(P, z))
    x *= 1.0 / _SQRT2
    t = np.multiply(x, 0.5, out=new(P, z))
    t += 1.0
    np.divide(1.0, t, out=t)
    poly = np.multiply(t, _NR_ERFC[9], out=new(P, z))
    for c in _NR_ERFC[8:0:-1]:
        poly += c
        poly *= t
    poly += _NR_ERFC[0]
    x *= x
    poly -= x
    np.exp(poly, out=poly)
    poly *= t
    poly *= 0.5  # 0.5 erfc(|z| / sqrt 2) = Phi(-|z|)
    # Phi(z) = Phi(-|z|) for z < 0, 1 - Phi(-|z|) for z >= 0
    np.greater_equal(z, 0.0, out=x)
    np.multiply(poly, -2.0, out=t)
    t += 1.0
    t *= x
    poly += t
    return poly


def _d_gelu(z, tanh_form, P=None, value_only=False):
    if tanh_form:
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
    cdf = _ndtr_fast(z, P)
    r = np.multiply(z, cdf, out=new(P, z))
    if value_only:
        return r
    pdf = np.multiply(z, z, out=new(P, z))
    pdf *= -0.5
    np.exp(pdf, out=pdf)
    pdf *= _INV_SQRT_2PI
    r1 = np.multiply(z, pdf, out=new(P, z))
    r1 += cdf
    r2 = np.multiply(z, z, out=new(P, z))
    np.subtract(2.0, r2, out=r2)
    r2 *= pdf
    return r, r1, r2


def _gelu_exact_polish(z, a, u, lam):
    """One Newton step with the exact (erf) GELU from the surrogate's minimiser, kept where it
    lowers the exact objective; updates ``z`` in place, returns the exact objective there."""
    r, r1, r2 = _EXACT_GELU.derivatives(z)
    res = r - a
    dz = z - u
    c = res * res + lam * dz * dz
    g = res * r1 + lam * dz
    h = r1 * r1 + lam + res * r2
    h = np.where(h > 0.0, h, r1 * r1 + lam)
    z2 = z - g / h
    res2 = a - _EXACT_GELU.value(z2)
    dz2 = z2 - u
    c2 = res2 * res2 + lam * dz2 * dz2
    keep_better(z, c, z2, c2, dz)
    return c
