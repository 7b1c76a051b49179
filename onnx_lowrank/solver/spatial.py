"""Data-free spatial SVD (Jaderberg et al. 2014, scheme 2; method.md section 6).

A ``kh x kw`` Conv (group 1, weights ``W`` of shape ``(d, c, kh, kw)``) is split into

* a vertical ``kh x 1`` Conv ``c -> rank``, weights ``V`` of shape ``(rank, c, kh, 1)``, no bias;
* a horizontal ``1 x kw`` Conv ``rank -> d``, weights ``H`` of shape ``(d, rank, 1, kw)``,
  carrying the original bias,

from the truncated SVD of ``W`` reshaped to the ``(c kh) x (d kw)`` matrix
``A[(ch, p), (o, q)] = W[o, ch, p, q]``: ``A ~= U_r S_r Vt_r``, ``V <- U_r sqrt(S_r)``,
``H <- sqrt(S_r) Vt_r`` (the singular values are split evenly between the two factors).
The rank-``r`` truncation is the Frobenius-optimal such split; at
``rank = min(c kh, d kw)`` it is exact.

Splitting the Conv attributes (ONNX order: ``strides = [sh, sw]``,
``pads = [top, left, bottom, right]``, ``dilations = [dh, dw]``; resolve ``auto_pad`` to
explicit pads first):

* vertical:   ``strides = [sh, 1]``, ``pads = [top, 0, bottom, 0]``, ``dilations = [dh, 1]``
* horizontal: ``strides = [1, sw]``, ``pads = [0, left, 0, right]``, ``dilations = [1, dw]``

The vertical conv therefore maps an ``H x W`` input to ``H' x W`` (``H'`` is the original
output height, the width is untouched: kernel width 1, stride 1, no horizontal pads), and
the horizontal conv maps that to ``H' x W'``. Padding the intermediate map horizontally with
zeros is the same as padding the input, because the vertical conv has no bias, so the
composition is exactly ``conv(x; W)`` at full rank. Hence ``positions_v = H' * W`` (``W`` the
*unpadded* input width) and ``positions = H' * W'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .ranks import ConvShape

__all__ = [
    "spatial_svd",
    "spatial_singular_values",
    "spatial_flops",
    "spatial_max_rank",
    "split_conv_attributes",
    "spatial_positions",
    "ThreeDShape",
]


def _check_weight(W: np.ndarray) -> np.ndarray:
    W = np.asarray(W)
    if W.ndim != 4:
        raise ValueError(f"expected a conv weight of shape (d, c, kh, kw), got shape {W.shape}")
    return W


def _spatial_matrix(W: np.ndarray) -> np.ndarray:
    d, c, kh, kw = W.shape
    # A[(ch, p), (o, q)] = W[o, ch, p, q]
    return W.transpose(1, 2, 0, 3).reshape(c * kh, d * kw)


def spatial_max_rank(W_shape: Sequence[int]) -> int:
    """``min(c kh, d kw)``: the rank at which :func:`spatial_svd` is exact."""
    d, c, kh, kw = (int(v) for v in W_shape)
    return min(c * kh, d * kw)


def spatial_singular_values(W: np.ndarray) -> np.ndarray:
    """Singular values (descending, float64) of the ``(c kh) x (d kw)`` reshaped weight."""
    W = _check_weight(W)
    return np.linalg.svd(_spatial_matrix(W.astype(np.float64)), compute_uv=False)


def spatial_svd(W: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``W`` (``(d, c, kh, kw)``) into ``V`` (``(rank, c, kh, 1)``, vertical ``kh x 1`` conv
    ``c -> rank``) and ``H`` (``(d, rank, 1, kw)``, horizontal ``1 x kw`` conv ``rank -> d``).

    ``conv_{1 x kw}(conv_{kh x 1}(x; V); H)`` approximates ``conv(x; W)`` (attributes split as in
    the module docstring); exact at ``rank = min(c kh, d kw)``. A ``rank`` above that is
    clamped to it. Computed in float64, returned in ``W``'s dtype (float64 for integer input).
    """
    W = _check_weight(W)
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    d, c, kh, kw = W.shape
    rank = min(rank, c * kh, d * kw)
    out_dtype = W.dtype if np.issubdtype(W.dtype, np.floating) else np.float64
    A = _spatial_matrix(W.astype(np.float64))
    U, S, Vt = np.linalg.svd(A, full_matrices=False)
    root = np.sqrt(S[:rank])
    left = U[:, :rank] * root  # (c kh, rank)
    right = root[:, None] * Vt[:rank]  # (rank, d kw)
    V = left.T.reshape(rank, c, kh)[..., None]
    H = right.reshape(rank, d, kw).transpose(1, 0, 2)[:, :, None, :]
    return np.ascontiguousarray(V, dtype=out_dtype), np.ascontiguousarray(H, dtype=out_dtype)


