"""Solving one layer's channel step from sampled rows (method.md sections 2-4); no ONNX here.

Every scheme ends in the same channel step: the last Conv of its chain (the original k x k Conv for
the channel pair, the 1 x k Conv for the 3-D decomposition) is followed by ``y ~ P Q^T yhat + b``.
So one solver serves all schemes; only what ``yhat`` is differs (see onnx_lowrank/schemes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import Activation
from .reconstruction import Factorisation, linear_reconstruction, nonlinear_reconstruction


@dataclass
class LayerSolution:
    factorisation: Factorisation
    method: str                      # "linear" or "nonlinear"
    rel_error: float | None          # on the held-back rows, after the activation
    rel_error_linear: float | None   # the linear initialisation's error (= rel_error when linear)
    note: str = ""                   # why a simpler fit was kept (the safety net), if it was


def solve_layer(y: np.ndarray, yh: np.ndarray | None, rank: int, act: Activation, fit: np.ndarray,
                held: np.ndarray, *, s: np.ndarray | None = None, sh: np.ndarray | None = None,
                method: str = "nonlinear", schedule=None, safety_net: bool = True) -> LayerSolution:
    """Fit ``act(P Q^T yhat + b + shat) ~ act(y + s)`` on the ``fit`` rows.

    ``safety_net``: keep the linear (or the symmetric linear) fit where it is better on the ``held`` rows.

    ``y``, ``s``: the original model's pre-activation response and shortcut (targets); ``yh``, ``sh``:
    what the compressed model feeds the channel step (``None``: symmetric, the originals). ``fit`` /
    ``held``: boolean row masks; the errors are measured on ``held``.
    """
    asym = yh is not None
    if not asym:
        yh, sh = y, s
    # Pre-activation target with the shortcut moved to the left: (y + s - shat) regressed on yhat.
    lin_target = y if s is None else y + s - sh
    lin = linear_reconstruction(lin_target[fit], rank, yh[fit] if asym else None)
    f, used = lin, "linear"
    if method == "nonlinear" and not act.is_identity:
        kwargs = {} if schedule is None else {"schedule": schedule}
        f, _ = nonlinear_reconstruction(
            y[fit], rank, act, Yhat=yh[fit] if asym else None,
            offset=None if s is None else s[fit], offset_hat=None if sh is None else sh[fit],
            init=lin, **kwargs)
        used = "nonlinear"
    target = act.apply(y[held] + (0 if s is None else s[held]))

    def err(fz: Factorisation) -> float | None:
        if not held.any():
            return None
        pred = act.apply(fz.predict(yh[held]) + (0 if sh is None else sh[held]))
        den = float(np.sum(target ** 2))
        return float(np.sum((target - pred) ** 2) / den) if den > 0 else 0.0

    rel = err(f)
    rel_lin = err(lin) if used == "nonlinear" else rel
    # Safety net: on held-back rows the nonlinear (or asymmetric) fit can lose to a simpler one when it
    # overfits the fitted rows (few rows per channel, e.g. MiniLM's feed-forward layers): keep the better.
    simpler = [(rel_lin, lin, "linear", "the nonlinear fit")] if used == "nonlinear" and safety_net else []
    if asym and safety_net:
        sym = linear_reconstruction(lin_target[fit], rank)
        simpler.append((err(sym), sym, "linear", "the asymmetric fit" if used == "linear" else "the nonlinear "
                        "fit on the approximated inputs"))
    note = ""
    for e, fz, how, what in simpler:
        if rel is not None and e is not None and e < rel:
            note = f"kept the {'symmetric ' if fz is not lin else ''}linear fit: {what} was worse on held-back " \
                   f"images ({100 * rel:.3g}% > {100 * e:.3g}%)"
            f, used, rel = fz, how, e
    return LayerSolution(f, used, rel, rel_lin, note)
