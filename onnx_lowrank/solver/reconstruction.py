"""Linear, asymmetric and nonlinear low-rank reconstruction of a layer's responses
(method.md sections 2-4).

Samples are rows: ``Y`` is (n, d), n sampled output positions of a layer with d output
channels. The result is a rank-r map ``M = P Q^T`` and a bias ``b`` with the approximation
``y_approx = M yhat + b`` per sample, i.e. ``Yhat @ Q @ P.T + b`` for rows; the layer is then
rewritten as a Conv with weights ``Q^T W`` followed by a 1x1 Conv with weights ``P``.
All maths in float64; plain NumPy/SciPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .activations import Activation, _z_solve
from .gram import SKETCH_EXTRA, _sketch, _sketchable, centred_gram, gram_block_rows, response_spectrum, sketchable

__all__ = ["Factorisation", "SKETCH_EXTRA", "centred_gram", "gram_block_rows", "linear_reconstruction",
           "nonlinear_reconstruction", "pca_rows", "reduced_rank_regression", "response_spectrum", "sketchable"]


@dataclass
class Factorisation:
    """``y_approx = P @ Q.T @ yhat + b`` per sample; ``P``, ``Q`` are (d, r), ``b`` is (d,)."""

    P: np.ndarray
    Q: np.ndarray
    b: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.P.shape[1])

    @property
    def M(self) -> np.ndarray:
        """The (d, d) rank-r map ``P Q^T``."""
        return self.P @ self.Q.T

    def predict(self, Yhat: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, d): ``Yhat @ Q @ P.T + b``; multiplies through the factors only when that
        is cheaper than through ``M``."""
        X = np.asarray(Yhat, dtype=np.float64)
        d, r = self.P.shape
        if 2 * r < d:
            out = (X @ self.Q) @ self.P.T
        else:
            out = X @ (self.Q @ self.P.T)
        out += self.b
        return out

    def apply_channels(self, Y: np.ndarray) -> np.ndarray:
        """(n, d, positions) -> same: :meth:`predict` over the channel axis of whole feature maps
        (two thin products, 2 d r per position rather than d^2), in float32 for float32 maps (as the
        written model computes them, and half the time of float64 with no widened copy), else float64."""
        dt = np.float32 if Y.dtype == np.float32 else np.float64
        p, qt, b = (np.asarray(a, dtype=dt) for a in (self.P, self.Q.T, self.b))
        out = np.matmul(p, np.matmul(qt, np.asarray(Y, dtype=dt)))
        out += b[:, None]
        return out


def _as_2d(name: str, X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n samples, d channels), got shape {X.shape}")
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} has non-finite values")
    return X


def _check_rank(rank: int, d: int) -> int:
    r = int(rank)
    if r != rank or not 1 <= r <= d:
        raise ValueError(f"rank must be an integer in [1, {d}], got {rank}")
    return r


#: Few of many eigenvectors (d at least this, r at most d / PARTIAL_RATIO) come from Lanczos iterations
#: on the matrix instead of a full eigendecomposition, whose tridiagonal reduction costs d^3 whatever r is
#: (a 6625-wide classifier: about 50 s on 2 cores, Lanczos a few seconds).
PARTIAL_MIN_D, PARTIAL_RATIO = 2048, 16


def _top_eigvecs(G: np.ndarray, r: int, rows: int | None = None, exact: bool = False) -> np.ndarray:
    """Top-r eigenvectors (columns, by descending eigenvalue) of a symmetric PSD matrix; ``rows``: the
    samples ``G`` was summed from (rank <= rows): Lanczos cannot resolve a repeated zero eigenvalue, so
    it is used only when the rank leaves room for r directions. ``exact``: ``G`` is symmetric bit for bit
    (:func:`centred_gram`) and may be overwritten: it is not symmetrised (``0.5 (G + G^T)`` would give the
    same bits and cost two more d x d arrays), and the full decomposition is LAPACK's subset driver."""
    d = G.shape[0]
    if not exact:
        G = 0.5 * (G + G.T)
    if d >= PARTIAL_MIN_D and r * PARTIAL_RATIO <= d and rows is not None and 2 * r < rows:
        vecs = _lanczos_top(G, r)
        if vecs is not None:
            return vecs
    if exact:   # ``G`` is the caller's to overwrite: only the r wanted vectors, no second d x d array
        from scipy.linalg import eigh

        _, vecs = eigh(G, subset_by_index=[d - r, d - 1], driver="evr", overwrite_a=True, check_finite=False)
        return np.ascontiguousarray(vecs[:, ::-1])
    _, vecs = np.linalg.eigh(G)
    return np.ascontiguousarray(vecs[:, ::-1][:, :r]) if r < d else np.ascontiguousarray(vecs[:, ::-1])


