"""The M step of the nonlinear loop (method.md section 3) on whitened inputs, float32 products.

The loop regresses a new ``Z`` on the same ``X`` about 30-50 times. :class:`WhitenedFit` whitens ``X``
once, ``Xw = Xc V diag(sqrt(s) / (s + eps))`` from the ridged eigendecomposition ``C = V diag(s) V^T``
of ``Xc^T Xc``, so that each step needs one (n, d) x (n, d) product ``Bw = Zc^T Xw`` (float32: half the
time of float64, the z step's own precision) and the top-r eigenvectors of ``Bw Bw^T = Mhat C Mhat^T``.
The eigenvectors come from :class:`WarmEig` where that pays (wide layers, rank well below the width):
the previous step's Ritz basis, refined by block Krylov steps, instead of a full ``d x d`` eigh each time.
The loop's prediction on the fitted rows comes from ``Xw`` too (float32 products, float64 result).
"""

from __future__ import annotations

import numpy as np

from . import reconstruction as rec
from .reconstruction import Factorisation

#: A warm-started eigensolver for layers at least this wide whose rank (plus :data:`EXTRA`) is at most
#: this share of the width; the full eigh otherwise.
WARM_MIN_D, WARM_MAX_SHARE = 512, 0.5
#: Ritz vectors kept beyond the rank: the directions just below the cut converge with the rest.
EXTRA = 32
#: Krylov steps end once the captured energy grows by less than this (relative to the energy left out).
WARM_TOL = 1e-5
WARM_MAX_STEPS = 8


