"""Elementwise activations and the z step of the nonlinear reconstruction (method.md section 3).

The z step minimises, independently per element,

    (a - r(z))**2 + lam * (z - u)**2

where ``a`` is the target post-activation value and ``u`` the current linear prediction.
Piecewise-linear activations (ReLU, Clip, LeakyReLU, PReLU, HardSigmoid) are solved in closed
form piece by piece; HardSwish has a quadratic middle piece whose stationary points are the
roots of a cubic (also closed form).  The smooth ones (SiLU, GELU, Sigmoid, Tanh) use a
vectorised safeguarded Newton descent from several starts (``u`` and a preimage of ``a`` on
every monotone branch of ``r``), keeping the cheapest end point: the objective is non-convex
for SiLU/GELU, so a single start can land in the wrong basin.

Everything here is plain NumPy/SciPy in float64; no ONNX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import erf, expit

KINDS = (
    "identity",
    "relu",
    "clip",
    "leaky_relu",
    "prelu",
    "hardswish",
    "hardsigmoid",
    "silu",
    "gelu",
    "sigmoid",
    "tanh",
)
PIECEWISE_LINEAR = ("identity", "relu", "clip", "leaky_relu", "prelu", "hardsigmoid")
SMOOTH = ("silu", "gelu", "sigmoid", "tanh")

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_K = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


def _as_slope(value: Any) -> float | np.ndarray:
    """PReLU slopes come as a scalar or a per-channel vector (ONNX often stores (d, 1, 1))."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 1:
        return float(arr.reshape(()))
    return np.ascontiguousarray(arr.reshape(-1))


def _hashable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ("array", value.shape, tuple(value.ravel().tolist()))
    return value


@dataclass(frozen=True, eq=False)
class Activation:
    """The nonlinearity that follows a Conv; ``apply`` works elementwise on (n, d) rows.

    ``params``: clip ``{'min', 'max'}`` (either may be None); leaky_relu ``{'alpha'}``;
    prelu ``{'slope'}`` (scalar or (d,), broadcast over the last axis); hardsigmoid
    ``{'alpha', 'beta'}`` (ONNX defaults 0.2, 0.5); gelu optionally ``{'approximate': 'tanh'}``
    (default: the exact erf form). Equality and hashing look at the parameter values, arrays
    included.
    """

    kind: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown activation kind {self.kind!r}; expected one of {KINDS}")
        p = dict(self.params)
        if self.kind == "clip":
            lo, hi = p.get("min"), p.get("max")
            lo = None if lo is None else float(lo)
            hi = None if hi is None else float(hi)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"clip: min {lo} > max {hi}")
            p = {"min": lo, "max": hi}
        elif self.kind == "leaky_relu":
            p = {"alpha": float(p.get("alpha", 0.01))}
        elif self.kind == "prelu":
            if "slope" not in p:
                raise ValueError("prelu needs params['slope']")
            p = {"slope": _as_slope(p["slope"])}
        elif self.kind == "hardsigmoid":
            p = {"alpha": float(p.get("alpha", 0.2)), "beta": float(p.get("beta", 0.5))}
        elif self.kind == "gelu":
            approx = str(p.get("approximate", "none"))
            if approx not in ("none", "tanh"):
                raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approx!r}")
            p = {"approximate": approx}
        else:
            if p:
                raise ValueError(f"{self.kind} takes no parameters, got {sorted(p)}")
        object.__setattr__(self, "params", p)

    def _key(self) -> tuple:
        return (self.kind, tuple(sorted((k, _hashable(v)) for k, v in self.params.items())))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Activation):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Activation({self.kind!r}, {self.params!r})"

    # constructors
    @classmethod
    def identity(cls) -> "Activation":
        return cls("identity")

    @classmethod
    def relu(cls) -> "Activation":
        return cls("relu")

    @classmethod
    def clip(cls, min: float | None = None, max: float | None = None) -> "Activation":  # noqa: A002
        return cls("clip", {"min": min, "max": max})

    @classmethod
    def relu6(cls) -> "Activation":
        return cls("clip", {"min": 0.0, "max": 6.0})

    @classmethod
    def leaky_relu(cls, alpha: float = 0.01) -> "Activation":
        return cls("leaky_relu", {"alpha": alpha})

    @classmethod
    def prelu(cls, slope: float | np.ndarray) -> "Activation":
        return cls("prelu", {"slope": slope})

    @classmethod
    def hardswish(cls) -> "Activation":
        return cls("hardswish")

    @classmethod
    def hardsigmoid(cls, alpha: float = 0.2, beta: float = 0.5) -> "Activation":
        return cls("hardsigmoid", {"alpha": alpha, "beta": beta})

    @classmethod
    def silu(cls) -> "Activation":
        return cls("silu")

    @classmethod
    def gelu(cls, approximate: str = "none") -> "Activation":
        return cls("gelu", {"approximate": approximate})

    @classmethod
    def sigmoid(cls) -> "Activation":
        return cls("sigmoid")

    @classmethod
    def tanh(cls) -> "Activation":
        return cls("tanh")

    @property
    def is_identity(self) -> bool:
        """True when ``apply`` is the identity map (then the linear solution is already optimal)."""
        if self.kind == "identity":
            return True
        if self.kind == "clip":
            return self.params["min"] is None and self.params["max"] is None
        if self.kind == "leaky_relu":
            return self.params["alpha"] == 1.0
        if self.kind == "prelu":
            return bool(np.all(np.asarray(self.params["slope"]) == 1.0))
        return False

    def apply(self, y: np.ndarray) -> np.ndarray:
        """``r(y)`` elementwise, in float64."""
        y = np.asarray(y, dtype=np.float64)
        k = self.kind
        if k == "identity":
            return y.copy()
        if k == "relu":
            return np.maximum(y, 0.0)
        if k == "clip":
            lo, hi = self.params["min"], self.params["max"]
            out = y.copy()
            if lo is not None:
                np.maximum(out, lo, out=out)
            if hi is not None:
                np.minimum(out, hi, out=out)
            return out
        if k == "leaky_relu":
            return np.where(y >= 0.0, y, self.params["alpha"] * y)
        if k == "prelu":
            return np.where(y >= 0.0, y, self.params["slope"] * y)
        if k == "hardsigmoid":
            return np.clip(self.params["alpha"] * y + self.params["beta"], 0.0, 1.0)
        if k == "hardswish":
            return y * np.clip(y / 6.0 + 0.5, 0.0, 1.0)
        return _smooth_value(self, y)