def spatial_flops(c: int, d: int, kh: int, kw: int, rank: int, positions_v: int, positions: int) -> int:
    """FLOPs (2 x MACs, batch 1, no bias) of the vertical + horizontal pair:
    ``2 (rank c kh positions_v + d rank kw positions)`` with ``positions_v = H' * W_in`` and
    ``positions = H' * W'``."""
    return 2 * (int(rank) * int(c) * int(kh) * int(positions_v) + int(d) * int(rank) * int(kw) * int(positions))


def split_conv_attributes(
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """ONNX Conv attributes of the vertical and horizontal convs, from the original's
    (``pads`` in ONNX order ``[top, left, bottom, right]``)."""
    sh, sw = (int(v) for v in strides)
    top, left, bottom, right = (int(v) for v in pads)
    dh, dw = (int(v) for v in dilations)
    vertical = {"strides": [sh, 1], "pads": [top, 0, bottom, 0], "dilations": [dh, 1]}
    horizontal = {"strides": [1, sw], "pads": [0, left, 0, right], "dilations": [1, dw]}
    return vertical, horizontal


def _out_size(n: int, k: int, s: int, p0: int, p1: int, dil: int) -> int:
    return (n + p0 + p1 - dil * (k - 1) - 1) // s + 1


def spatial_positions(
    h_in: int,
    w_in: int,
    kh: int,
    kw: int,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
) -> tuple[int, int]:
    """``(positions_v, positions)`` = ``(H' * w_in, H' * W')`` for :func:`spatial_flops`."""
    sh, sw = (int(v) for v in strides)
    top, left, bottom, right = (int(v) for v in pads)
    dh, dw = (int(v) for v in dilations)
    h_out = _out_size(int(h_in), int(kh), sh, top, bottom, dh)
    w_out = _out_size(int(w_in), int(kw), sw, left, right, dw)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"empty output map {h_out} x {w_out}")
    return h_out * int(w_in), h_out * w_out


@dataclass(frozen=True)
class ThreeDShape(ConvShape):
    """Cost of the 3-D decomposition (method.md section 6) at rank ``r`` (``d'' = d' = r``, the
    reference implementations' choice): ``kh x 1`` Conv ``c -> d''`` on ``positions_v = H' W_in``
    positions, ``1 x kw`` Conv ``d'' -> d'`` and ``1 x 1`` Conv ``d' -> d`` on ``positions = H' W'``.

    ``d''`` is capped at :func:`spatial_max_rank`, where the spatial split is already exact.
    """

    positions_v: int = 0

    def spatial_rank(self, rank: int) -> int:
        return min(int(rank), int(self.c) * int(self.kh), int(self.d) * int(self.kw))

    def factorised_flops(self, rank: int) -> int:
        rank = int(rank)
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        r2 = self.spatial_rank(rank)
        return 2 * (r2 * int(self.c) * int(self.kh) * int(self.positions_v)
                    + rank * r2 * int(self.kw) * int(self.positions) + int(self.d) * rank * int(self.positions))

    def break_even_rank(self) -> int:
        """Largest ``r <= d`` whose factorised cost is strictly below the original (costs grow with r)."""
        if self.positions == 0:
            return 0
        original = self.original_flops()
        lo, hi = 0, int(self.d)  # invariant: cost(lo) < original (cost(0) = 0), answer in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.factorised_flops(mid) < original:
                lo = mid
            else:
                hi = mid - 1
        return lo
