"""Covariances of sampled rows without widening them whole: the Gram by syrk over float64 blocks of rows, and,
for responses of known low rank (a layer with far fewer inputs than outputs), a sketch of their range.

Rows stay as calibration keeps them (float32); ``rows`` is a boolean mask of the rows to use. Plain NumPy/SciPy.
"""

from __future__ import annotations

import weakref

import numpy as np


#: Extra directions of the sketch in :func:`response_spectrum` beyond the responses' rank bound.
SKETCH_EXTRA = 10


def response_spectrum(Y: np.ndarray, rows: np.ndarray | None = None, bound: int | None = None) -> np.ndarray:
    """Eigenvalues (descending, clipped at >= 0) of the covariance ``Yc^T Yc / n`` of the centred
    responses ``Y[rows]`` (all if None), the energies of section 5's rank selection. With PCA at rank r the
    mean squared residual per sample equals the sum of the discarded eigenvalues.

    ``bound``: the responses' rank at most (a layer's inputs per output position, c k_h k_w: ``y = W x + beta``).
    Well below d (a 6,625-class classifier of 120 inputs) the nonzero eigenvalues come from a sketch of that
    many directions and the rest are 0: two thin products instead of the d x d covariance and its eigvalsh
    (23 s there), exact but for the float32 rounding of the samples outside the layer's span."""
    if _sketchable(Y, rows, bound):
        _, T, n = _sketch(Y, rows, bound + SKETCH_EXTRA)
        w = np.clip(np.linalg.eigvalsh(T @ T.T)[::-1] / n, 0.0, None)
        return np.concatenate([w, np.zeros(Y.shape[1] - len(w))])
    _, G, n = centred_gram(Y, rows)
    w = np.linalg.eigvalsh(G / n)[::-1]
    return np.clip(w, 0.0, None)


def _sketchable(Y: np.ndarray, rows: np.ndarray | None, bound: int | None) -> bool:
    n = Y.shape[0] if rows is None else int(np.count_nonzero(rows))
    return sketchable(n, Y.shape[1], bound)


def sketchable(n: int, d: int, bound: int | None) -> bool:
    """Whether ``n`` responses of rank <= ``bound`` are far narrower than their ``d`` channels: their spectrum and
    PCA then come from a sketch of ``bound + SKETCH_EXTRA`` directions (:func:`_sketch`), not the d x d Gram.
    A factorised layer's rank is below its break-even rank d b / (b + d) < b, so the sketch holds it."""
    return bound is not None and (bound + SKETCH_EXTRA) * 4 <= d and bound + SKETCH_EXTRA < n


#: The last sketch taken: (a weak reference to its rows' array, their mask, m, the result, the array's float64
#: column sums, which tell whether it was written to since). Rank choice's spectrum and the layer's symmetric PCA
#: ask for the same one (a 6,625-wide classifier: two products of 1.6e10 flops, about a second on 2 cores); one
#: entry, so the memory it keeps is one (m, d) matrix.
_LAST: tuple | None = None


