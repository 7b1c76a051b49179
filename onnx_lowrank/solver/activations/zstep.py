"""The z step of the nonlinear reconstruction (method.md section 3), for any registered kind.

It minimises, independently per element, ``(a - r(z))**2 + lam * (z - u)**2`` where ``a`` is
the target post-activation value and ``u`` the current linear prediction; each kind's class
supplies the block solver (closed forms for the piecewise kinds, Newton for the smooth ones).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .base import Activation, Pool

#
# Everything below works on blocks of ~_BLOCK elements (row blocks of the (n, d) data): a
# whole-array NumPy pass over a few million float64 values is bound by memory bandwidth and
# costs about ten times as much as the same pass on a block that stays in the CPU cache, and the
# solvers below make 20 to a few hundred passes.  The Python loop over blocks costs a few
# microseconds per block and operation, which is small next to that.

_BLOCK = 1 << 15  # elements per block: the scratch arrays of a block stay in L2
#: Elements from which the rows are solved in two halves on two threads (:func:`_chunks`).
#: From 2^20 its second scratch pool (a fixed few MB) is under an array of the rows; sampling_plan reserves it.
THREAD_MIN_ELEMENTS = 1 << 20


def z_objective(z: np.ndarray, a: np.ndarray, u: np.ndarray, lam: float, act: Activation) -> np.ndarray:
    """Elementwise ``(a - r(z))**2 + lam * (z - u)**2`` (what ``z_step`` minimises)."""
    z = np.asarray(z, dtype=np.float64)
    return (np.asarray(a, dtype=np.float64) - act.apply(z)) ** 2 + lam * (z - np.asarray(u, dtype=np.float64)) ** 2


def z_step(
    a: np.ndarray, u: np.ndarray, lam: float, act: Activation, z0: np.ndarray | None = None
) -> np.ndarray:
    """Elementwise argmin over ``z`` of ``(a - r(z))**2 + lam * (z - u)**2``.

    Exact (global) for the piecewise-linear kinds and HardSwish (closed forms).  For the smooth
    kinds (``table``): a start from a precomputed table of the answer, Newton steps in float32,
    and the best of that, ``u`` and ``z0`` (a warm start, e.g. the previous iteration's ``z``;
    optional): never worse than ``u`` or ``z0``, and the global minimiser up to float32 round-off
    on nearly all elements, within 0.1 % near where two minima cost the same or the objective is
    flat (``tests/solver/test_activations.py``, ``tests/solver/test_zstep_paths.py``).
    """
    return _z_solve(a, u, lam, act, z0)[0]


def z_step_with_cost(
    a: np.ndarray, u: np.ndarray, lam: float, act: Activation, z0: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``z_step`` plus the elementwise objective at the returned ``z`` (saves re-evaluating ``r``)."""
    z, cost, _ = _z_solve(a, u, lam, act, z0, want_cost=True)
    return z, cost


@dataclass
class ZSums:
    """Sums over all elements that ``nonlinear_reconstruction`` needs, gathered block by block
    while the data is in cache: ``fit = sum (a - r(z))^2``, ``pen = sum (z - u)^2``,
    ``loss_u = sum (a - r(u))^2`` (the true loss of the prediction ``u``; 0 unless asked for, where the kind's
    solver does not track it)."""

    fit: float = 0.0
    pen: float = 0.0
    loss_u: float = 0.0