def _lanczos_top(G: np.ndarray, r: int) -> np.ndarray | None:
    """Top-r eigenvectors by ARPACK to machine precision from a fixed start (same input, same output);
    None if it does not converge (the caller then decomposes fully)."""
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    try:
        vals, vecs = eigsh(G, k=r, which="LA", v0=np.ones(G.shape[0]), tol=0)
    except ArpackNoConvergence:
        return None
    return np.ascontiguousarray(vecs[:, np.argsort(-vals, kind="stable")])


def _pca(Y: np.ndarray, r: int, rows: np.ndarray | None = None, bound: int | None = None) -> Factorisation:
    """PCA of the rows ``Y[rows]`` (all if None; float32 rows are widened a block at a time); ``bound``: the
    rows' rank at most (see :func:`response_spectrum`), which lets a wide layer skip its d x d Gram."""
    if _sketchable(Y, rows, bound) and r <= bound:
        ybar, T, _ = _sketch(Y, rows, bound + SKETCH_EXTRA)
        U = np.ascontiguousarray(np.linalg.svd(T, full_matrices=False)[2][:r].T)
    else:
        ybar, G, n = centred_gram(Y, rows)
        U = _top_eigvecs(G, r, rows=n - 1, exact=True)
        del G
    b = ybar - U @ (U.T @ ybar)
    return Factorisation(P=U, Q=U.copy(), b=b)


def pca_rows(Y: np.ndarray, rows: np.ndarray, rank: int, bound: int | None = None) -> Factorisation:
    """Section 2's PCA of the ``rows`` (boolean mask) of ``Y`` as kept, float32 or float64, without a float64
    copy of them: a symmetric linear fit holds one (d, d) Gram, not arrays of its rows (a 6,625-wide classifier
    on 9,600 rows: 350 MB instead of 2 GB); with a rank ``bound`` far below d (that classifier has 120 inputs)
    not even the Gram (its syrk alone was 4e11 flops)."""
    if Y.ndim != 2 or not Y.shape[1]:
        raise ValueError(f"Y must be 2-D (n samples, d channels), got shape {Y.shape}")
    return _pca(Y, _check_rank(rank, Y.shape[1]), rows, bound)


class _RRR:
    """Reduced-rank regression onto a fixed input ``X`` (= Yhat): the covariance and its
    eigendecomposition are computed once, so each M-step costs one (d x n)(n x d) product and
    one d x d eigh.

    Dead or constant input channels make ``C = Xc^T Xc`` singular; a relative ridge
    ``ridge * trace(C) / d`` keeps ``Mhat = Zc^T Xc (C + eps I)^-1`` finite and stops
    near-dead channels from amplifying noise."""

    def __init__(self, X: np.ndarray, ridge: float):
        if not ridge >= 0.0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.X = X
        self.xbar = X.mean(axis=0)
        self.Xc = X - self.xbar
        C = self.Xc.T @ self.Xc
        s, V = np.linalg.eigh(0.5 * (C + C.T))
        s = np.clip(s, 0.0, None)
        d = X.shape[1]
        tr = float(s.sum())
        eps = ridge * tr / d
        # ridge = 0 still needs a pseudo-inverse: drop directions at round-off level
        tiny = s <= max(tr, 1e-300) * 1e-13
        inv = np.where(tiny, 0.0, 1.0 / np.where(tiny, 1.0, s + eps))
        self.V = V
        self.inv = inv  # 1 / (s + eps), 0 on the null space
        self.sqrt_s = np.sqrt(s)

    def fit(self, Z: np.ndarray, r: int) -> Factorisation:
        # Z^T Xc = Zc^T Xc because Xc has zero column sums
        return self.fit_cross(Z.T @ self.Xc, Z.mean(axis=0), r)

    def fit_cross(self, cross: np.ndarray, zbar: np.ndarray, r: int) -> Factorisation:
        """``fit`` from ``Z^T Xc`` and the column means of ``Z`` (lets a caller subtract a
        constant offset's share without forming ``Z``)."""
        B = cross @ self.V  # Mhat = B diag(inv) V^T
        Bw = B * (self.sqrt_s * self.inv)  # Mhat C Mhat^T = Bw Bw^T
        U = _top_eigvecs(Bw @ Bw.T, r, rows=self.X.shape[0] - 1)
        Q = self.V @ ((U.T @ B) * self.inv).T  # Mhat^T U
        b = zbar - U @ (Q.T @ self.xbar)
        return Factorisation(P=U, Q=Q, b=b)


