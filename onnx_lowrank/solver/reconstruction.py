"""Linear, asymmetric and nonlinear low-rank reconstruction of a layer's responses
(method.md sections 2-4).

Samples are rows: ``Y`` is (n, d), n sampled output positions of a layer with d output
channels. The result is a rank-r map ``M = P Q^T`` and a bias ``b`` with the approximation
``y_approx = M yhat + b`` per sample, i.e. ``Yhat @ Q @ P.T + b`` for rows; the layer is then
rewritten as a Conv with weights ``Q^T W`` followed by a 1x1 Conv with weights ``P``.
All maths in float64; plain NumPy/SciPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gram import SKETCH_EXTRA, _sketch, _sketchable, centred_gram, gram_block_rows, response_spectrum, sketchable

__all__ = ["Factorisation", "SKETCH_EXTRA", "centred_gram", "gram_block_rows", "linear_reconstruction",
           "pca_rows", "reduced_rank_regression", "response_spectrum", "sketchable"]


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
