"""Cost model and whole-model rank selection (method.md sections 1 and 5).

Pure NumPy; no ONNX here. Costs are FLOPs = 2 * multiply-accumulates for one image
(batch 1), bias ignored.

A Conv layer (group 1) with ``c`` input channels, ``d`` filters of size ``kh x kw`` and
``positions = H' * W'`` output positions costs ``2 d c kh kw positions``. Factorised at rank
``r`` it becomes a ``kh x kw`` conv ``c -> r`` followed by a ``1 x 1`` conv ``r -> d``, costing
``2 (r c kh kw + d r) positions``. It only pays below the break-even rank.

``select_ranks`` maximises ``sum_l log(sum_{a <= r_l} sigma_{l,a})`` (the product of the kept
response energies) subject to a FLOP budget, greedily (see its docstring).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from onnx_lowrank.errors import LowRankError

__all__ = [
    "ConvShape",
    "RankSelectionError",
    "select_ranks",
    "speedup_to_budget",
    "summarise",
    "log_energy",
]


class RankSelectionError(ValueError, LowRankError):
    """The FLOP budget cannot be met even with every free layer at rank 1.

    A ``ValueError`` and a :class:`~onnx_lowrank.errors.LowRankError` (the CLI prints it).

    Attributes: ``budget_flops``, ``min_flops`` (smallest achievable total),
    ``flops_before`` (fixed + every layer at its original cost) and ``max_speedup``
    (``flops_before / min_flops``; ``inf`` if ``min_flops`` is 0).
    """

    def __init__(self, budget_flops: float, min_flops: float, flops_before: float):
        self.budget_flops = float(budget_flops)
        self.min_flops = float(min_flops)
        self.flops_before = float(flops_before)
        self.max_speedup = (
            self.flops_before / self.min_flops if self.min_flops > 0 else math.inf
        )
        requested = (
            self.flops_before / self.budget_flops if self.budget_flops > 0 else math.inf
        )
        super().__init__(
            f"a budget of {self.budget_flops:.4g} FLOPs ({requested:.3g}x speedup) is impossible: "
            f"at most {self.max_speedup:.3g}x is reachable (smallest achievable total "
            f"{self.min_flops:.4g} FLOPs, from {self.flops_before:.4g} FLOPs, with every "
            f"compressible layer at rank 1)"
        )


@dataclass(frozen=True)
class ConvShape:
    """Shape of one group-1 Conv layer, as far as its cost is concerned."""

    c: int  # input channels (group == 1)
    d: int  # output channels
    kh: int
    kw: int
    positions: int  # output H' * W'

    def __post_init__(self) -> None:
        for name in ("c", "d", "kh", "kw"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"ConvShape.{name} must be a positive integer, got {v!r}")
        if int(self.positions) != self.positions or self.positions < 0:
            raise ValueError(
                f"ConvShape.positions must be a non-negative integer, got {self.positions!r}"
            )

    @property
    def patch(self) -> int:
        """Length of the im2col patch, ``c kh kw``."""
        return int(self.c) * int(self.kh) * int(self.kw)

    def original_flops(self) -> int:
        return 2 * int(self.d) * self.patch * int(self.positions)

    def factorised_flops(self, rank: int) -> int:
        """Cost of ``kh x kw`` conv ``c -> rank`` + ``1 x 1`` conv ``rank -> d`` (no check vs break-even)."""
        rank = int(rank)
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        return 2 * (rank * self.patch + int(self.d) * rank) * int(self.positions)

    def break_even_rank(self) -> int:
        """Largest rank ``r >= 0`` with ``factorised_flops(r) < original_flops()``; 0 if none.

        ``r (c kh kw + d) < d c kh kw``  <=>  ``r <= (d c kh kw - 1) // (c kh kw + d)``.
        A layer with no output positions costs nothing either way and never saves: 0.
        """
        if self.positions == 0:
            return 0
        p, d = self.patch, int(self.d)
        return (d * p - 1) // (p + d)

    def saves(self, rank: int | None) -> bool:
        """True when factorising at ``rank`` strictly saves FLOPs (``1 <= rank <= break-even``)."""
        return rank is not None and 1 <= int(rank) <= self.break_even_rank()

    def flops_at(self, rank: int | None) -> int:
        """Cost at ``rank``: ``None`` or a rank that does not strictly save means the layer is
        left unchanged (original cost); otherwise the factorised cost."""
        if rank is None:
            return self.original_flops()
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1 (or None for unchanged), got {rank}")
        if self.saves(rank):
            return self.factorised_flops(rank)
        return self.original_flops()


def speedup_to_budget(total_flops_before: float, speedup: float) -> float:
    """The FLOP budget for a target ``speedup``: ``total_flops_before / speedup``."""
    if not speedup > 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    return float(total_flops_before) / float(speedup)


def summarise(
    layers: list[ConvShape], ranks: list[int | None], fixed_flops: float = 0.0
) -> tuple[float, float]:
    """``(flops_before, flops_after)`` of ``layers`` at ``ranks``, each plus ``fixed_flops``."""
    if len(layers) != len(ranks):
        raise ValueError(f"{len(layers)} layers but {len(ranks)} ranks")
    before = sum(layer.original_flops() for layer in layers)
    after = sum(layer.flops_at(r) for layer, r in zip(layers, ranks))
    return fixed_flops + before, fixed_flops + after


def _clean_spectrum(spectrum: np.ndarray, d: int, index: int) -> np.ndarray:
    if spectrum is None:
        raise ValueError(f"layer {index}: no spectrum for a layer the search may compress")
    s = np.asarray(spectrum, dtype=np.float64).ravel()
    if s.size > d:
        raise ValueError(f"layer {index}: spectrum has {s.size} values for d = {d} channels")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"layer {index}: spectrum has non-finite values")
    # Tiny negative eigenvalues are round-off; a shorter spectrum is padded with zeros.
    s = np.clip(s, 0.0, None)
    s = np.sort(s)[::-1]
    if s.size < d:
        s = np.concatenate([s, np.zeros(d - s.size)])
    return s


def _log_energy_from_cumsum(cum: np.ndarray, rank: int | None) -> float:
    e = cum[-1] if rank is None else cum[min(int(rank), cum.size) - 1]
    return math.log(e) if e > 0 else -math.inf


def log_energy(spectrum: np.ndarray, rank: int | None) -> float:
    """``log(sum_{a <= rank} sigma_a)`` (``rank=None``: all of it); ``-inf`` for zero energy."""
    s = np.sort(np.clip(np.asarray(spectrum, dtype=np.float64).ravel(), 0.0, None))[::-1]
    return _log_energy_from_cumsum(np.cumsum(s), rank)


def _step_losses(s: np.ndarray, cum: np.ndarray, top: int) -> list[float]:
    """``loss[r] = log E(r) - log E(r-1)`` for ``r = 2..top`` (index r); losing a zero
    eigenvalue is free (0). Computed as ``-log1p(-sigma_r / E(r))`` for accuracy."""
    loss = [0.0] * (top + 1)
    if top >= 2:
        r = np.arange(2, top + 1)
        sig = s[r - 1]
        e = cum[r - 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(e > 0, sig / np.where(e > 0, e, 1.0), 0.0)
            val = np.where(sig > 0, -np.log1p(-np.minimum(frac, 1.0)), 0.0)
        # frac == 1 only if E(r-1) == 0, impossible with sigma sorted descending and sigma_r > 0.
        loss[2:] = val.tolist()
    return loss


def _jump_loss(cum: np.ndarray, r: int) -> float:
    """``log E(d) - log E(r)``; 0 when the dropped eigenvalues are all zero."""
    full, part = float(cum[-1]), float(cum[r - 1])
    if full <= part:  # the tail is all zeros (also covers an all-zero spectrum)
        return 0.0
    if part <= 0.0:
        return math.inf
    return math.log(full) - math.log(part)


def select_ranks(
    layers: list[ConvShape],
    spectra: list[np.ndarray],
    budget_flops: float,
    fixed_flops: float = 0.0,
    fixed_ranks: dict[int, int | None] | None = None,
    *,
    refine: bool = True,
    lookahead: bool = True,
) -> list[int | None]:
    """Choose a rank per layer so that the whole model fits ``budget_flops``.

    ``spectra[i]``: eigenvalues of layer i's response covariance (length ``d``; sorted
    descending here, negative round-off clipped to 0, a shorter array padded with zeros;
    may be ``None`` for layers in ``fixed_ranks`` or with no saving rank at all).
    Total cost = ``fixed_flops + sum_i layers[i].flops_at(rank_i)``.
    ``fixed_ranks``: ``{i: rank}`` imposes a rank on layer i, ``{i: None}`` keeps it unchanged;
    those layers are never moved but their cost counts. An imposed rank that does not
    strictly save FLOPs is reported as ``None`` (unchanged), like everywhere else.

    Greedy (method.md section 5): every free layer starts unchanged. Repeatedly take the
    move with the smallest loss of log-energy per FLOP saved: an unchanged layer jumps to
    its break-even rank ``r_be`` (loss ``log E(d) - log E(r_be)``), a factorised layer at
    ``r > 1`` goes to ``r - 1`` (loss ``log E(r) - log E(r-1)``). Stop as soon as the total is
    ``<= budget_flops``. Losing zero eigenvalues is free; ties go to the lower layer index.

    Two refinements of the plain greedy, both on by default (pass ``False`` for the textbook
    version):

    * ``lookahead``: the jump of an unchanged layer is ranked by the best loss per FLOP it
      opens up, ``min_{1 <= r <= r_be} (log E(d) - log E(r)) / (original - factorised(r))``,
      instead of by the jump alone (the move itself is still the jump to ``r_be``). Without
      it a layer whose break-even saving is tiny (a ``1 x 1`` conv with ``c ~ d`` barely saves
      at ``r_be ~ d/2``) is wrongly left unchanged while others are cut to the bone.
    * ``refine``: after the budget is met, the slack left by the last move is given back
      greedily (rank + 1 or back to unchanged, best log-energy gain per FLOP first, only
      moves that still fit the budget).

    Returns per layer the rank, or ``None`` for "left unchanged". Raises
    :class:`RankSelectionError` when even every free layer at rank 1 exceeds the budget.
    """
    n = len(layers)
    if len(spectra) != n:
        raise ValueError(f"{n} layers but {len(spectra)} spectra")
    fixed_ranks = dict(fixed_ranks or {})
    for i, r in fixed_ranks.items():
        if not 0 <= int(i) < n:
            raise ValueError(f"fixed_ranks refers to layer {i}, but there are {n} layers")
        if r is not None and int(r) < 1:
            raise ValueError(f"fixed rank of layer {i} must be >= 1 or None, got {r}")
    budget = float(budget_flops)
    if math.isnan(budget):
        raise ValueError("budget_flops is NaN")

    ranks: list[int | None] = [None] * n
    be = [layer.break_even_rank() for layer in layers]
    free = [i for i in range(n) if i not in fixed_ranks]
    for i, r in fixed_ranks.items():
        ranks[i] = int(r) if (r is not None and layers[i].saves(r)) else None

    flops_before = float(fixed_flops) + sum(layer.original_flops() for layer in layers)
    total = sum(layers[i].flops_at(ranks[i]) for i in range(n))  # exact int; free at original
    min_total = total - sum(
        layers[i].original_flops() - layers[i].factorised_flops(1) for i in free if be[i] >= 1
    )
    if float(fixed_flops) + min_total > budget:
        raise RankSelectionError(budget, float(fixed_flops) + min_total, flops_before)
    if float(fixed_flops) + total <= budget:
        return ranks

    # Per-layer data (only for free layers that can be factorised at all).
    cums: dict[int, np.ndarray] = {}
    losses: dict[int, list[float]] = {}
    step: dict[int, int] = {}  # FLOPs saved by rank r -> r - 1
    heap: list[tuple[float, int, int]] = []  # (loss per FLOP, layer, target rank)
    for i in free:
        if be[i] < 1:
            continue
        layer = layers[i]
        s = _clean_spectrum(spectra[i], layer.d, i)
        cum = np.cumsum(s)
        cums[i] = cum
        losses[i] = _step_losses(s, cum, be[i])
        step[i] = 2 * (layer.patch + layer.d) * layer.positions
        saving = layer.original_flops() - layer.factorised_flops(be[i])
        prio = _jump_loss(cum, be[i]) / saving
        if lookahead:
            prio = min(prio, _best_jump_ratio(layer, cum, be[i]))
        heap.append((prio, i, be[i]))
    heapq.heapify(heap)

    budget_left = budget - float(fixed_flops)
    while total > budget_left:
        if not heap:  # everything at rank 1: feasible up to float rounding of the budget
            break
        _, i, r = heapq.heappop(heap)
        layer = layers[i]
        total -= layer.flops_at(ranks[i]) - layer.factorised_flops(r)
        ranks[i] = r
        if r > 1:
            heapq.heappush(heap, (losses[i][r] / step[i], i, r - 1))

    if refine:
        _give_back_slack(layers, ranks, be, free, cums, losses, step, total, budget_left)
    return ranks


def _give_back_slack(layers, ranks, be, free, cums, losses, step, total, budget_left) -> None:
    """Raise ranks (in place) while the budget allows, best log-energy gain per FLOP first."""
    heap: list[tuple[float, int]] = []  # (-gain per FLOP, layer)

    def candidate(i: int) -> tuple[float, int] | None:
        r = ranks[i]
        if r is None:
            return None
        if r < be[i]:
            gain, cost = losses[i][r + 1], step[i]
        else:
            gain = _jump_loss(cums[i], r)
            cost = layers[i].original_flops() - layers[i].factorised_flops(r)
        if not gain > 0:
            return None  # nothing to win: keep the cheaper rank
        return (-gain / cost, i)

    for i in free:
        if i in cums:
            c = candidate(i)
            if c is not None:
                heap.append(c)
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        r = ranks[i]
        new = r + 1 if r < be[i] else None
        cost = layers[i].flops_at(new) - layers[i].flops_at(r)
        if total + cost > budget_left:
            continue  # never fits later either (the slack only shrinks); drop this layer
        total += cost
        ranks[i] = new
        c = candidate(i)
        if c is not None:
            heapq.heappush(heap, c)


def _best_jump_ratio(layer: ConvShape, cum: np.ndarray, top: int) -> float:
    """``min_{1 <= r <= top} (log E(d) - log E(r)) / (original - factorised(r))``."""
    r = np.arange(1, top + 1, dtype=np.int64)
    part = cum[r - 1]
    full = cum[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = np.where(full <= part, 0.0, np.log(full) - np.log(part))
    saving = (layer.original_flops() - 2 * (r * (layer.patch + layer.d)) * layer.positions).astype(
        np.float64
    )
    return float(np.min(loss / saving))
