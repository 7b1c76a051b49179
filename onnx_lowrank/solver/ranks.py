"""Cost model and whole-model rank selection (method.md sections 1 and 5).

Pure NumPy; no ONNX here. Costs are FLOPs = 2 * multiply-accumulates for one image
(batch 1), bias ignored.

A Conv layer (group 1) with ``c`` input channels, ``d`` filters of size ``kh x kw`` and
``positions = H' * W'`` output positions costs ``2 d c kh kw positions``. Factorised at rank
``r`` it becomes a ``kh x kw`` conv ``c -> r`` followed by a ``1 x 1`` conv ``r -> d``, costing
``2 (r c kh kw + d r) positions``. It only pays below the break-even rank.

``select_ranks`` maximises ``sum_l log(sum_{a <= r_l} sigma_{l,a})`` (the product of the kept
response energies) subject to a FLOP budget, greedily (see its docstring).
``select_ranks_costed`` is the same greedy over any per-layer cost table (e.g. measured
latency): the FLOP version is that table filled in from :class:`ConvShape`. Candidate ranks
may be restricted to multiples of a block size (runtime kernels such as onnxruntime's NCHWc
convolutions are only fast for channel counts that are multiples of 8 or 16).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from onnx_lowrank.errors import LowRankError

from .shape import ConvShape

__all__ = [
    "ConvShape",
    "LayerCosts",
    "RankSelectionError",
    "candidate_ranks",
    "select_ranks",
    "select_ranks_costed",
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

    def __init__(self, budget_flops: float, min_flops: float, flops_before: float, unit: str = "FLOPs"):
        self.unit = unit
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
            f"a budget of {self.budget_flops:.4g} {unit} ({requested:.3g}x speedup) is impossible: "
            f"at most {self.max_speedup:.3g}x is reachable (smallest achievable total "
            f"{self.min_flops:.4g} {unit}, from {self.flops_before:.4g} {unit}, with every "
            f"compressible layer at its smallest candidate rank)"
        )


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


def candidate_ranks(top: int, multiple: int = 1) -> list[int]:
    """Ranks ``multiple, 2 multiple, ...`` up to ``top`` (empty when ``top < multiple``)."""
    multiple = int(multiple)
    if multiple < 1:
        raise ValueError(f"rank multiple must be >= 1, got {multiple}")
    return list(range(multiple, int(top) + 1, multiple))


@dataclass(frozen=True)
class LayerCosts:
    """What one layer costs unchanged (``original``) and factorised at each candidate rank.

    ``ranks`` ascending, ``costs`` strictly increasing and all below ``original`` (build it with
    :meth:`from_table`, which drops the candidates that do not pay). ``d``: output channels.
    Costs are in any additive unit (FLOPs, milliseconds); only sums and differences are used.
    """

    d: int
    original: float
    ranks: tuple[int, ...]
    costs: tuple[float, ...]

    @classmethod
    def from_table(cls, d: int, original: float, table: dict[int, float]) -> "LayerCosts":
        """Keep the candidates worth having: cheaper than the original and than every higher rank.

        A higher rank keeps more energy, so a rank that costs as much as a higher one is never
        the better choice (measured times are not monotone in the rank: NCHWc block sizes, noise).
        """
        ranks: list[int] = []
        costs: list[float] = []
        best = original
        for r in sorted(table, reverse=True):
            if table[r] < best:
                best = table[r]
                ranks.append(int(r))
                costs.append(table[r])
        return cls(int(d), original, tuple(reversed(ranks)), tuple(reversed(costs)))

    @classmethod
    def from_flops(cls, shape: ConvShape, multiple: int = 1) -> "LayerCosts":
        ranks = candidate_ranks(shape.break_even_rank(), multiple)
        return cls(int(shape.d), shape.original_flops(), tuple(ranks),
                   tuple(shape.factorised_flops(r) for r in ranks))

    def cost_at(self, rank: int | None) -> float:
        """Cost at a candidate rank (``None``: original)."""
        return self.original if rank is None else self.costs[self.ranks.index(int(rank))]


def select_ranks(
    layers: list[ConvShape],
    spectra: list[np.ndarray],
    budget_flops: float,
    fixed_flops: float = 0.0,
    fixed_ranks: dict[int, int | None] | None = None,
    *,
    refine: bool = True,
    lookahead: bool = True,
    multiple: int = 1,
) -> list[int | None]:
    """Choose a rank per layer so that the whole model fits ``budget_flops``.

    ``spectra[i]``: eigenvalues of layer i's response covariance (length ``d``; sorted
    descending here, negative round-off clipped to 0, a shorter array padded with zeros;
    may be ``None`` for layers in ``fixed_ranks`` or with no saving rank at all).
    Total cost = ``fixed_flops + sum_i layers[i].flops_at(rank_i)``.
    ``fixed_ranks``: ``{i: rank}`` imposes a rank on layer i, ``{i: None}`` keeps it unchanged;
    those layers are never moved but their cost counts. An imposed rank that does not
    strictly save FLOPs is reported as ``None`` (unchanged), like everywhere else.
    ``multiple``: free layers only take ranks that are multiples of it (a layer whose
    break-even rank is below it stays unchanged); imposed ranks are taken as given.

    The search is :func:`select_ranks_costed` with FLOP costs. Returns per layer the rank,
    or ``None`` for "left unchanged". Raises :class:`RankSelectionError` when even every
    free layer at its smallest candidate rank exceeds the budget.
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
    ranks: list[int | None] = [None] * n
    for i, r in fixed_ranks.items():
        ranks[i] = int(r) if (r is not None and layers[i].saves(r)) else None
    free = [i for i in range(n) if i not in fixed_ranks]
    fixed_total = sum(layers[i].flops_at(ranks[i]) for i in fixed_ranks)
    chosen = select_ranks_costed(
        [LayerCosts.from_flops(layers[i], multiple) for i in free], [spectra[i] for i in free],
        budget_flops, float(fixed_flops) + fixed_total, refine=refine, lookahead=lookahead,
        indices=free)
    for i, r in zip(free, chosen):
        ranks[i] = r
    return ranks


