"""Rescaling the d' intermediate channels of a factorisation so that INT8 quantisation composes.

``y = P Q^T yhat + b`` is unchanged by ``Q -> Q D^-1``, ``P -> P D`` for any invertible diagonal
``D`` (signs included), and by moving a constant ``c`` from the first stage's bias to the second
stage's (nothing nonlinear sits between the two stages). The solver leaves that freedom arbitrary,
so one intermediate channel can span a thousand times the range of another. Static INT8 then
quantises the intermediate tensor with one scale for all channels (per-tensor activations) and
each row of ``P`` with one scale for all its columns (per-channel weights): the small channels
round to nothing. Here the freedom is fixed instead:

* centre: each channel's calibration range is moved to be symmetric about zero (shift ``c``);
* scale: Nagel et al. 2019 ("Data-free quantization", cross-layer equalisation) give each channel
  the same relative precision in the activation and in the weights: channel ``i`` with activation
  half-range ``a_i`` and weight range ``w_i = max |P[:, i]|`` is divided by
  ``s_i = sqrt(a_i / w_i)``, after which both ranges equal ``sqrt(a_i w_i)``;
* sign: the largest-magnitude entry of each column of ``P`` is made positive, so the result depends
  only on the function, not on how the solver happened to choose signs and scales.

The stages then read: first ``z = Q'^T (W x + b_conv) - c``, second ``y = P' z + b + P' c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gram import _row_blocks
from .reconstruction import Factorisation

#: Channels whose range is below this fraction of the largest are treated as having that range,
#: so that a dead channel (constant over the calibration data) does not produce an infinite scale.
RANGE_FLOOR = 1e-12


@dataclass
class Balanced:
    """A rescaled factorisation (same ``predict``) and the intermediate shift ``c`` (length r)."""

    factorisation: Factorisation
    shift: np.ndarray

    def first_bias(self, conv_bias: np.ndarray | None) -> np.ndarray:
        """Bias of the first stage: ``Q^T b_conv - c``."""
        q = self.factorisation.Q
        base = q.T @ np.asarray(conv_bias, dtype=np.float64) if conv_bias is not None else 0.0
        return base - self.shift

    def second_bias(self) -> np.ndarray:
        """Bias of the 1x1 stage: ``b + P c``."""
        f = self.factorisation
        return f.b + f.P @ self.shift


def intermediate_ranges(f: Factorisation, Yhat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, half-range) per intermediate channel of ``Yhat @ Q`` over the given rows, widened to float64 a
    block of rows at a time (a 6,625-wide classifier's 12,000 float32 rows are 640 MB widened whole: 2.9 s of the
    recogniser's solve)."""
    blocks, _ = _row_blocks(Yhat, None)
    lo = hi = None
    for b in blocks():
        Z = b @ f.Q
        lo = Z.min(axis=0) if lo is None else np.minimum(lo, Z.min(axis=0))
        hi = Z.max(axis=0) if hi is None else np.maximum(hi, Z.max(axis=0))
    return (lo + hi) / 2.0, (hi - lo) / 2.0


def _floor(v: np.ndarray) -> np.ndarray:
    top = float(v.max()) if v.size else 0.0
    return np.maximum(v, RANGE_FLOOR * top if top > 0 else 1.0)


def balance(f: Factorisation, Yhat: np.ndarray) -> Balanced:
    """Centre, equalise and sign-normalise the intermediate channels of ``f``.

    ``Yhat``: (n, d) calibration rows of what the first stage's Conv computes before the
    projection (the layer's original Conv output on the inputs the compressed model will see).
    """
    P = np.asarray(f.P, dtype=np.float64)
    Q = np.asarray(f.Q, dtype=np.float64)
    centre, half = intermediate_ranges(f, Yhat)
    a = _floor(half)
    w = _floor(np.abs(P).max(axis=0))
    s = np.sqrt(a / w)
    # z' = (z - centre) / s ; P' = P s
    P2, Q2, c2 = P * s, Q / s, centre / s
    rows = np.abs(P2).argmax(axis=0)
    sign = np.where(P2[rows, np.arange(P2.shape[1])] < 0, -1.0, 1.0)
    return Balanced(Factorisation(P2 * sign, Q2 * sign, np.asarray(f.b, dtype=np.float64).copy()), c2 * sign)
