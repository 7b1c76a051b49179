"""Nonlinear (and asymmetric) reconstruction of a layer's responses: method.md sections 3-4's loop.

Alternates the elementwise z step (``activations``) and the M step (``mstep``, reduced-rank regression on
whitened inputs) from a linear solution. Rows are samples, as in ``reconstruction``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .activations import Activation, _z_solve
from .mstep import WhitenedFit
from .reconstruction import Factorisation, _as_2d, _check_rank, _pca, _RRR

#: A stage of the nonlinear schedule ends once an iteration improves its relaxed objective by less
#: than this, relative (the paper's fixed 25 + 25 iterations mostly polish the last digits).
STOP_TOL = 1e-4
#: With held-back rows, a stage also ends once the held-back error has not improved by this much
#: (relative) for HELD_PATIENCE iterations: with few rows per channel the fitted loss keeps falling while
#: the held-back error rises (MiniLM's 1536-wide layers, 2.9 rows per channel: best at 10 of 50 iterations).
HELD_TOL, HELD_PATIENCE = 1e-3, 2


@dataclass
class SolveInfo:
    """``objective``: the relaxed objective after each iteration (its ``lam`` in ``lambdas``);
    ``loss_linear`` / ``loss_final``: the true post-activation squared error of the linear
    initialisation / the returned solution."""

    objective: list[float] = field(default_factory=list)
    loss_linear: float = 0.0
    loss_final: float = 0.0
    iterations: int = 0
    lambdas: list[float] = field(default_factory=list)
    best_iteration: int = 0  # 0: the linear initialisation was kept
    held_error: list[float] = field(default_factory=list)  # held-back squared error after each iteration


@dataclass
class HeldOut:
    """Rows held back from the fit: ``X`` their inputs (rows of ``Yhat``), ``A`` their targets after the
    activation, ``offset`` their rows of ``offset_hat`` (None: no offset); float32 (as sampled) or float64."""

    X: np.ndarray
    A: np.ndarray
    offset: np.ndarray | None = None

    def error(self, f: Factorisation, act: Activation) -> float:
        """Squared error of ``r(f(X) + offset)`` against ``A`` (by row blocks: no temporaries of their size), in
        float32 products and activations (it only decides where the loop stops), summed in float64."""
        d, r = f.P.shape
        mats = (f.Q, f.P.T) if 2 * r < d else (f.Q @ f.P.T,)
        mats = [np.ascontiguousarray(m, dtype=np.float32) for m in mats]
        b = f.b.astype(np.float32)
        step = max(1, (1 << 16) // d)
        total = 0.0
        for i in range(0, self.X.shape[0], step):
            rows = slice(i, i + step)
            p = self.X[rows]
            for m in mats:
                p = p @ m
            p += b
            if self.offset is not None:
                p += self.offset[rows]
            t = self.A[rows] - act.impl.value(p)
            total += _sq(t.astype(np.float64, copy=False))
        return total


def _offset(name: str, off, shape) -> np.ndarray | None:
    if off is None:
        return None
    off = np.asarray(off, dtype=np.float64)
    try:
        off = np.broadcast_to(off, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {off.shape} does not broadcast to {shape}") from None
    if not np.isfinite(off).all():
        raise ValueError(f"{name} has non-finite values")
    return off


def _sq(x: np.ndarray) -> float:
    x = x.ravel()
    return float(np.dot(x, x))


_ROWS = 1 << 14  # elements per block in the blocked reductions below


def _sqdist(x: np.ndarray, y: np.ndarray) -> float:
    """``||x - y||^2`` of (n, d) arrays, by row blocks (no n x d temporary)."""
    step = max(1, _ROWS // max(x.shape[1], 1))
    t = np.empty((min(step, x.shape[0]), x.shape[1]))
    total = 0.0
    for i in range(0, x.shape[0], step):
        tb = t[: x[i : i + step].shape[0]]
        np.subtract(x[i : i + step], y[i : i + step], out=tb)
        tb = tb.ravel()
        total += float(np.dot(tb, tb))
    return total


def _predict_into(f: Factorisation, X: np.ndarray, out: np.ndarray, off: np.ndarray | None) -> np.ndarray:
    """``f.predict(X) (+ off)`` written into ``out``."""
    d, r = f.P.shape
    if 2 * r < d:
        np.matmul(X @ f.Q, f.P.T, out=out)
    else:
        np.matmul(X, f.Q @ f.P.T, out=out)
    out += f.b
    if off is not None:
        out += off
    return out


def nonlinear_reconstruction(
    Y: np.ndarray,
    rank: int,
    activation: Activation,
    Yhat: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    offset_hat: np.ndarray | None = None,
    schedule=((25, 0.01), (25, 1.0)),
    ridge: float = 1e-6,
    init: Factorisation | None = None,
    tol: float = STOP_TOL,
    held: HeldOut | None = None,
    rrr: _RRR | None = None,
) -> tuple[Factorisation, SolveInfo]:
    """Section 3 (and 4 with ``Yhat``): minimise ``sum ||r(Y + offset) - r(Yhat M^T + b + offset_hat)||^2``
    over rank-r ``M`` and ``b`` through the relaxation
    ``sum ||a - r(w)||^2 + lam ||w - (M yhat + b + offset_hat)||^2``, alternating the exact
    elementwise z step and the reduced-rank regression M step, from the linear solution.

    ``offset`` is a residual shortcut added before the activation (a per-sample constant);
    ``Yhat`` None means ``Yhat = Y``, ``offset_hat`` None means ``offset_hat = offset``.
    ``init`` replaces the default start (PCA of Y, or the regression of Y on Yhat), e.g. a linear
    fit that already accounts for ``offset - offset_hat``.
    Each stage of the schedule ends early once an iteration lowers the relaxed objective by less
    than ``tol`` relative (0: run every iteration).
    Returns the iterate with the lowest true loss (the linear one if nothing beat it); with ``held``
    rows, the iterate with the lowest held-back error, and a stage also ends once that stops improving
    (:data:`HELD_TOL`, :data:`HELD_PATIENCE`): early stopping, the fitted rows alone overfit.
    ``rrr``: the regression set up on ``Yhat`` already (e.g. for the linear start, with ``ridge``); the loop takes
    its centred rows (``rrr.Xc`` is None after the call), so that they are not held twice."""
    Y = _as_2d("Y", Y)
    n, d = Y.shape
    r = _check_rank(rank, d)
    X = Y if Yhat is None else _as_2d("Yhat", Yhat)
    if X.shape != Y.shape:
        raise ValueError(f"Yhat {X.shape} must have the shape of Y {Y.shape}")
    off = _offset("offset", offset, Y.shape)
    off_hat = off if offset_hat is None else _offset("offset_hat", offset_hat, Y.shape)
    if not isinstance(activation, Activation):
        raise TypeError(f"activation must be an Activation, got {type(activation).__name__}")
    sched = [(int(k), float(lam)) for k, lam in schedule]
    for k, lam in sched:
        if k < 0 or not (lam > 0.0 and math.isfinite(lam)):
            raise ValueError(f"bad schedule entry ({k}, {lam}): need iterations >= 0 and lambda > 0")

    pre = Y if off is None else Y + off  # the true pre-activations: r(pre) = A exactly
    A = activation.apply(pre)
    if rrr is None:
        rrr = _RRR(X, ridge)
    elif rrr.X is not X or rrr.Xc is None:
        raise ValueError("rrr must be set up on Yhat, and not used by a loop before")
    fact = init if init is not None else _pca(Y, r) if Yhat is None else rrr.fit(Y, r)
    u = _predict_into(fact, X, np.empty((n, d)), off_hat)
    loss_lin = _sq(A - activation.apply(u))
    info = SolveInfo(loss_linear=loss_lin, loss_final=loss_lin)
    if activation.is_identity or not sched:
        return fact, info

    # each M step regresses Z = W - off_hat on X: through X whitened once (float32)
    mstep = WhitenedFit(rrr.Xc, rrr.xbar, rrr.V, rrr.inv, rrr.sqrt_s, off_hat, r)
    rrr.Xc = None
    del rrr
    start = fact
    best, best_loss = fact, loss_lin
    h = h_best = None if held is None else held.error(fact, activation)
    pending = 0  # iteration whose accepted factorisation has not been scored yet (0: none)
    u_new = np.empty((n, d))
    W, W_prev = np.empty((n, d)), None
    it = 0
    for k, lam in sched:
        prev = stage_best = math.inf
        stall = 0
        for _ in range(k):
            it += 1
            # z step, warm-started from the previous z (at first: the true pre-activations); its
            # sums give the relaxed objective's fit term and the true loss of the current u
            z0 = pre if W_prev is None else W_prev
            W, _, sums = _z_solve(A, u, lam, activation, z0, want_sums=True, want_loss_u=held is None, out=W)
            if pending:
                if sums.loss_u < best_loss:
                    best, best_loss, info.best_iteration = fact, sums.loss_u, pending
                pending = 0
            pre = None
            fit_term = sums.fit
            obj_old = fit_term + lam * sums.pen
            cand = mstep.fit(W, start=fact.P, predict=u_new)
            obj_new = fit_term + lam * _sqdist(W, u_new)
            # the ridge makes the M step inexact; never let it raise the relaxed objective
            if obj_new <= obj_old:
                fact, obj = cand, obj_new
                u, u_new = u_new, u
                pending = it if held is None else 0
                if held is not None:
                    h = held.error(fact, activation)
                    if h < h_best:
                        best, h_best, info.best_iteration = fact, h, it
            else:
                obj = obj_old
            info.objective.append(obj)
            info.lambdas.append(lam)
            # the next z step writes into the older buffer
            W_prev, W = W, (np.empty((n, d)) if W_prev is None else W_prev)
            if held is not None:
                info.held_error.append(h)
                stall = 0 if h < stage_best * (1.0 - HELD_TOL) else stall + 1
                stage_best = min(stage_best, h)
                if stall >= HELD_PATIENCE:
                    break  # the held-back error stopped improving at this lambda
            if tol > 0 and prev < math.inf and prev - obj <= tol * prev:
                break  # stopped improving at this lambda
            prev = obj
    del W, W_prev, u_new   # the last scoring's temporaries take their place
    if pending:
        loss = _sq(A - activation.apply(u))
        if loss < best_loss:
            best, best_loss, info.best_iteration = fact, loss, pending
    if best is not start:  # in float64 (the loop's predictions are float32 products)
        best_loss = _sq(A - activation.apply(_predict_into(best, X, u, off_hat)))
    info.iterations = it
    info.loss_final = best_loss
    return best, info
