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


def z_objective(z: np.ndarray, a: np.ndarray, u: np.ndarray, lam: float, act: Activation) -> np.ndarray:
    """Elementwise ``(a - r(z))**2 + lam * (z - u)**2`` (what ``z_step`` minimises)."""
    z = np.asarray(z, dtype=np.float64)
    return (np.asarray(a, dtype=np.float64) - act.apply(z)) ** 2 + lam * (z - np.asarray(u, dtype=np.float64)) ** 2


def z_step(a: np.ndarray, u: np.ndarray, lam: float, act: Activation) -> np.ndarray:
    """Elementwise global argmin over ``z`` of ``(a - r(z))**2 + lam * (z - u)**2``."""
    return z_step_with_cost(a, u, lam, act)[0]


def z_step_with_cost(
    a: np.ndarray, u: np.ndarray, lam: float, act: Activation
) -> tuple[np.ndarray, np.ndarray]:
    """``z_step`` plus the elementwise objective at the returned ``z`` (saves re-evaluating ``r``)."""
    lam = float(lam)
    if not lam > 0.0 or not math.isfinite(lam):
        raise ValueError(f"lambda must be a positive finite number, got {lam}")
    a = np.asarray(a, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    a, u = np.broadcast_arrays(a, u)
    k = act.kind
    if k in PIECEWISE_LINEAR:
        pieces = _linear_pieces(act)

        def solve(aa, uu):
            return _piecewise_linear(aa, uu, lam, pieces)

    elif k == "hardswish":

        def solve(aa, uu):
            return _hardswish(aa, uu, lam)

    else:

        def solve(aa, uu):
            return _smooth(aa, uu, lam, act)

    if a.ndim < 2 or a.size <= _CHUNK:
        return solve(a, u)
    # row blocks keep the many elementwise temporaries in cache (a few times faster)
    rows = max(1, _CHUNK // (a.size // a.shape[0]))
    z = np.empty(a.shape)
    cost = np.empty(a.shape)
    for i in range(0, a.shape[0], rows):
        z[i : i + rows], cost[i : i + rows] = solve(a[i : i + rows], u[i : i + rows])
    return z, cost


_CHUNK = 1 << 15


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


def _piecewise_linear(a: np.ndarray, u: np.ndarray, lam: float, pieces: list[_Piece]) -> tuple[np.ndarray, np.ndarray]:
    """Per piece, the unconstrained minimiser of the quadratic, clipped into the piece; keep the
    cheapest. Exact because the objective restricted to one piece is a convex quadratic."""
    best_z = best_c = None
    for s, c, lo, hi in pieces:
        if np.ndim(s) == 0 and s == 0.0:
            z = np.clip(u, lo, hi)
            diff = a - c
            cost = diff * diff
        else:
            z = (s * (a - c) + lam * u) / (s * s + lam)
            np.clip(z, lo, hi, out=z)
            diff = a - s * z
            if c != 0.0:
                diff -= c
            cost = diff * diff
        dz = z - u
        cost += lam * (dz * dz)
        if best_z is None:
            best_z, best_c = z, cost
        else:
            better = cost < best_c
            np.copyto(best_z, z, where=better)
            np.copyto(best_c, cost, where=better)
    return best_z, best_c


def _hardswish(a: np.ndarray, u: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """HardSwish = 0 on z <= -3, z on z >= 3, z (z + 3) / 6 in between. The outer pieces are
    linear (closed form); on the middle piece the stationary points solve the cubic
    ``z^3 + 4.5 z^2 + (4.5 - 6a + 18 lam) z - 9a - 18 lam u = 0`` (solved exactly)."""
    inf = math.inf
    best_z, best_c = _piecewise_linear(a, u, lam, [(0.0, 0.0, -inf, -3.0), (1.0, 0.0, 3.0, inf)])
    c1 = 4.5 - 6.0 * a + 18.0 * lam
    c0 = -9.0 * a - 18.0 * lam * u
    # depressed cubic t^3 + p t + q = 0 with z = t - 1.5
    p = c1 - 6.75
    q = 6.75 - 1.5 * c1 + c0
    disc = (0.5 * q) ** 2 + (p / 3.0) ** 3
    one = disc > 0.0
    sq = np.sqrt(np.where(one, disc, 0.0))
    t_one = np.cbrt(-0.5 * q + sq) + np.cbrt(-0.5 * q - sq)
    p_neg = np.where(one, -1.0, np.minimum(p, -1e-300))
    m = 2.0 * np.sqrt(-p_neg / 3.0)
    arg = np.clip((3.0 * q / (2.0 * p_neg)) * np.sqrt(-3.0 / p_neg), -1.0, 1.0)
    theta = np.arccos(arg) / 3.0
    for kk in range(3):
        t = np.where(one, t_one, m * np.cos(theta - 2.0 * math.pi * kk / 3.0))
        z = np.clip(t - 1.5, -3.0, 3.0)
        z, cost = _hardswish_polish(z, a, u, lam)
        better = cost < best_c
        np.copyto(best_z, z, where=better)
        np.copyto(best_c, cost, where=better)
    return best_z, best_c


def _hardswish_polish(z, a, u, lam):
    """One Newton step on the middle-piece quartic to clean up round-off in the cubic roots,
    kept only where it helps."""

    def cost_mid(zz):
        r = zz * (zz + 3.0) / 6.0
        return (a - r) ** 2 + lam * (zz - u) ** 2

    r = z * (z + 3.0) / 6.0
    r1 = (2.0 * z + 3.0) / 6.0
    g = (r - a) * r1 + lam * (z - u)
    h = r1 * r1 + (r - a) / 3.0 + lam
    safe = h > 0.0
    z2 = np.clip(z - np.where(safe, g / np.where(safe, h, 1.0), 0.0), -3.0, 3.0)
    c, c2 = cost_mid(z), cost_mid(z2)
    take = c2 < c
    return np.where(take, z2, z), np.where(take, c2, c)


# smooth activations -----------------------------------------------------------------------------

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
    """Monotone branches of ``r`` and the radius of its curved region (beyond which the
    objective is nearly quadratic, so long descent steps are safe)."""
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


def _preimage(a: np.ndarray, br: _Branch) -> np.ndarray:
    """Approximately the z on this branch with r(z) = a (clamped to the branch's steep part)."""
    z = np.interp(a, br.vals, br.zs)
    if abs(br.slope_hi) > 1e-3:
        z = np.where(a > br.vals[-1], br.zs[-1] + (a - br.vals[-1]) / br.slope_hi, z)
    if abs(br.slope_lo) > 1e-3:
        z = np.where(a < br.vals[0], br.zs[0] + (a - br.vals[0]) / br.slope_lo, z)
    return np.clip(z, br.lo_z, br.hi_z)


def _smooth(a: np.ndarray, u: np.ndarray, lam: float, act: Activation) -> tuple[np.ndarray, np.ndarray]:
    shape = a.shape
    af = np.ascontiguousarray(a, dtype=np.float64).ravel()
    uf = np.ascontiguousarray(u, dtype=np.float64).ravel()
    branches, radius = _tables(act)
    starts = [uf] + [_preimage(af, br) for br in branches]
    k = len(starts)
    # all starts descend together (one set of array operations instead of k)
    z, c = _descend(np.concatenate(starts), np.tile(af, k), np.tile(uf, k), lam, act, radius)
    z, c = z.reshape(k, -1), c.reshape(k, -1)
    pick = np.argmin(c, axis=0)
    cols = np.arange(af.size)
    return z[pick, cols].reshape(shape), c[pick, cols].reshape(shape)


def _descend(
    z: np.ndarray,
    a: np.ndarray,
    u: np.ndarray,
    lam: float,
    act: Activation,
    radius: float,
    max_iter: int = 150,
    max_halvings: int = 30,
) -> tuple[np.ndarray, np.ndarray]:
    """Monotone descent on the 1-D objective: Newton where the curvature is positive, else the
    Gauss-Newton step (curvature ``r'^2 + lam > 0``). A trial point is accepted when the
    objective decreases, else the step is halved; the objective at a trial point comes with the
    derivatives there, so each iteration costs one evaluation of ``r, r', r''``. Inside the
    curved region of ``r`` a step moves at most 0.5 so that it cannot jump over a basin into a
    worse one; outside, the objective is nearly quadratic and the cap grows with the distance
    to that region. Converged elements leave the working arrays once half of them are done."""
    z = np.array(z, dtype=np.float64)
    idx = np.flatnonzero(np.isfinite(z))
    zt, ai, ui = z[idx], a[idx], u[idx]  # trial points, to be evaluated
    zb = zt.copy()  # last accepted point
    fb = np.full(idx.size, np.inf)
    step = np.zeros(idx.size)
    t = np.ones(idx.size)
    active = np.ones(idx.size, dtype=bool)
    min_t = 0.5**max_halvings
    for _ in range(max_iter):
        r, r1, r2 = _smooth_derivs(act, zt)
        res = r - ai
        dz = zt - ui
        ft = res * res + lam * (dz * dz)
        acc = active & (ft < fb)
        rej = active & ~acc
        # accepted: move there and take a new step
        np.copyto(zb, zt, where=acc)
        np.copyto(fb, ft, where=acc)
        g = res * r1 + lam * dz
        h = r1 * r1 + res * r2 + lam
        new = -g / np.where(h > 0.0, h, r1 * r1 + lam)
        cap = 0.5 + np.maximum(np.abs(zt) - radius, 0.0)
        np.clip(new, -cap, cap, out=new)
        np.copyto(step, new, where=acc)
        np.copyto(t, 1.0, where=acc)
        # a step this small is below what the objective can resolve: take it and stop
        tiny = acc & (np.abs(new) <= 1e-9 * (1.0 + np.abs(zt)))
        np.add(zb, new, out=zb, where=tiny)
        active &= ~tiny
        # rejected: halve the step from the last accepted point; give up when it vanishes
        np.multiply(t, 0.5, out=t, where=rej)
        active &= ~(rej & (t < min_t))
        zt = zb + t * step
        n_active = int(np.count_nonzero(active))
        if n_active == 0:
            break
        if n_active < 0.5 * active.size:
            z[idx] = zb
            keep = np.flatnonzero(active)
            idx, zt, ai, ui, zb, fb, step, t = (x[keep] for x in (idx, zt, ai, ui, zb, fb, step, t))
            active = np.ones(idx.size, dtype=bool)
    z[idx] = zb
    res = a - _smooth_value(act, z)
    dz = z - u
    return z, res * res + lam * (dz * dz)