def select_ranks_costed(
    options: list[LayerCosts],
    spectra: list[np.ndarray],
    budget: float,
    fixed_cost: float = 0.0,
    *,
    refine: bool = True,
    lookahead: bool = True,
    unit: str = "FLOPs",
    indices: list[int] | None = None,
) -> list[int | None]:
    """Choose a candidate rank (or ``None``: unchanged) per layer so that
    ``fixed_cost + sum_i cost_i`` fits ``budget``, maximising the kept log-energy.

    Greedy (method.md section 5): every layer starts unchanged. Repeatedly take the move
    with the smallest loss of log-energy per unit of cost saved: an unchanged layer jumps to
    its largest candidate rank ``r_K`` (loss ``log E(d) - log E(r_K)``), a factorised layer at
    candidate ``r_k`` goes to ``r_{k-1}``. Stop as soon as the total fits. Losing zero
    eigenvalues is free; ties go to the lower layer index.

    Two refinements of the plain greedy, both on by default (pass ``False`` for the textbook
    version):

    * ``lookahead``: the jump of an unchanged layer is ranked by the best loss per cost it
      opens up, ``min_k (log E(d) - log E(r_k)) / (original - cost(r_k))``, instead of by the
      jump alone (the move itself is still the jump to ``r_K``). Without it a layer whose
      largest candidate barely saves (a ``1 x 1`` conv with ``c ~ d``) is wrongly left
      unchanged while others are cut to the bone.
    * ``refine``: after the budget is met, the slack left by the last move is given back
      greedily (next candidate up or back to unchanged, best gain per cost first, only moves
      that still fit).

    ``indices`` only names the layers in error messages. Raises :class:`RankSelectionError`
    (in ``unit``) when every layer at its smallest candidate still exceeds the budget.
    """
    n = len(options)
    if len(spectra) != n:
        raise ValueError(f"{n} layers but {len(spectra)} spectra")
    names = list(indices) if indices is not None else list(range(n))
    budget = float(budget)
    if math.isnan(budget):
        raise ValueError("budget is NaN")
    state: list[int | None] = [None] * n  # index into options[i].ranks, or None (unchanged)
    total = sum(o.original for o in options)
    before = fixed_cost + total
    min_total = total - sum(o.original - o.costs[0] for o in options if o.ranks)
    if float(fixed_cost) + min_total > budget:
        raise RankSelectionError(budget, float(fixed_cost) + min_total, before, unit)
    if float(fixed_cost) + total <= budget:
        return [None] * n

    cums: dict[int, np.ndarray] = {}
    steps: dict[int, list[float]] = {}  # steps[i][k]: log E(r_k) - log E(r_{k-1})
    heap: list[tuple[float, int, int]] = []  # (loss per unit cost, layer, target candidate)
    for i, o in enumerate(options):
        if not o.ranks:
            continue
        s = _clean_spectrum(spectra[i], o.d, names[i])
        cum = np.cumsum(s)
        cums[i] = cum
        loss = _step_losses(s, cum, o.ranks[-1])
        steps[i] = [0.0] + [sum(loss[a + 1:b + 1]) for a, b in zip(o.ranks, o.ranks[1:])]
        top = len(o.ranks) - 1
        prio = _jump_loss(cum, o.ranks[-1]) / (o.original - o.costs[top])
        if lookahead:
            prio = min(prio, _best_jump_ratio(o, cum))
        heap.append((prio, i, top))
    heapq.heapify(heap)

    budget_left = budget - float(fixed_cost)
    while total > budget_left:
        if not heap:  # everything at its smallest rank: feasible up to float rounding of the budget
            break
        _, i, k = heapq.heappop(heap)
        o = options[i]
        total -= _cost(o, state[i]) - o.costs[k]
        state[i] = k
        if k > 0:
            heapq.heappush(heap, (steps[i][k] / (o.costs[k] - o.costs[k - 1]), i, k - 1))

    if refine:
        _give_back_slack(options, state, cums, steps, total, budget_left)
    return [None if k is None else options[i].ranks[k] for i, k in enumerate(state)]


