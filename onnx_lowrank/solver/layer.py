"""Solving one layer's channel step from sampled rows (method.md sections 2-4); no ONNX here.

Every scheme ends in the same channel step: the last Conv of its chain (the original k x k Conv for
the channel pair, the 1 x k Conv for the 3-D decomposition) is followed by ``y ~ P Q^T yhat + b``.
So one solver serves all schemes; only what ``yhat`` is differs (see onnx_lowrank/schemes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import SMOOTH, Activation
from .nonlinear import HeldOut, nonlinear_reconstruction
from .reconstruction import Factorisation, linear_reconstruction


#: float64 arrays of the fitted rows' size that :func:`solve_layer` holds at once beyond its inputs, at most:
#: the target ``y + s``, ``yhat``, ``shat``, the held-back rows' (a quarter of the fitted rows' size), and the
#: nonlinear solve's ``r(y + s)``, whitened ``yhat`` (float32), two predictions and two z iterates, and one
#: (rows, rank) product (tests/solver/test_solve_memory.py measures it).
SOLVE_ARRAYS = 10
#: ... and the smooth kinds' z step (activations/smooth.py) up to about this many more: its float32 scratch and
#: the long descent of the elements outside its table (how many are outside depends on the data; measured:
#: 16.7 arrays in all in tests/solver/test_solve_memory.py since the first-order table start, 14 before;
#: one spare, as the count depends on the data).
SMOOTH_EXTRA_ARRAYS = 8


def solve_arrays(kind: str) -> int:
    """:data:`SOLVE_ARRAYS`, plus :data:`SMOOTH_EXTRA_ARRAYS` for an activation kind with a smooth z step."""
    return SOLVE_ARRAYS + (SMOOTH_EXTRA_ARRAYS if kind in SMOOTH else 0)


@dataclass
class LayerSolution:
    factorisation: Factorisation
    method: str                      # "linear" or "nonlinear"
    rel_error: float | None          # on the held-back rows, after the activation
    rel_error_linear: float | None   # the linear initialisation's error (= rel_error when linear)
    note: str = ""                   # why a simpler fit was kept (the safety net), if it was


def _rows(a: np.ndarray | None, mask: np.ndarray) -> np.ndarray | None:
    """The ``mask`` rows of ``a`` as a new float64 array (float32 samples are widened exactly)."""
    return None if a is None else np.asarray(a[mask], dtype=np.float64)


def solve_layer(y: np.ndarray, yh: np.ndarray | None, rank: int, act: Activation, fit: np.ndarray,
                held: np.ndarray, *, s: np.ndarray | None = None, sh: np.ndarray | None = None,
                method: str = "nonlinear", schedule=None, safety_net: bool = True) -> LayerSolution:
    """Fit ``act(P Q^T yhat + b + shat) ~ act(y + s)`` on the ``fit`` rows.

    ``safety_net``: keep the linear (or the symmetric linear) fit where it is better on the ``held`` rows.

    ``y``, ``s``: the original model's pre-activation response and shortcut (targets); ``yh``, ``sh``:
    what the compressed model feeds the channel step (``None``: symmetric, the originals). ``fit`` /
    ``held``: boolean row masks; the errors are measured on ``held``. The rows may be float32 (samples as
    kept): only the fitted rows are widened to float64, once each, and nothing full-sized is copied, so
    the solve holds at most :func:`solve_arrays` float64 arrays of the fitted rows beyond its inputs.
    """
    asym = yh is not None
    # Pre-activation target with the shortcut moved to the left: (y + s - shat) regressed on yhat.
    pre = _rows(y, fit)             # y + s on the fitted rows (the nonlinear fit's target before r)
    if s is not None:
        pre += _rows(s, fit)
    xf = _rows(yh, fit) if asym else None
    shf = _rows(sh if asym else s, fit)
    lin_target = pre if shf is None else pre - shf
    lin = linear_reconstruction(lin_target, rank, xf)
    # The symmetric fit the safety net compares against needs the same target: fitted now, so that the
    # target is freed before the nonlinear solve.
    sym = linear_reconstruction(lin_target, rank) if asym and safety_net else None
    del lin_target
    yh_held, sh_held = (_rows(yh, held), _rows(sh, held)) if asym else (_rows(y, held), _rows(s, held))
    target = _rows(y, held) if s is None else _rows(y, held) + _rows(s, held)
    target = act.apply(target)
    f, used = lin, "linear"
    if method == "nonlinear" and not act.is_identity:
        # ``pre`` already holds the shortcut: given as Y with no offset, and yhat given explicitly in the
        # symmetric case (it is y, not y + s): the same arithmetic as Y=y, offset=s, without a copy of y.
        # The held-back rows stop the loop where it starts to overfit the fitted ones.
        f, _ = nonlinear_reconstruction(
            pre, rank, act, Yhat=xf if asym else (pre if s is None else _rows(y, fit)), offset_hat=shf,
            init=lin, held=HeldOut(yh_held, target, sh_held) if held.any() else None,
            **({} if schedule is None else {"schedule": schedule}))
        used = "nonlinear"
    del pre, xf, shf

    def err(fz: Factorisation) -> float | None:
        if not held.any():
            return None
        pred = act.apply(fz.predict(yh_held) + (0 if sh_held is None else sh_held))
        den = float(np.sum(target ** 2))
        return float(np.sum((target - pred) ** 2) / den) if den > 0 else 0.0

    rel = err(f)
    rel_lin = err(lin) if used == "nonlinear" else rel
    # Safety net: on held-back rows the nonlinear (or asymmetric) fit can lose to a simpler one when it
    # overfits the fitted rows (few rows per channel, e.g. MiniLM's feed-forward layers): keep the better.
    simpler = [(rel_lin, lin, "linear", "the nonlinear fit")] if used == "nonlinear" and safety_net else []
    if sym is not None:
        simpler.append((err(sym), sym, "linear", "the asymmetric fit" if used == "linear" else "the nonlinear "
                        "fit on the approximated inputs"))
    note = ""
    for e, fz, how, what in simpler:
        if rel is not None and e is not None and e < rel:
            note = f"kept the {'symmetric ' if fz is not lin else ''}linear fit: {what} was worse on held-back " \
                   f"images ({100 * rel:.3g}% > {100 * e:.3g}%)"
            f, used, rel = fz, how, e
    return LayerSolution(f, used, rel, rel_lin, note)
