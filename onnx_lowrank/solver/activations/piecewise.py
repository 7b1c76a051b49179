"""Piecewise-linear activations: Identity, ReLU, Clip (ReLU6), LeakyReLU, PReLU, HardSigmoid.

Their z step is exact: on each linear piece the objective ``(a - r(z))^2 + lam (z - u)^2`` is a
convex quadratic, so its minimiser clipped into the piece is the piece's best point; the
cheapest piece wins (``piecewise_linear``).
"""

from __future__ import annotations

import math

import numpy as np

from .base import ActivationKind, OpNode, _as_slope, clip_into, keep_better, new, register

_INF = math.inf


def piecewise_linear(a, u, lam, pieces, z, P=None):
    """Per piece, the unconstrained minimiser of the quadratic, clipped into the piece; keep the
    cheapest (written into ``z``; its objective is returned)."""
    c = new(P, a)
    t = new(P, a)
    zp = cp = None
    for i, (s, c0, lo, hi) in enumerate(pieces):
        zz, cc = (z, c) if i == 0 else (zp, cp)
        if zz is None:
            zz = zp = new(P, a)
            cc = cp = new(P, a)
        if np.ndim(s) == 0 and s == 0.0:
            clip_into(u, lo, hi, zz)
            np.subtract(a, c0, out=cc)
            cc *= cc
        else:
            den = s * s + lam
            np.multiply(u, lam / den, out=zz)
            if c0 != 0.0:
                np.subtract(a, c0, out=t)
                t *= s / den
            else:
                np.multiply(a, s / den, out=t)
            zz += t
            clip_into(zz, lo, hi, zz)
            if np.ndim(s) == 0 and s == 1.0:
                np.subtract(a, zz, out=cc)
            else:
                np.multiply(zz, s, out=cc)
                np.subtract(a, cc, out=cc)
            if c0 != 0.0:
                cc -= c0
            cc *= cc
        np.subtract(zz, u, out=t)
        t *= t
        t *= lam
        cc += t
        if i > 0:
            keep_better(z, c, zz, cc, t, P)
    return c


@register("identity")
class Identity(ActivationKind):
    def is_identity(self) -> bool:
        return True

    def value(self, y):
        return y.copy()

    def linear_pieces(self):
        return [(1.0, 0.0, -_INF, _INF)]


@register("relu", op_types=("Relu",), written_out=({},))
class ReLU(ActivationKind):
    def value(self, y):
        return np.maximum(y, 0.0)

    def value_block(self, z, P):
        return clip_into(z, 0.0, _INF, P(z))

    def linear_pieces(self):
        return [(0.0, 0.0, -_INF, 0.0), (1.0, 0.0, 0.0, _INF)]


@register("clip", op_types=("Clip",))
class Clip(ActivationKind):
    """``min(max(y, min), max)``; either bound may be None (ReLU6 is min 0, max 6)."""

    @classmethod
    def normalise(cls, params):
        lo, hi = params.get("min"), params.get("max")
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"clip: min {lo} > max {hi}")
        return {"min": lo, "max": hi}

    @classmethod
    def from_op(cls, node: OpNode, channels: int):
        # opset < 11: attributes; opset >= 11: optional constant inputs
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
        if len(node.inputs) > 1 or lo is None and hi is None:
            lo = _scalar(node.const(1))
            hi = _scalar(node.const(2))
            if (node.given(1) and lo is None) or (node.given(2) and hi is None):
                return None  # bounds computed at run time
        return {"min": lo, "max": hi}

    def _bounds(self):
        lo, hi = self.params["min"], self.params["max"]
        return -_INF if lo is None else lo, _INF if hi is None else hi

    def is_identity(self) -> bool:
        return self.params["min"] is None and self.params["max"] is None

    def value(self, y):
        lo, hi = self.params["min"], self.params["max"]
        out = y.copy()
        if lo is not None:
            np.maximum(out, lo, out=out)
        if hi is not None:
            np.minimum(out, hi, out=out)
        return out

    def value_block(self, z, P):
        lo, hi = self._bounds()
        return clip_into(z, lo, hi, P(z))

    def linear_pieces(self):
        lo, hi = self.params["min"], self.params["max"]
        pieces = []
        if lo is not None:
            pieces.append((0.0, lo, -_INF, lo))
        pieces.append((1.0, 0.0, -_INF if lo is None else lo, _INF if hi is None else hi))
        if hi is not None:
            pieces.append((0.0, hi, hi, _INF))
        return pieces


def _scalar(v: np.ndarray | None) -> float | None:
    return None if v is None else float(v.reshape(-1)[0])


@register("leaky_relu", op_types=("LeakyRelu",), defaults={"alpha": 0.01})
class LeakyReLU(ActivationKind):
    @property
    def slope(self):
        return self.params["alpha"]

    def is_identity(self) -> bool:
        return bool(np.all(np.asarray(self.slope) == 1.0))

    def value(self, y):
        return np.where(y >= 0.0, y, self.slope * y)

    def linear_pieces(self):
        return [(self.slope, 0.0, -_INF, 0.0), (1.0, 0.0, 0.0, _INF)]


@register("prelu", op_types=("PRelu",))
class PReLU(LeakyReLU):
    """LeakyReLU with a learnt slope, a scalar or one per channel (the last axis)."""

    @classmethod
    def normalise(cls, params):
        if "slope" not in params:
            raise ValueError("prelu needs params['slope']")
        return {"slope": _as_slope(params["slope"])}

    @classmethod
    def from_op(cls, node, channels):
        slope = node.const(1)
        if slope is None:
            return None
        slope = slope.astype(np.float64).reshape(-1)
        if slope.size not in (1, channels):
            return None
        return {"slope": slope if slope.size > 1 else float(slope[0])}

    @property
    def slope(self):
        return self.params["slope"]


@register("hardsigmoid", op_types=("HardSigmoid",), defaults={"alpha": 0.2, "beta": 0.5})
class HardSigmoid(ActivationKind):
    """``clip(alpha y + beta, 0, 1)`` (ONNX defaults alpha 0.2, beta 0.5)."""

    def value(self, y):
        return np.clip(self.params["alpha"] * y + self.params["beta"], 0.0, 1.0)

    def linear_pieces(self):
        alpha, beta = self.params["alpha"], self.params["beta"]
        if alpha == 0.0:
            return [(0.0, min(max(beta, 0.0), 1.0), -_INF, _INF)]
        z0, z1 = -beta / alpha, (1.0 - beta) / alpha  # where alpha z + beta hits 0 and 1
        left, right = (0.0, 1.0) if alpha > 0 else (1.0, 0.0)
        lo, hi = min(z0, z1), max(z0, z1)
        return [(0.0, left, -_INF, lo), (alpha, beta, lo, hi), (0.0, right, hi, _INF)]
