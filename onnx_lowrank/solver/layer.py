"""Solving one layer's channel step from sampled rows (method.md sections 2-4); no ONNX here.

Every scheme ends in the same channel step: the last Conv of its chain (the original k x k Conv for
the channel pair, the 1 x k Conv for the 3-D decomposition) is followed by ``y ~ P Q^T yhat + b``.
So one solver serves all schemes; only what ``yhat`` is differs (see onnx_lowrank/schemes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import SMOOTH, Activation
from .activations.zstep import thread_scratch_bytes
from .gram import SKETCH_EXTRA, gram_block_rows, sketchable
from .nonlinear import HeldOut, nonlinear_reconstruction
from .reconstruction import _RRR, Factorisation, _as_2d, _check_rank, linear_reconstruction, pca_rows

#: The ridge of the regressions on yhat (relative: see :class:`~.reconstruction._RRR`).
RIDGE = 1e-6


#: float64 arrays of the fitted rows' size that :func:`solve_layer` holds at once beyond its inputs, at most
#: (tests/solver/test_solve_memory.py measures each with tracemalloc). Piecewise-linear kinds (ReLU, ...): the target
#: ``y + s``, ``yhat``, ``shat``, the held-back rows that stop the nonlinear loop (a quarter of the fitted rows,
#: kept in float32 since branch recfast), and the nonlinear solve's ``r(y + s)``, whitened ``yhat`` (float32), two predictions and two z iterates,
#: and one (rows, rank) product: 10.3 measured (9.6 before the held-back rows stayed for the loop's stop).
SOLVE_ARRAYS = 11
#: ... the smooth kinds' z step (activations/smooth.py) up to about this many more: its float32 scratch and
#: the long descent of the elements outside its table (how many are outside depends on the data; measured:
#: 16.7 arrays in all with 96 channels, 19.3 with 600 beside the (d, d) matrices; the count depends on the data).
SMOOTH_EXTRA_ARRAYS = 10
#: ... HardSwish's exact z step (activations/hardswish.py) one more: its candidates' scratch (11.3 measured in
#: all, the loop's held-back rows included; 10.9 with 96 channels and 11.4 with 600 once those were float32).
HARDSWISH_EXTRA_ARRAYS = 1
#: A linear fit (no activation after the layer) on approximated inputs: ``y + s``, ``yhat``, ``shat``, the
#: regression's centred ``yhat`` and one product: 5.1 measured.
LINEAR_ARRAYS = 6
#: Scoring on the held-back rows, after the fit's arrays are freed, a block of rows at a time: ``yhat``, ``shat``,
#: the target, the prediction, their difference and its square, in arrays of the block (:func:`_held_errors`).
HELD_ARRAYS = 6
#: (d, d) matrices held at once: covariance, eigenvectors, cross products and their temporaries (5.5 measured
#: for 600 channels, where they weigh as much as a quarter of an array of the fitted rows).
SOLVE_SQUARES = 6
#: ... a symmetric linear fit (:func:`~.reconstruction.pca_rows`): its Gram, and up to as many eigenvectors when
#: the rank nears d (1.05 measured at rank 24 and 300 of 2,500 channels), beside :data:`PCA_BLOCKS` of its Gram's
#: blocks of rows (widened and centred).
PCA_SQUARES = 2
PCA_BLOCKS = 4


def symmetric_linear(identity: bool, asymmetric: bool, method: str = "nonlinear") -> bool:
    """Whether the solve is a PCA of the original rows (:func:`~.reconstruction.pca_rows`), which holds no
    array of them: a linear fit (no activation, or ``method`` linear) on the original inputs."""
    return not asymmetric and (method != "nonlinear" or identity)


def solve_arrays(kind: str, asymmetric: bool = True, method: str = "nonlinear") -> int:
    """float64 arrays of the fitted rows a solve that is not :func:`symmetric_linear` holds (the constants
    above), by activation kind, whether the fit is on approximated inputs, and the method."""
    if kind == "identity" or method != "nonlinear":
        return LINEAR_ARRAYS
    extra = SMOOTH_EXTRA_ARRAYS if kind in SMOOTH else HARDSWISH_EXTRA_ARRAYS if kind == "hardswish" else 0
    return SOLVE_ARRAYS + extra


def solve_memory(kind: str, d: int, fitted: int, held: int, asymmetric: bool = True,
                 method: str = "nonlinear", bound: int | None = None) -> int:
    """Bytes one layer's solve holds beyond its inputs, ``d`` channels: :func:`solve_arrays` float64 arrays of its
    ``fitted`` rows (a symmetric linear fit: :data:`PCA_BLOCKS` of its Gram's blocks of rows instead), or :data:`HELD_ARRAYS`
    of a block of its ``held`` rows when scoring them takes more; and :data:`SOLVE_SQUARES` (d, d) matrices (:data:`PCA_SQUARES`
    for a symmetric linear fit: a 6,625-wide classifier's are 350 MB each, and its PCA holds no array of its
    9,600 fitted rows; none where the responses' rank ``bound`` lets the PCA come from a sketch, as that
    classifier's 120 inputs do); plus the z step's second thread's scratch where it splits the rows
    (:func:`~.activations.zstep.thread_scratch_bytes`)."""
    pca = symmetric_linear(kind == "identity", asymmetric, method)
    if pca and sketchable(fitted, d, bound):
        # the sketch's (rows, bound + SKETCH_EXTRA) products, twice: no (d, d) matrix at all
        fit_rows, squares = PCA_BLOCKS * gram_block_rows(fitted, d) + -(-2 * fitted * (bound + SKETCH_EXTRA) // d), 0
    elif pca:
        fit_rows, squares = PCA_BLOCKS * gram_block_rows(fitted, d), PCA_SQUARES
    else:
        fit_rows, squares = solve_arrays(kind, asymmetric, method) * fitted, SOLVE_SQUARES
    z_step = method == "nonlinear" and kind != "identity"
    return 8 * d * (max(fit_rows, HELD_ARRAYS * gram_block_rows(held, d)) + squares * d) + \
        (thread_scratch_bytes(fitted, d) if z_step else 0)


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


def _rows32(a: np.ndarray | None, mask: np.ndarray) -> np.ndarray | None:
    """The ``mask`` rows of ``a`` as a new float32 array."""
    return None if a is None else np.asarray(a[mask], dtype=np.float32)


def solve_layer(y: np.ndarray, yh: np.ndarray | None, rank: int, act: Activation, fit: np.ndarray,
                held: np.ndarray, *, s: np.ndarray | None = None, sh: np.ndarray | None = None,
                method: str = "nonlinear", schedule=None, safety_net: bool = True,
                bound: int | None = None) -> LayerSolution:
    """Fit ``act(P Q^T yhat + b + shat) ~ act(y + s)`` on the ``fit`` rows.

    ``bound``: the rank of the original responses ``y`` at most (the layer's inputs per position), which lets a
    symmetric linear fit of a much wider layer skip its d x d Gram (:func:`~.reconstruction.pca_rows`).

    ``safety_net``: keep the linear (or the symmetric linear) fit where it is better on the ``held`` rows.

    ``y``, ``s``: the original model's pre-activation response and shortcut (targets); ``yh``, ``sh``:
    what the compressed model feeds the channel step (``None``: symmetric, the originals). ``fit`` /
    ``held``: boolean row masks; the errors are measured on ``held``. The rows may be float32 (samples as
    kept): only the fitted rows are widened to float64, once each, and nothing full-sized is copied, so
    the solve holds at most :func:`solve_arrays` float64 arrays of the fitted rows beyond its inputs.
    """
    asym = yh is not None
    if symmetric_linear(act.is_identity, asym, method):
        # the target is y (the shortcut is on both sides): its PCA from the rows as kept
        f = pca_rows(y, fit, rank, bound)
        return _scored(f, f, "linear", None, y, y, act, held, s, s, safety_net)
    # Pre-activation target with the shortcut moved to the left: (y + s - shat) regressed on yhat.
    pre = _rows(y, fit)             # y + s on the fitted rows (the nonlinear fit's target before r)
    if s is not None:
        pre += _rows(s, fit)
    xf = _rows(yh, fit) if asym else None
    shf = _rows(sh if asym else s, fit)
    lin_target = pre if shf is None else pre - shf
    nonlinear = method == "nonlinear" and not act.is_identity
    # asymmetric and nonlinear: the regression on yhat is set up once, for the linear start and the loop
    rrr = _RRR(_as_2d("Yhat", xf), RIDGE) if asym and nonlinear else None
    lin = linear_reconstruction(lin_target, rank, xf) if rrr is None else \
        rrr.fit(_as_2d("Y", lin_target), _check_rank(rank, lin_target.shape[1]))
    # The symmetric fit the safety net compares against needs the same target: fitted now, so that the
    # target is freed before the nonlinear solve.
    sym = linear_reconstruction(lin_target, rank) if asym and safety_net else None
    del lin_target
    f, used = lin, "linear"
    if nonlinear:
        # The held-back rows stop the loop where it starts to overfit the fitted ones (symmetric: the inputs
        # are the originals, so the target is their sum). Kept in float32: the stop needs no more.
        yh_held, sh_held = (_rows32(yh, held), _rows32(sh, held)) if asym else (_rows32(y, held), _rows32(s, held))
        target = act.apply(_rows(y, held) if s is None else _rows(y, held) + _rows(s, held)).astype(np.float32)
        # ``pre`` already holds the shortcut: given as Y with no offset, and yhat given explicitly in the
        # symmetric case (it is y, not y + s): the same arithmetic as Y=y, offset=s, without a copy of y.
        f, _ = nonlinear_reconstruction(
            pre, rank, act, Yhat=xf if asym else (pre if s is None else _rows(y, fit)), offset_hat=shf,
            init=lin, held=HeldOut(yh_held, target, sh_held) if held.any() else None, rrr=rrr, ridge=RIDGE,
            **({} if schedule is None else {"schedule": schedule}))
        used = "nonlinear"
        del yh_held, sh_held, target
    del pre, xf, shf, rrr
    return _scored(f, lin, used, sym, y, yh if asym else y, act, held, s, sh if asym else s, safety_net)


def _scored(f: Factorisation, lin: Factorisation, used: str, sym: Factorisation | None, y, yh, act: Activation,
            held: np.ndarray, s, sh, safety_net: bool) -> LayerSolution:
    """The solution with its errors on the ``held`` rows, or the simpler fit (``lin``, ``sym``) where that is
    better there (the safety net)."""
    errors = _held_errors([f, lin, sym], y, yh, act, held, s, sh)
    rel, e_lin, e_sym = errors[id(f)], errors[id(lin)], errors.get(id(sym))
    rel_lin = e_lin if used == "nonlinear" else rel
    # Safety net: on held-back rows the nonlinear (or asymmetric) fit can lose to a simpler one when it
    # overfits the fitted rows (few rows per channel, e.g. MiniLM's feed-forward layers): keep the better.
    simpler = [(rel_lin, lin, "linear", "the nonlinear fit")] if used == "nonlinear" and safety_net else []
    if sym is not None:
        simpler.append((e_sym, sym, "linear", "the asymmetric fit" if used == "linear" else "the nonlinear "
                        "fit on the approximated inputs"))
    note = ""
    for e, fz, how, what in simpler:
        if rel is not None and e is not None and e < rel:
            note = f"kept the {'symmetric ' if fz is not lin else ''}linear fit: {what} was worse on held-back " \
                   f"images ({100 * rel:.3g}% > {100 * e:.3g}%)"
            f, used, rel = fz, how, e
    return LayerSolution(f, used, rel, rel_lin, note)


def _held_errors(fits: list, y, yh, act: Activation, held: np.ndarray, s, sh) -> dict:
    """Relative squared error after the activation on the ``held`` rows, per fit (keyed by ``id``; None where
    nothing is held back), summed over blocks of rows widened one at a time: scoring holds about
    :data:`HELD_ARRAYS` arrays of a block, not of all the held-back rows."""
    fits = list({id(fz): fz for fz in fits if fz is not None}.values())
    idx = np.flatnonzero(held)
    if not len(idx):
        return {id(fz): None for fz in fits}
    num, den = dict.fromkeys(map(id, fits), 0.0), 0.0
    step = gram_block_rows(len(idx), y.shape[1])
    for i in range(0, len(idx), step):
        rows = idx[i:i + step]
        target = np.asarray(y[rows], dtype=np.float64)
        if s is not None:
            target += s[rows]
        target = act.apply(target)
        den += float(np.sum(target ** 2))
        x, o = np.asarray(yh[rows], dtype=np.float64), None if sh is None else np.asarray(sh[rows], dtype=np.float64)
        for fz in fits:
            pred = fz.predict(x)
            if o is not None:
                pred += o
            num[id(fz)] += float(np.sum((target - act.apply(pred)) ** 2))
    return {k: v / den if den > 0 else 0.0 for k, v in num.items()}