class WhitenedFit:
    """Reduced-rank regression of ``Z - off`` on a fixed ``X`` (float32 whitened copy of ``Xc``)."""

    def __init__(self, Xc: np.ndarray, xbar: np.ndarray, V: np.ndarray, inv: np.ndarray, sqrt_s: np.ndarray,
                 off: np.ndarray | None, rank: int):
        keep = inv > 0
        n, d = Xc.shape
        Vw = (V * np.where(keep, sqrt_s * inv, 0.0)).astype(np.float32)
        self.Xw = np.empty((n, d), dtype=np.float32)
        step = max(1, (1 << 16) // d)
        for i in range(0, n, step):
            np.matmul(Xc[i : i + step].astype(np.float32), Vw, out=self.Xw[i : i + step])
        self.Vq = V * np.where(keep, 1.0 / np.where(keep, sqrt_s, 1.0), 0.0)
        # Xc Q = Xw diag(k) Bw^T U with Q = Vq Bw^T U: k = (s + eps) / s on the support, 0 off it
        self.k = np.where(keep, 1.0 / np.where(keep, sqrt_s * sqrt_s * inv, 1.0), 0.0)
        self.xbar = xbar
        self.off = off
        self.off_mean = None if off is None else off.mean(axis=0)
        self.block = max(256, (1 << 20) // d)  # rows per float32 product: a (block, d) buffer, not (n, d)
        self.Zc = np.empty((min(self.block, n), d), dtype=np.float32)
        self.eig = WarmEig(d, rank, rows=n - 1)

    def fit(self, W: np.ndarray, start: np.ndarray | None = None, predict: np.ndarray | None = None) -> Factorisation:
        """The M step for ``Z = W - off``; ``start``: directions to warm-start the eigensolver from. ``predict``:
        an (n, d) float64 array to receive the fit's prediction ``X Q P^T + b + off`` on the fitted rows, in
        float32 products on ``Xw`` (as the step's own, half the time of float64 ones on ``X``)."""
        zbar = W.mean(axis=0)
        if self.off_mean is not None:
            zbar -= self.off_mean
        n, d = W.shape
        Bw = np.zeros((d, d))  # Zc^T Xw; Mhat = Bw diag(1/sqrt s) V^T on the support
        for i in range(0, n, self.block):
            rows = slice(i, i + self.block)
            zc = self.Zc[: W[rows].shape[0]]
            np.subtract(W[rows], zbar, out=zc, casting="same_kind")
            if self.off is not None:
                np.subtract(zc, self.off[rows], out=zc, casting="same_kind")
            Bw += zc.T @ self.Xw[rows]
        U = self.eig.top(Bw @ Bw.T, start)
        BU = Bw.T @ U
        Q = self.Vq @ BU  # Mhat^T U
        b = zbar - U @ (Q.T @ self.xbar)
        f = Factorisation(P=U, Q=Q, b=b)
        if predict is not None:
            self._predict_into(f, BU * self.k[:, None], predict)
        return f

    def _predict_into(self, f: Factorisation, Qw: np.ndarray, out: np.ndarray) -> None:
        """``out = Xw Qw P^T + (P Q^T xbar + b) + off``, i.e. ``f.predict(X) + off`` (``Xc Q = Xw Qw``), a block of
        rows at a time through the float32 scratch ``Zc``; the sums in float64."""
        d, r = f.P.shape
        const = f.P @ (f.Q.T @ self.xbar) + f.b
        if 2 * r < d:
            A, B = Qw.astype(np.float32), np.ascontiguousarray(f.P.T, dtype=np.float32)
            t = np.empty((min(self.block, out.shape[0]), r), dtype=np.float32)
        else:
            A, B = (Qw @ f.P.T).astype(np.float32), None
        for i in range(0, out.shape[0], self.block):
            rows = slice(i, i + self.block)
            o = self.Zc[: out[rows].shape[0]]
            if B is None:
                np.matmul(self.Xw[rows], A, out=o)
            else:
                np.matmul(np.matmul(self.Xw[rows], A, out=t[: len(o)]), B, out=o)
            np.add(o, const, out=out[rows])
            if self.off is not None:
                out[rows] += self.off[rows]


class WarmEig:
    """Top-r eigenvectors of a sequence of slowly changing symmetric PSD matrices."""

    def __init__(self, d: int, r: int, rows: int):
        self.r, self.rows = r, rows
        self.k = min(d, r + EXTRA)
        self.warm = d >= WARM_MIN_D and self.k <= WARM_MAX_SHARE * d and 2 * self.k < rows
        self.basis = None
        self.steps: list[int] = []

    def top(self, G: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
        if not self.warm:
            return rec._top_eigvecs(G, self.r, rows=self.rows)
        G = 0.5 * (G + G.T)
        S = self.basis if self.basis is not None else start
        if S is None:
            S = rec._top_eigvecs(G, self.k, rows=self.rows)
            steps = 0
        else:
            S, steps = _block_krylov(G, S, self.k, self.r)
        self.basis = S
        self.steps.append(steps)
        return np.ascontiguousarray(S[:, : self.r])


def _block_krylov(G: np.ndarray, S: np.ndarray, k: int, r: int) -> tuple[np.ndarray, int]:
    """Rayleigh-Ritz on ``[S, R]`` (``R``: the residual ``G S - S (S^T G S)``, orthonormalised) until the
    sum of the top-r Ritz values grows by less than :data:`WARM_TOL` of the energy left out; returns the
    top-k Ritz vectors (descending) and the number of steps. ``S``: orthonormal columns (d, >= r)."""
    trace = float(np.trace(G))
    GS = G @ S
    H = S.T @ GS
    prev = float(np.trace(H[:r, :r]))
    for step in range(1, WARM_MAX_STEPS + 1):
        R = GS - S @ H
        for _ in range(2):  # twice: the residual is small next to S, one pass leaves round-off along S
            R -= S @ (S.T @ R)
            R = np.linalg.qr(R)[0]
        K = np.concatenate([S, R], axis=1)
        GK = np.concatenate([GS, G @ R], axis=1)
        th, v = np.linalg.eigh(K.T @ GK)
        v = v[:, np.argsort(-th, kind="stable")[:k]]
        S, GS = K @ v, GK @ v
        H = S.T @ GS
        got = float(np.trace(H[:r, :r]))
        if got - prev <= WARM_TOL * max(trace - got, 0.0):
            break
        prev = got
    return np.ascontiguousarray(S), step
