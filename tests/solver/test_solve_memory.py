"""The memory a layer's solve takes beyond its inputs is bounded by solve_arrays(kind) arrays of the fitted rows.

The truth is tracemalloc, which sees every NumPy buffer: the peak of traced memory during
``solve_layer``, less what was allocated before it (the float32 rows, as calibration keeps them).
--max-memory reserves exactly this bound for the largest layer (sampling_plan.solve_bytes), so a
solve that held more would break the bound the option promises.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from onnx_lowrank.solver.activations import Activation
from onnx_lowrank.solver.layer import solve_arrays, solve_layer

N, D, RANK = 6000, 96, 24


def _rows(asym: bool, shortcut: bool):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)) @ (rng.standard_normal((D, D)) * np.linspace(1, 0.02, D))
    y = x.astype(np.float32)
    s = rng.standard_normal((N, D)).astype(np.float32) if shortcut else None
    yh = (x + 0.1 * rng.standard_normal((N, D))).astype(np.float32) if asym else None
    sh = (s + np.float32(0.05)) if asym and shortcut else None
    held = (np.arange(N) // 10) % 5 == 4
    return y, yh, s, sh, ~held, held


@pytest.mark.parametrize("act", [Activation.relu(), Activation("silu", {})], ids=["relu", "silu"])
@pytest.mark.parametrize("asym,shortcut", [(True, True), (True, False), (False, True), (False, False)])
def test_solve_holds_at_most_solve_arrays_of_the_fitted_rows(act, asym, shortcut):
    y, yh, s, sh, fit, held = _rows(asym, shortcut)
    fitted = 8 * int(fit.sum()) * D
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sol = solve_layer(y, yh, RANK, act, fit, held, s=s, sh=sh, schedule=[(3, 0.01), (3, 1.0)])
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert sol.rel_error is not None and sol.rel_error < 1
    small = 16 * 8 * D * D   # (d, d) matrices: covariances, eigenvectors, cross products
    assert peak <= solve_arrays(act.kind) * fitted + small, f"{peak / fitted:.2f} arrays of the fitted rows"