IDENTITY = Activation("identity")
RELU = Activation("relu")


# ---------------------------------------------------------------------------------------------
# smooth activations: value and first two derivatives


def _smooth_value(act: Activation, z: np.ndarray) -> np.ndarray:
    k = act.kind
    if k == "sigmoid":
        return expit(z)
    if k == "tanh":
        return np.tanh(z)
    if k == "silu":
        return z * expit(z)
    if k == "gelu":
        if act.params["approximate"] == "tanh":
            g = _GELU_TANH_K * (z + _GELU_TANH_C * z**3)
            return 0.5 * z * (1.0 + np.tanh(g))
        return 0.5 * z * (1.0 + erf(z / _SQRT2))
    raise ValueError(f"{k} is not a smooth activation")


def _smooth_derivs(act: Activation, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(r, r', r'')`` at ``z``."""
    k = act.kind
    if k == "sigmoid":
        s = expit(z)
        d1 = s * (1.0 - s)
        return s, d1, d1 * (1.0 - 2.0 * s)
    if k == "tanh":
        t = np.tanh(z)
        d1 = 1.0 - t * t
        return t, d1, -2.0 * t * d1
    if k == "silu":
        s = expit(z)
        s1 = s * (1.0 - s)
        return z * s, s + z * s1, s1 * (2.0 + z * (1.0 - 2.0 * s))
    if k == "gelu":
        if act.params["approximate"] == "tanh":
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
    raise ValueError(f"{k} is not a smooth activation")


# ---------------------------------------------------------------------------------------------
# z step
#
# Everything below works on blocks of ~_BLOCK elements (row blocks of the (n, d) data): a
# whole-array NumPy pass over a few million float64 values is bound by memory bandwidth and
# costs about ten times as much as the same pass on a block that stays in the CPU cache, and the
# solvers below make 20 to a few hundred passes.  The Python loop over blocks costs a few
# microseconds per block and operation, which is small next to that.

_BLOCK = 1 << 12  # smooth kinds (a dozen arrays of up to 3 starts per element stay in L2)
_BLOCK_CLOSED = 1 << 14  # closed forms


def z_objective(z: np.ndarray, a: np.ndarray, u: np.ndarray, lam: float, act: Activation) -> np.ndarray:
    """Elementwise ``(a - r(z))**2 + lam * (z - u)**2`` (what ``z_step`` minimises)."""
    z = np.asarray(z, dtype=np.float64)
    return (np.asarray(a, dtype=np.float64) - act.apply(z)) ** 2 + lam * (z - np.asarray(u, dtype=np.float64)) ** 2


def z_step(
    a: np.ndarray, u: np.ndarray, lam: float, act: Activation, z0: np.ndarray | None = None
) -> np.ndarray:
    """Elementwise argmin over ``z`` of ``(a - r(z))**2 + lam * (z - u)**2``.

    Exact (global) for the piecewise-linear kinds and HardSwish (closed forms).  For the smooth
    kinds it is the best of a safeguarded Newton descent from a few starts: ``u``, ``z0`` (a
    warm start, e.g. the previous iteration's ``z``; optional) and a preimage of ``a`` on each
    monotone branch of ``r`` (with ``z0``: on the branches ``z0`` is not on).  The result is
    never worse than ``u`` or ``z0`` (monotone descent from both) and is the global minimiser
    whenever the global minimum lies in the basin of one of the starts, which the grid-search
    tests find for all but a tiny fraction of elements (see ``tests/solver/test_activations.py``).
    """
    return _z_solve(a, u, lam, act, z0)[0]


def z_step_with_cost(
    a: np.ndarray, u: np.ndarray, lam: float, act: Activation, z0: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``z_step`` plus the elementwise objective at the returned ``z`` (saves re-evaluating ``r``)."""
    z, cost, _ = _z_solve(a, u, lam, act, z0, want_cost=True)
    return z, cost


@dataclass
class ZSums:
    """Sums over all elements that ``nonlinear_reconstruction`` needs, gathered block by block
    while the data is in cache: ``fit = sum (a - r(z))^2``, ``pen = sum (z - u)^2``,
    ``loss_u = sum (a - r(u))^2`` (the true loss of the prediction ``u``)."""

    fit: float = 0.0
    pen: float = 0.0
    loss_u: float = 0.0


def _z_solve(
    a: np.ndarray,
    u: np.ndarray,
    lam: float,
    act: Activation,
    z0: np.ndarray | None = None,
    *,
    want_cost: bool = False,
    want_sums: bool = False,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, ZSums | None]:
    lam = float(lam)
    if not lam > 0.0 or not math.isfinite(lam):
        raise ValueError(f"lambda must be a positive finite number, got {lam}")
    a = np.asarray(a, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    shapes = [a.shape, u.shape] + ([] if z0 is None else [np.shape(z0)])
    shape = np.broadcast_shapes(*shapes)
    ncol = shape[-1] if len(shape) else 1
    nrow = int(np.prod(shape[:-1])) if len(shape) > 1 else 1

    def rows(x):
        return np.ascontiguousarray(np.broadcast_to(x, shape)).reshape(nrow, ncol)

    a2, u2 = rows(a), rows(u)
    z02 = None if z0 is None else rows(np.asarray(z0, dtype=np.float64))
    if out is not None and out.shape == shape and out.dtype == np.float64 and out.flags.c_contiguous:
        z = out
    else:
        z = np.empty(shape)
    z2 = z.reshape(nrow, ncol)
    smooth = act.kind in SMOOTH
    exact_gelu = act.kind == "gelu" and act.params["approximate"] == "none"
    cost2 = np.empty((nrow, ncol)) if (want_cost or smooth) else None
    sums = ZSums() if want_sums else None
    solver = _block_solver(act, lam)
    step = max(1, (_BLOCK if smooth else _BLOCK_CLOSED) // max(ncol, 1))
    P = _Pool(min(step, nrow) * ncol)
    tails = []
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        for i in range(0, nrow, step):
            s = slice(i, i + step)
            ab, ub = a2[s], u2[s]
            zb = z2[s]
            P.reset()
            cb = solver(ab, ub, None if z02 is None else z02[s], zb, P)
            if smooth:
                cb, left = cb
                if left is not None:
                    tails.append((i * ncol, left))
            if cost2 is not None:
                cost2[s] = cb
            if sums is not None:
                t = _value_block(act, ub, P)
                np.subtract(ab, t, out=t)
                t = t.ravel()
                sums.loss_u += float(np.dot(t, t))
                if not smooth:
                    t = np.subtract(zb, ub, out=P(zb)).ravel()
                    pen = float(np.dot(t, t))
                    sums.pen += pen
                    sums.fit += float(cb.sum()) - lam * pen
        if tails:
            _finish(tails, a2.reshape(-1), u2.reshape(-1), lam, act, z2.reshape(-1), cost2.reshape(-1))
        if smooth and (sums is not None or exact_gelu):
            for i in range(0, nrow, step):
                s = slice(i, i + step)
                if exact_gelu:
                    cost2[s] = _gelu_exact_polish(z2[s], a2[s], u2[s], lam)
                if sums is not None:
                    t = np.subtract(z2[s], u2[s]).ravel()
                    pen = float(np.dot(t, t))
                    sums.pen += pen
                    sums.fit += float(cost2[s].sum()) - lam * pen
    if sums is not None:
        sums.fit = max(sums.fit, 0.0)
    if not want_cost:
        cost2 = None
    return z, (None if cost2 is None else cost2.reshape(shape)), sums


def _value_block(act: Activation, z: np.ndarray, P: _Pool) -> np.ndarray:
    """``r(z)`` on a block into a scratch array (the cheap exp-based forms for the smooth
    kinds)."""
    k = act.kind
    if k in SMOOTH and not (k == "gelu" and act.params["approximate"] == "none"):
        return _FAST_DERIVS[k](z, act, P, value_only=True)
    if k == "relu":
        return np.maximum(z, 0.0, out=P(z))
    if k == "clip":
        lo, hi = act.params["min"], act.params["max"]
        return _clip_into(z, -math.inf if lo is None else lo, math.inf if hi is None else hi, P(z))
    return act.apply(z)


def _block_solver(act: Activation, lam: float):
    """A function ``(a, u, z0, z_out) -> cost`` for one row block (writes the argmin into
    ``z_out``, returns the objective there)."""
    k = act.kind
    if k in PIECEWISE_LINEAR:
        pieces = _linear_pieces(act)
        return lambda a, u, z0, z, P: _piecewise_linear(a, u, lam, pieces, z, P)
    if k == "hardswish":
        return lambda a, u, z0, z, P: _hardswish(a, u, lam, z, P)
    tables = _inverse_tables(act)
    return lambda a, u, z0, z, P: _smooth(a, u, z0, lam, act, tables, z, P)


_Piece = tuple[Any, Any, float, float]  # slope s, intercept c, lo, hi:  r(z) = s z + c on [lo, hi]


def _linear_pieces(act: Activation) -> list[_Piece]:
    inf = math.inf
    k, p = act.kind, act.params
    if k == "identity":
        return [(1.0, 0.0, -inf, inf)]
    if k == "relu":
        return [(0.0, 0.0, -inf, 0.0), (1.0, 0.0, 0.0, inf)]
    if k == "leaky_relu":
        return [(p["alpha"], 0.0, -inf, 0.0), (1.0, 0.0, 0.0, inf)]
    if k == "prelu":
        return [(p["slope"], 0.0, -inf, 0.0), (1.0, 0.0, 0.0, inf)]
    if k == "clip":
        lo, hi = p["min"], p["max"]
        pieces: list[_Piece] = []
        if lo is not None:
            pieces.append((0.0, lo, -inf, lo))
        pieces.append((1.0, 0.0, -inf if lo is None else lo, inf if hi is None else hi))
        if hi is not None:
            pieces.append((0.0, hi, hi, inf))
        return pieces
    if k == "hardsigmoid":
        alpha, beta = p["alpha"], p["beta"]
        if alpha == 0.0:
            return [(0.0, min(max(beta, 0.0), 1.0), -inf, inf)]
        z0, z1 = -beta / alpha, (1.0 - beta) / alpha  # where alpha z + beta hits 0 and 1
        left, right = (0.0, 1.0) if alpha > 0 else (1.0, 0.0)
        lo, hi = min(z0, z1), max(z0, z1)
        return [(0.0, left, -inf, lo), (alpha, beta, lo, hi), (0.0, right, hi, inf)]
    raise ValueError(f"{k} is not piecewise linear")


def _clip_into(x: np.ndarray, lo: float, hi: float, out: np.ndarray) -> np.ndarray:
    if lo > -math.inf and hi < math.inf:
        return np.clip(x, lo, hi, out=out)
    if lo > -math.inf:
        return np.maximum(x, lo, out=out)
    if hi < math.inf:
        return np.minimum(x, hi, out=out)
    np.copyto(out, x)
    return out


class _Pool:
    """Scratch arrays reused across blocks and iterations.  Fresh NumPy temporaries of a few
    hundred kB come from mmap (or a heap that glibc keeps trimming), so every one of them
    costs page faults: two to three times the arithmetic on cache-resident blocks."""

    def __init__(self, n: int):
        self.n = int(n)
        self.f: list[np.ndarray] = []
        self.b: list[np.ndarray] = []
        self.i = self.j = 0

    def reset(self) -> None:
        self.i = self.j = 0

    def __call__(self, like: np.ndarray) -> np.ndarray:
        """A float64 scratch array of ``like``'s shape."""
        if self.i == len(self.f):
            self.f.append(np.empty(self.n))
        x = self.f[self.i]
        self.i += 1
        return x[: like.size].reshape(like.shape)

    def mask(self, like: np.ndarray) -> np.ndarray:
        if self.j == len(self.b):
            self.b.append(np.empty(self.n, dtype=bool))
        x = self.b[self.j]
        self.j += 1
        return x[: like.size].reshape(like.shape)


def _new(P: _Pool | None, like: np.ndarray) -> np.ndarray:
    return np.empty(like.shape) if P is None else P(like)


def _keep_better(z, c, z_new, c_new, tmp, P=None) -> None:
    """``z, c <- z_new, c_new`` where ``c_new < c`` (in place; ties keep the old one). An
    arithmetic blend: masked copies (``np.where``/``copyto(where=)``) branch per element and cost
    ten times as much on random masks."""
    better = np.less(c_new, c, out=None if P is None else P.mask(c))
    np.minimum(c, c_new, out=c)
    np.subtract(z_new, z, out=tmp)
    tmp *= better
    z += tmp


def _piecewise_linear(a, u, lam, pieces, z, P=None):
    """Per piece, the unconstrained minimiser of the quadratic, clipped into the piece; keep the
    cheapest. Exact because the objective restricted to one piece is a convex quadratic."""
    c = _new(P, a)
    t = _new(P, a)
    zp = cp = None
    for i, (s, c0, lo, hi) in enumerate(pieces):
        zz, cc = (z, c) if i == 0 else (zp, cp)
        if zz is None:
            zz = zp = _new(P, a)
            cc = cp = _new(P, a)
        if np.ndim(s) == 0 and s == 0.0:
            _clip_into(u, lo, hi, zz)
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
            _clip_into(zz, lo, hi, zz)
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
            _keep_better(z, c, zz, cc, t, P)
    return c


def _hardswish(a, u, lam, z, P=None):
    """HardSwish = 0 on z <= -3, z on z >= 3, z (z + 3) / 6 in between. The outer pieces are
    linear (closed form); on the middle piece the stationary points solve the cubic
    ``z^3 + 4.5 z^2 + (4.5 - 6a + 18 lam) z - 9a - 18 lam u = 0``, i.e. with ``t = z + 1.5``
    ``t^3 + p t + q = 0``, ``p = 18 lam - 6 a - 2.25``, ``q = -18 lam (u + 1.5)`` (solved
    exactly: Cardano in its cancellation-free form for one real root, the trigonometric form
    for three, of which only the outer two can be minima), each root polished by a Newton
    step."""
    inf = math.inf
    c = _piecewise_linear(a, u, lam, [(0.0, 0.0, -inf, -3.0), (1.0, 0.0, 3.0, inf)], z, P)
    p = np.multiply(a, -6.0, out=_new(P, a))
    p += 18.0 * lam - 2.25
    q = np.add(u, 1.5, out=_new(P, a))
    q *= -18.0 * lam
    # disc = (q/2)^2 + (p/3)^3
    disc = np.multiply(q, q, out=_new(P, a))
    disc *= 0.25
    t = np.multiply(p, p, out=_new(P, a))
    t *= p
    t *= 1.0 / 27.0
    disc += t
    one = np.greater(disc, 0.0, out=_new(P, a))  # as 0.0 / 1.0
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
    m = np.multiply(pn, -1.0 / 3.0, out=_new(P, a))
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
        _keep_better(z, c, root, cr, tmp, P)
    return c


def _hardswish_mid_cost(z, a, u, lam, P=None):
    r = np.add(z, 3.0, out=_new(P, z))
    r *= z
    r *= 1.0 / 6.0
    np.subtract(a, r, out=r)
    r *= r
    d = np.subtract(z, u, out=_new(P, z))
    d *= d
    d *= lam
    r += d
    return r


def _hardswish_polish(z, a, u, lam, tmp, P=None):
    """One Newton step on the middle-piece quartic to clean up round-off in the cubic roots,
    kept only where it helps; updates ``z`` in place and returns its cost."""
    r = np.add(z, 3.0, out=_new(P, z))
    r *= z
    r *= 1.0 / 6.0
    r -= a  # r - a
    r1 = np.multiply(z, 1.0 / 3.0, out=_new(P, z))
    r1 += 0.5
    g = np.multiply(r, r1, out=_new(P, z))
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
    _keep_better(z, c, z2, c2, tmp, P)
    return c


# smooth activations -----------------------------------------------------------------------------
#
# Value and derivatives in cheap forms: sigma(z) = 1 / (1 + exp(-z)) (scipy's expit is ~15x
# slower than that on this hardware), and for the exact GELU an erfc approximation with
# relative error < 1.2e-7 (Numerical Recipes' erfcc; scipy's erf is ~40x slower than exp)
# during the descent, then one exact Newton step with scipy's erf at the end.


def _sig(z, P=None):
    e = np.negative(z, out=_new(P, z))
    np.exp(e, out=e)
    e += 1.0
    return np.divide(1.0, e, out=e)


def _d_sigmoid(z, act, P=None, value_only=False):
    s = _sig(z, P)
    if value_only:
        return s
    r1 = np.multiply(s, s, out=_new(P, z))
    np.subtract(s, r1, out=r1)
    r2 = np.multiply(s, -2.0, out=_new(P, z))
    r2 += 1.0
    r2 *= r1
    return s, r1, r2


def _d_tanh(z, act, P=None, value_only=False):
    t = np.tanh(z, out=_new(P, z))
    if value_only:
        return t
    r1 = np.multiply(t, t, out=_new(P, z))
    np.subtract(1.0, r1, out=r1)
    r2 = np.multiply(t, -2.0, out=_new(P, z))
    r2 *= r1
    return t, r1, r2


def _d_silu(z, act, P=None, value_only=False):
    s = _sig(z, P)
    r = np.multiply(z, s, out=_new(P, z))
    if value_only:
        return r
    r1 = np.multiply(r, s, out=_new(P, z))
    np.subtract(r, r1, out=r1)
    r1 += s  # s + z s (1 - s)
    w = np.multiply(r, -2.0, out=_new(P, z))
    w += z
    w += 2.0  # 2 + z (1 - 2 s)
    r2 = np.multiply(s, s, out=_new(P, z))
    np.subtract(s, r2, out=r2)
    r2 *= w
    return r, r1, r2


_NR_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
            -0.82215223, 0.17087277)


def _ndtr_fast(z, P=None):
    """Standard normal CDF, relative error < 1.2e-7 (Numerical Recipes' erfcc)."""
    x = np.abs(z, out=_new(P, z))
    x *= 1.0 / _SQRT2
    t = np.multiply(x, 0.5, out=_new(P, z))
    t += 1.0
    np.divide(1.0, t, out=t)
    poly = np.multiply(t, _NR_ERFC[9], out=_new(P, z))
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


def _d_gelu(z, act, P=None, value_only=False):
    if act.params["approximate"] == "tanh":
        z2 = np.multiply(z, z, out=_new(P, z))
        g = np.multiply(z2, _GELU_TANH_C, out=_new(P, z))
        g += 1.0
        g *= z
        g *= _GELU_TANH_K
        t = np.tanh(g, out=g)
        r = np.add(t, 1.0, out=_new(P, z))
        r *= z
        r *= 0.5
        if value_only:
            return r
        sech2 = np.multiply(t, t, out=_new(P, z))
        np.subtract(1.0, sech2, out=sech2)
        g1 = np.multiply(z2, 3.0 * _GELU_TANH_C * _GELU_TANH_K, out=z2)
        g1 += _GELU_TANH_K
        r1 = np.add(t, 1.0, out=_new(P, z))
        r1 *= 0.5
        hz = np.multiply(z, 0.5, out=_new(P, z))
        hz *= sech2
        w = np.multiply(hz, g1, out=_new(P, z))
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
    r = np.multiply(z, cdf, out=_new(P, z))
    if value_only:
        return r
    pdf = np.multiply(z, z, out=_new(P, z))
    pdf *= -0.5
    np.exp(pdf, out=pdf)
    pdf *= _INV_SQRT_2PI
    r1 = np.multiply(z, pdf, out=_new(P, z))
    r1 += cdf
    r2 = np.multiply(z, z, out=_new(P, z))
    np.subtract(2.0, r2, out=r2)
    r2 *= pdf
    return r, r1, r2


_FAST_DERIVS = {"sigmoid": _d_sigmoid, "tanh": _d_tanh, "silu": _d_silu, "gelu": _d_gelu}


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


def _tables(act: Activation) -> tuple[list[_Branch], float]:
    """Monotone branches of ``r`` and the radius of its curved region."""
    key = act._key()
    if key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    zs = np.linspace(-12.0, 12.0, 4801)
    r, r1, r2 = _smooth_derivs(act, zs)
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


def _inverse_tables(act: Activation) -> list[_Inverse]:
    key = act._key()
    if key not in _INV_CACHE:
        branches, _ = _tables(act)
        out = []
        for br in branches:
            if not br.vals[-1] - br.vals[0] > 1e-9:
                continue  # a flat stretch (GELU's far left tail in float64), no use as a start
            v = np.linspace(br.vals[0], br.vals[-1], _INV_POINTS)
            zt = np.interp(v, br.vals, br.zs)
            _, sl, _ = _smooth_derivs(act, br.zs)
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
    x = np.subtract(a, inv.v0, out=_new(P, a))
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
    return _clip_into(z, inv.clamp_lo, inv.clamp_hi, z)


_TOL = 3e-4  # a step below _TOL (1 + |z|) is the last one (see _descend)
_BLOCK_ITERS = 8  # iterations per block; the few elements still moving then finish together
_MAX_ITERS = 80


def _branch_lower_bound(a, u, lam, inv, P=None):
    """A lower bound of the objective over the branch's z range: ``dist(a, values)^2 +
    lam dist(u, z range)^2`` (each term minimised separately)."""
    lb = np.subtract(a, inv.v_hi, out=_new(P, a))
    np.maximum(lb, 0.0, out=lb)
    t = np.subtract(inv.v_lo, a, out=_new(P, a))
    np.maximum(t, 0.0, out=t)
    lb += t  # one of the two is zero
    lb *= lb
    if inv.z_hi < math.inf:
        np.subtract(u, inv.z_hi, out=t)
    else:
        t[...] = 0.0
    np.maximum(t, 0.0, out=t)
    if inv.z_lo > -math.inf:
        w = np.subtract(inv.z_lo, u, out=_new(P, a))
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
    tmp = _new(P, a1)
    _keep_better(z1, c, zb[1], fb[1], tmp, P)
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
    r = _FAST_DERIVS[act.kind](z, act, P, value_only=True)
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
    derivs = _FAST_DERIVS[act.kind]
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
    T = _Pool(zb.size)
    zb_all = fb_all = None
    A, U = a, u
    idx = None
    n_active = zb.size
    live = None
    for it in range(max_iter):
        T.reset()
        r, r1, r2 = derivs(zt, act, T)
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


def _gelu_exact_polish(z, a, u, lam):
    """One Newton step with the exact (erf) GELU from the surrogate's minimiser, kept where it
    lowers the exact objective; updates ``z`` in place, returns the exact objective there."""
    r, r1, r2 = _smooth_derivs(Activation.gelu(), z)
    res = r - a
    dz = z - u
    c = res * res + lam * dz * dz
    g = res * r1 + lam * dz
    h = r1 * r1 + lam + res * r2
    h = np.where(h > 0.0, h, r1 * r1 + lam)
    z2 = z - g / h
    res2 = a - _smooth_value(Activation.gelu(), z2)
    dz2 = z2 - u
    c2 = res2 * res2 + lam * dz2 * dz2
    _keep_better(z, c, z2, c2, dz)
    return c