def _z_solve(
    a: np.ndarray,
    u: np.ndarray,
    lam: float,
    act: Activation,
    z0: np.ndarray | None = None,
    *,
    want_cost: bool = False,
    want_sums: bool = False,
    want_loss_u: bool = True,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, ZSums | None]:
    lam = float(lam)
    if not lam > 0.0 or not math.isfinite(lam):
        raise ValueError(f"lambda must be a positive finite number, got {lam}")
    a = np.asarray(a, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    shapes = [a.shape, u.shape] + ([] if z0 is None else [np.shape(z0)])
    shape = np.broadcast_shapes(*shapes)
    ncol = shape[-1] if len(shape) else 1
    nrow = int(np.prod(shape[:-1])) if len(shape) > 1 else 1

    def rows(x):
        return np.ascontiguousarray(np.broadcast_to(x, shape)).reshape(nrow, ncol)

    a2, u2 = rows(a), rows(u)
    z02 = None if z0 is None else rows(np.asarray(z0, dtype=np.float64))
    if out is not None and out.shape == shape and out.dtype == np.float64 and out.flags.c_contiguous:
        z = out
    else:
        z = np.empty(shape)
    z2 = z.reshape(nrow, ncol)
    kind = act.impl
    cost2 = np.empty((nrow, ncol)) if want_cost else None
    step = _rows_per_block(ncol)
    bounds = _chunks(nrow, step, ncol)
    # one solver per chunk, made here: a smooth kind's table is built (and cached) before any thread starts
    parts = [(lo, hi, kind.block_solver(lam)) for lo, hi in bounds]

    def solve(part):
        lo, hi, solver = part
        return _solve_rows(kind, solver, lam, a2[lo:hi], u2[lo:hi], None if z02 is None else z02[lo:hi],
                           z2[lo:hi], None if cost2 is None else cost2[lo:hi], step, want_sums, want_loss_u)

    if len(parts) > 1:
        with ThreadPoolExecutor(max_workers=len(parts)) as ex:
            chunk_sums = list(ex.map(solve, parts))
    else:
        chunk_sums = [solve(parts[0])]
    sums = None
    if want_sums:  # added in chunk order: the same bytes whatever the threads' timing
        sums = ZSums()
        for c in chunk_sums:
            sums.fit += c.fit
            sums.pen += c.pen
            sums.loss_u += c.loss_u
        sums.fit = max(sums.fit, 0.0)
    return z, (None if cost2 is None else cost2.reshape(shape)), sums


#: The second thread's scratch pool (its own :class:`Pool`) when the rows are solved in two halves, whatever the
#: rows: about 22 float64 buffers of a block for HardSwish (tests/solver/test_solve_memory.py); reserved at 24.
THREAD_SCRATCH_BYTES = 24 * 8 * _BLOCK


def _rows_per_block(ncol: int) -> int:
    return max(1, _BLOCK // max(ncol, 1))


def thread_scratch_bytes(nrow: int, ncol: int) -> int:
    """Memory a z step on (nrow, ncol) data holds beyond one thread's: the second half's scratch pool, if split."""
    return THREAD_SCRATCH_BYTES if len(_chunks(nrow, _rows_per_block(ncol), ncol)) > 1 else 0


def _chunks(nrow: int, step: int, ncol: int) -> list[tuple[int, int]]:
    """Row ranges solved on their own threads: two halves (whole blocks) once the data holds at least
    :data:`THREAD_MIN_ELEMENTS`, else one. NumPy releases the GIL inside each operation on a block, so two
    threads use both cores for the elementwise z step (the rest of the solve already does, through BLAS and
    onnxruntime). The split depends on the size only, never on the machine: same inputs, same bytes."""
    if nrow * ncol < THREAD_MIN_ELEMENTS or nrow < 2 * step:
        return [(0, nrow)]
    mid = -(-nrow // (2 * step)) * step
    return [(0, mid), (mid, nrow)]


def _solve_rows(kind, solver, lam: float, a2, u2, z02, z2, cost2, step: int, want_sums: bool,
                want_loss_u: bool = True) -> ZSums:
    """The block loop over a range of rows, with its own scratch pool and solver; its sums (``loss_u`` only if
    ``want_loss_u``, where the kind's solver does not give it anyway: a loop stopped on held-back rows never reads it)."""
    nrow, ncol = a2.shape
    sums = ZSums()
    P = Pool(min(step, nrow) * ncol)
    tracks_loss_u = hasattr(solver, "loss_u")
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        for i in range(0, nrow, step):
            s = slice(i, i + step)
            ab, ub = a2[s], u2[s]
            zb = z2[s]
            P.reset()
            cb = solver(ab, ub, None if z02 is None else z02[s], zb, P, i * ncol)
            if cost2 is not None:
                cost2[s] = cb
            if want_sums:
                if want_loss_u and not tracks_loss_u:
                    t = kind.value_block(ub, P)
                    np.subtract(ab, t, out=t)
                    t = t.ravel()
                    sums.loss_u += float(np.dot(t, t))
                t = np.subtract(zb, ub, out=P(zb)).ravel()
                pen = float(np.dot(t, t))
                sums.pen += pen
                sums.fit += float(cb.sum(dtype=np.float64)) - lam * pen
        finish = getattr(solver, "finish", None)
        if finish is not None:
            d_obj, d_pen = finish(a2.reshape(-1), u2.reshape(-1), z2.reshape(-1),
                                  None if cost2 is None else cost2.reshape(-1))
            sums.pen += d_pen
            sums.fit += d_obj - lam * d_pen
    if tracks_loss_u:
        sums.loss_u = solver.loss_u
    return sums