def reduced_rank_regression(Z: np.ndarray, Yhat: np.ndarray, rank: int, ridge: float = 1e-6) -> Factorisation:
    """The M,b step of section 3: rank-r ``M`` and ``b`` minimising ``||Z - (Yhat M^T + b)||^2``
    (rows). ``Mhat`` is the (ridged) least-squares regression, ``U`` the top-r eigenvectors of
    ``Mhat C Mhat^T``, ``M = U U^T Mhat``: ``P = U``, ``Q = Mhat^T U``, ``b = zbar - M yhatbar``."""
    Z = _as_2d("Z", Z)
    X = _as_2d("Yhat", Yhat)
    if Z.shape != X.shape:
        raise ValueError(f"Z {Z.shape} and Yhat {X.shape} must have the same shape")
    return _RRR(X, ridge).fit(Z, _check_rank(rank, Z.shape[1]))


def linear_reconstruction(
    Y: np.ndarray, rank: int, Yhat: np.ndarray | None = None, ridge: float = 1e-6
) -> Factorisation:
    """Section 2 (``Yhat`` None: PCA, ``P = Q = U_r``) or section 4's asymmetric linear solution
    (``Yhat`` given: reduced-rank regression of the original responses ``Y`` on the approximated
    network's responses ``Yhat``)."""
    Y = _as_2d("Y", Y)
    r = _check_rank(rank, Y.shape[1])
    if Yhat is None:
        return _pca(Y, r)
    return reduced_rank_regression(Y, Yhat, r, ridge=ridge)


#: A stage of the nonlinear schedule ends once an iteration improves its relaxed objective by less
#: than this, relative (the paper's fixed 25 + 25 iterations mostly polish the last digits).
STOP_TOL = 1e-4


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
    Returns the iterate with the lowest true loss (the linear one if nothing beat it)."""
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
    rrr = _RRR(X, ridge)
    fact = init if init is not None else _pca(Y, r) if Yhat is None else rrr.fit(Y, r)
    u = _predict_into(fact, X, np.empty((n, d)), off_hat)
    loss_lin = _sq(A - activation.apply(u))
    info = SolveInfo(loss_linear=loss_lin, loss_final=loss_lin)
    if activation.is_identity or not sched:
        return fact, info

    # with an offset, Z = W - off_hat: its cross product with Xc and its mean need W's only
    cross_off = None if off_hat is None else off_hat.T @ rrr.Xc
    mean_off = None if off_hat is None else off_hat.mean(axis=0)
    best, best_loss = fact, loss_lin
    pending = 0  # iteration whose accepted factorisation has not been scored yet (0: none)
    u_new = np.empty((n, d))
    W, W_prev = np.empty((n, d)), None
    it = 0
    for k, lam in sched:
        prev = math.inf
        for _ in range(k):
            it += 1
            # z step, warm-started from the previous z (at first: the true pre-activations); its
            # sums give the relaxed objective's fit term and the true loss of the current u
            z0 = pre if W_prev is None else W_prev
            W, _, sums = _z_solve(A, u, lam, activation, z0, want_sums=True, out=W)
            if pending:
                if sums.loss_u < best_loss:
                    best, best_loss, info.best_iteration = fact, sums.loss_u, pending
                pending = 0
            pre = None
            fit_term = sums.fit
            obj_old = fit_term + lam * sums.pen
            cross = W.T @ rrr.Xc
            zbar = W.mean(axis=0)
            if cross_off is not None:
                cross -= cross_off
                zbar -= mean_off
            cand = rrr.fit_cross(cross, zbar, r)
            _predict_into(cand, X, u_new, off_hat)
            obj_new = fit_term + lam * _sqdist(W, u_new)
            # the ridge makes the M step inexact; never let it raise the relaxed objective
            if obj_new <= obj_old:
                fact, obj = cand, obj_new
                u, u_new = u_new, u
                pending = it
            else:
                obj = obj_old
            info.objective.append(obj)
            info.lambdas.append(lam)
            # the next z step writes into the older buffer
            W_prev, W = W, (np.empty((n, d)) if W_prev is None else W_prev)
            if tol > 0 and prev < math.inf and prev - obj <= tol * prev:
                break  # stopped improving at this lambda
            prev = obj
    del W, W_prev, u_new   # the last scoring's temporaries take their place
    if pending:
        loss = _sq(A - activation.apply(u))
        if loss < best_loss:
            best, best_loss, info.best_iteration = fact, loss, pending
    info.iterations = it
    info.loss_final = best_loss
    return best, info
