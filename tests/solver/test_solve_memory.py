"""The memory a layer's solve takes beyond its inputs is bounded by solve_memory(kind, ...).

The truth is tracemalloc, which sees every NumPy buffer: the peak of traced memory during
``solve_layer``, less what was allocated before it (the float32 rows, as calibration keeps them).
--max-memory reserves exactly this bound for the largest layer (sampling_plan.largest_solve), so a
solve that held more would break the bound the option promises. Two shapes: many rows of few
channels (arrays of the rows dominate) and 600 channels (the (d, d) matrices weigh a quarter of an
array); one wide layer fitted symmetrically (a classifier: its Gram dominates).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from onnx_lowrank.solver.activations import Activation
from onnx_lowrank.solver.layer import solve_arrays, solve_layer, solve_memory

RANK = 24


def _rows(n: int, d: int, asym: bool, shortcut: bool, inputs: int | None = None):
    rng = np.random.default_rng(0)
    k = inputs or d
    x = rng.standard_normal((n, k)) @ (rng.standard_normal((k, d)) * np.linspace(1, 0.02, d))
    y = x.astype(np.float32)
    s = rng.standard_normal((n, d)).astype(np.float32) if shortcut else None
    yh = (x + 0.1 * rng.standard_normal((n, d))).astype(np.float32) if asym else None
    sh = (s + np.float32(0.05)) if asym and shortcut else None
    held = (np.arange(n) // 10) % 5 == 4
    return y, yh, s, sh, ~held, held


def _peak(act, rows, rank=RANK, bound=None):
    y, yh, s, sh, fit, held = rows
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sol = solve_layer(y, yh, rank, act, fit, held, s=s, sh=sh, schedule=[(3, 0.01), (3, 1.0)], bound=bound)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert sol.rel_error is not None and sol.rel_error < 1
    return peak


KINDS = [Activation("identity"), Activation.relu(), Activation("hardswish", {}), Activation("silu", {})]


CASES = [(6000, 96, asym, shortcut) for asym in (True, False) for shortcut in (True, False)] + \
    [(2000, 600, True, True), (2000, 600, False, False)]


@pytest.mark.parametrize("act", KINDS, ids=lambda a: a.kind)
@pytest.mark.parametrize("n,d,asym,shortcut", CASES)
def test_solve_holds_at_most_solve_memory(act, n, d, asym, shortcut):
    rows = _rows(n, d, asym, shortcut)
    fitted, held = int(rows[4].sum()), int(rows[5].sum())
    peak = _peak(act, rows)
    bound = solve_memory(act.kind, d, fitted, held, asym)
    assert peak <= bound, f"{peak / (8 * fitted * d):.2f} arrays of the fitted rows, bound {bound / peak:.2f}x"


def test_linear_fits_hold_fewer_arrays_than_nonlinear_ones():
    """Measured: a linear fit on approximated inputs with a shortcut holds about 5 arrays of its rows, a ReLU
    fit about 10 (the held-back rows included): the reservation follows the kind."""
    rows = _rows(6000, 96, True, True)
    fitted = 8 * int(rows[4].sum()) * 96
    lin, relu = _peak(Activation("identity"), rows) / fitted, _peak(Activation.relu(), rows) / fitted
    assert 4.5 < lin <= solve_arrays("identity") < relu <= solve_arrays("relu")


@pytest.mark.parametrize("rank", [24, 300])
def test_a_wide_symmetric_linear_fit_holds_its_gram_not_its_rows(rank):
    """A classifier-like layer (2,500 outputs of 120 inputs, fewer than 2 rows per channel: fitted symmetrically):
    the PCA holds its (d, d) Gram and less than half an array of its rows more (before: two arrays of its rows
    and three (d, d) matrices)."""
    n, d = 4000, 2500
    rows = _rows(n, d, False, False, inputs=120)
    fitted, held = int(rows[4].sum()), int(rows[5].sum())
    assert fitted < 2 * d
    peak = _peak(Activation("identity"), rows, rank)
    assert 8 * d * d <= peak <= 8 * d * (d + fitted / 2)
    assert peak <= solve_memory("identity", d, fitted, held, asymmetric=False)


def test_a_wide_symmetric_linear_fit_with_a_rank_bound_holds_no_square_matrix():
    """The same layer with its rank bound (120 inputs) given: the PCA comes from a sketch, and the solve holds
    less than its Gram would take alone (blocks of rows: 0.57 of it measured here), within what solve_memory then
    reserves (also less than the Gram)."""
    n, d = 4000, 2500
    rows = _rows(n, d, False, False, inputs=120)
    fitted, held = int(rows[4].sum()), int(rows[5].sum())
    peak = _peak(Activation("identity"), rows, 24, bound=120)
    bound = solve_memory("identity", d, fitted, held, asymmetric=False, bound=120)
    assert peak <= bound < 8 * d * d and peak < 0.75 * 8 * d * d


@pytest.mark.parametrize("kind", ["hardswish", "silu"])
def test_a_threaded_z_step_stays_within_solve_memory(kind):
    """Fitted rows above the z step's THREAD_MIN_ELEMENTS: two halves on two threads, each with its own scratch
    pool; the second pool is reserved (activations.zstep.THREAD_SCRATCH_BYTES)."""
    from onnx_lowrank.solver.activations.zstep import THREAD_MIN_ELEMENTS

    rows = _rows(14000, 96, True, True)
    fitted, held = int(rows[4].sum()), int(rows[5].sum())
    assert fitted * 96 >= THREAD_MIN_ELEMENTS
    act = Activation(kind)
    peak = _peak(act, rows)
    assert peak <= solve_memory(kind, 96, fitted, held, True), f"{peak / (8 * fitted * 96):.2f} arrays"