def _sketch(Y: np.ndarray, rows: np.ndarray | None, m: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Column means, ``T = Q^T Yc`` (m, d) and the row count, for centred rows ``Yc`` of rank < m: ``Q`` spans
    the range of ``Yc Omega`` (a fixed Gaussian ``Omega``, d x m), which then holds that of ``Yc``, so
    ``Yc = Q T``: ``Yc^T Yc = T^T T`` (the same nonzero eigenvalues as ``T T^T``, the eigenvectors are T's
    right singular vectors). Two thin products over float64 blocks of rows; the same rows of the same array again
    (its column sums unchanged: not written to since): the last result (copies)."""
    global _LAST
    last, _LAST = _LAST, None
    sums = Y.sum(axis=0, dtype=np.float64)
    if last is not None and last[0]() is Y and last[2] == m and np.array_equal(last[4], sums) and (
            last[1] is None if rows is None else last[1] is not None and np.array_equal(rows, last[1])):
        _LAST = last
        mean, T, n = last[3]
        return mean.copy(), T.copy(), n
    out = _sketch_rows(Y, rows, m)
    _LAST = (weakref.ref(Y), None if rows is None else rows.copy(), m, (out[0].copy(), out[1].copy(), out[2]), sums)
    return out


def _sketch_rows(Y: np.ndarray, rows: np.ndarray | None, m: int) -> tuple[np.ndarray, np.ndarray, int]:
    omega = np.random.default_rng(0).standard_normal((Y.shape[1], m))
    blocks, n = _row_blocks(Y, rows)
    mean = _finite_mean(blocks, n)
    Q, _ = np.linalg.qr(np.concatenate([(b - mean) @ omega for b in blocks()]))
    T, i = np.zeros((m, Y.shape[1])), 0
    for b in blocks():
        T += Q[i:i + len(b)].T @ (b - mean)
        i += len(b)
    return mean, T, n


def _row_blocks(Y: np.ndarray, rows: np.ndarray | None):
    """A generator of the float64 blocks of rows ``Y[rows]`` (see :func:`gram_block_rows`), and their count."""
    idx = None if rows is None else np.flatnonzero(rows)
    n, d = Y.shape[0] if idx is None else len(idx), Y.shape[1]
    step = gram_block_rows(n, d)

    def blocks():
        for i in range(0, n, step):
            yield np.asarray(Y[i:i + step] if idx is None else Y[idx[i:i + step]], dtype=np.float64)
    return blocks, n


def _finite_mean(blocks, n: int) -> np.ndarray:
    """Column means of the rows of ``blocks`` (from :func:`_row_blocks`), refusing non-finite rows: a NaN or inf
    leaves its column's sum non-finite (float32 rows summed in float64 cannot overflow), so the check costs
    nothing beyond the sum, and the spectrum and the PCA fail with this message, not LinAlgError from eigh."""
    mean = sum(b.sum(axis=0) for b in blocks()) / n
    if not np.isfinite(mean).all():
        raise ValueError("the responses have non-finite values (NaN or inf): the model overflows or computes NaN "
                         "on the calibration data")
    return mean


#: Rows per block of :func:`centred_gram`: about this many float64 elements (32 MB), and at most an eighth of
#: the rows (so that a block is small beside them), but at least 256 rows (BLAS runs short blocks slowly).
GRAM_BLOCK = 1 << 22


def gram_block_rows(n: int, d: int) -> int:
    """Rows per block of :func:`centred_gram` for ``n`` rows of ``d`` channels."""
    return min(n, max(256, min(GRAM_BLOCK // max(d, 1), n // 8)))


def centred_gram(Y: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Column means, the Gram ``Yc^T Yc`` of the centred rows ``Y[rows]`` (all rows if None) and their count.

    Summed by ``syrk`` (half the flops of a product) over float64 blocks of rows: ``Y`` may stay float32 (the
    samples as kept) and is never widened or centred whole, so the only large array is the (d, d) result,
    symmetric bit for bit."""
    from scipy.linalg.blas import dsyrk

    blocks, n = _row_blocks(Y, rows)
    d = Y.shape[1]
    mean = _finite_mean(blocks, n)
    G = np.zeros((d, d), order="F")
    for b in blocks():
        c = b - mean   # a new block: ``b`` may be a view of the caller's rows
        # c^T c: ``c.T`` is the Fortran-ordered (d, m) view BLAS wants; the upper triangle accumulates in place
        G = dsyrk(1.0, c.T, beta=1.0, c=G, trans=0, lower=0, overwrite_c=1)
    step = gram_block_rows(n, d)
    for j in range(0, d, step):   # mirror the upper triangle, a block of columns at a time
        blk = G[j:j + step, j:j + step]
        blk[...] = np.triu(blk) + np.triu(blk, 1).T
        G[j + step:, j:j + step] = G[j:j + step, j + step:].T
    return mean, G, n


