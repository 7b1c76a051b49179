"""One layer fitted alone at each candidate rank, for measuring what each rank costs in accuracy.

Pure NumPy. The fits are symmetric (the layer's own original inputs): the damage of a candidate is
measured with every other layer intact. ``linear``: the PCA solutions of every rank from one
eigendecomposition; ``nonlinear``: the real nonlinear fit of section 3 per rank (slower, and what
the compressed model will hold).
"""

from __future__ import annotations

import numpy as np

from .activations import Activation
from .layer import solve_layer
from .reconstruction import Factorisation

__all__ = ["candidate_fits", "FITS"]

FITS = ("linear", "nonlinear")


def candidate_fits(y: np.ndarray, ranks: list[int], act: Activation, fit: np.ndarray, held: np.ndarray, *,
                   s: np.ndarray | None = None, method: str = "linear",
                   schedule=None) -> dict[int, tuple[Factorisation, float | None]]:
    """``{rank: (factorisation, held-back error after the activation)}`` of ``y`` (rows) fitted alone."""
    y = np.asarray(y, dtype=np.float64)
    if method == "nonlinear" and not act.is_identity:
        out = {}
        for r in ranks:
            sol = solve_layer(y, None, r, act, fit, held, s=s, method="nonlinear", schedule=schedule)
            out[r] = (sol.factorisation, sol.rel_error)
        return out
    yf = y[fit]
    ybar = yf.mean(axis=0)
    c = yf - ybar
    g = c.T @ c
    _, vecs = np.linalg.eigh(0.5 * (g + g.T))
    vecs = vecs[:, ::-1]
    target = act.apply(y[held] + (0 if s is None else s[held])) if held.any() else None
    den = float(np.sum(target ** 2)) if target is not None else 0.0
    out = {}
    for r in ranks:
        u = np.ascontiguousarray(vecs[:, :r])
        f = Factorisation(P=u, Q=u.copy(), b=ybar - u @ (u.T @ ybar))
        err = None
        if target is not None:
            pred = act.apply(f.predict(y[held]) + (0 if s is None else s[held]))
            err = float(np.sum((target - pred) ** 2) / den) if den > 0 else 0.0
        out[r] = (f, err)
    return out