def _cost(o: LayerCosts, k: int | None) -> float:
    return o.original if k is None else o.costs[k]


def _give_back_slack(options, state, cums, steps, total, budget_left) -> None:
    """Raise ranks (in place) while the budget allows, best log-energy gain per cost first."""
    heap: list[tuple[float, int]] = []  # (-gain per cost, layer)

    def candidate(i: int) -> tuple[float, int] | None:
        k, o = state[i], options[i]
        if k is None:
            return None
        if k < len(o.ranks) - 1:
            gain, cost = steps[i][k + 1], o.costs[k + 1] - o.costs[k]
        else:
            gain, cost = _jump_loss(cums[i], o.ranks[k]), o.original - o.costs[k]
        if not gain > 0:
            return None  # nothing to win: keep the cheaper rank
        return (-gain / cost, i)

    for i in cums:
        c = candidate(i)
        if c is not None:
            heap.append(c)
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        k, o = state[i], options[i]
        new = k + 1 if k < len(o.ranks) - 1 else None
        cost = _cost(o, new) - _cost(o, k)
        if total + cost > budget_left:
            continue  # never fits later either (the slack only shrinks); drop this layer
        total += cost
        state[i] = new
        c = candidate(i)
        if c is not None:
            heapq.heappush(heap, c)


def _best_jump_ratio(o: LayerCosts, cum: np.ndarray) -> float:
    """``min_k (log E(d) - log E(r_k)) / (original - cost(r_k))``."""
    r = np.asarray(o.ranks, dtype=np.int64)
    part = cum[r - 1]
    full = cum[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = np.where(full <= part, 0.0, np.log(full) - np.log(part))
    saving = np.asarray([o.original - c for c in o.costs], dtype=np.float64)
    return float(np.min(loss / saving))
