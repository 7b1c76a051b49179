"""Choosing one option per layer to minimise summed accuracy cost under a cost budget.

Pure NumPy. Each layer offers a few options (keep it whole; each rank of each scheme), each with a
cost (FLOPs or measured milliseconds) and an accuracy cost (the measured damage to the model's
outputs when this layer alone takes this option). Picking one option per layer so that the summed
cost fits a budget while the summed damage is smallest is a multiple-choice knapsack. Two solvers:

* :func:`allocate_dp`: dynamic programming on a discretised budget. The cost above each layer's
  cheapest option is rounded *up* to whole units, so the result always fits the real budget; it is
  optimal for the budget less ``layers x unit`` (exact when the costs are multiples of the unit).
* :func:`allocate_lagrangian`: the Lagrangian relaxation, solved exactly by walking the layers'
  lower convex hulls in order of damage added per cost saved (the BALF / AIMET style greedy), then a
  greedy fill of the slack the last step left. Fast, near optimal, no grid.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np

from onnx_lowrank.errors import LowRankError

from .ranks import LayerCosts, RankSelectionError, select_ranks_costed

__all__ = ["ALLOCATORS", "AllocationError", "allocate", "allocate_dp", "allocate_lagrangian", "total"]

#: Options of one layer: (cost, damage) pairs.
Options = Sequence[tuple[float, float]]


class AllocationError(ValueError, LowRankError):
    """Even the cheapest option of every layer exceeds the budget (``min_cost`` is that total)."""

    def __init__(self, budget: float, min_cost: float):
        self.budget, self.min_cost = float(budget), float(min_cost)
        super().__init__(f"a budget of {budget:.4g} is impossible: the cheapest choice costs {min_cost:.4g}")


def total(layers: Sequence[Options], choice: Sequence[int]) -> tuple[float, float]:
    """(summed cost, summed damage) of one option index per layer."""
    return (float(sum(opts[k][0] for opts, k in zip(layers, choice))),
            float(sum(opts[k][1] for opts, k in zip(layers, choice))))


def _check(layers: Sequence[Options], budget: float) -> float:
    if not all(len(o) for o in layers):
        raise ValueError("every layer needs at least one option")
    for opts in layers:
        for c, d in opts:
            if not (math.isfinite(c) and math.isfinite(d)):
                raise ValueError(f"option costs and damages must be finite, got ({c}, {d})")
    cheapest = sum(min(c for c, _ in opts) for opts in layers)
    if cheapest > budget + _tolerance(budget):
        raise AllocationError(budget, cheapest)
    return cheapest


def _tolerance(budget: float) -> float:
    """Round-off allowed over a budget (sums of float costs)."""
    return 1e-9 * max(1.0, abs(float(budget)))


def allocate(layers: Sequence[Options], budget: float, method: str = "dp", resolution: int = 4000) -> list[int]:
    """Option index per layer minimising the summed damage with the summed cost within ``budget``."""
    if method == "dp":
        return allocate_dp(layers, budget, resolution=resolution)
    if method == "lagrangian":
        return allocate_lagrangian(layers, budget)
    raise ValueError(f"unknown allocation method {method!r}")


def allocate_dp(layers: Sequence[Options], budget: float, resolution: int = 4000,
                unit: float | None = None) -> list[int]:
    """Exact multiple-choice knapsack over a grid of ``resolution`` steps of the slack (or of ``unit``).

    The slack is the budget less every layer's cheapest option; each option's cost above its layer's
    cheapest is counted in whole units rounded up. Ties go to the cheaper option, then the lower index.
    """
    cheapest = _check(layers, budget)
    slack = max(0.0, float(budget) - cheapest)
    # Costs above each layer's cheapest are counted in grid steps: a share of the slack times the
    # resolution (divided in this order so that a tiny slack cannot overflow), or multiples of ``unit``.
    scale, steps = (slack, resolution) if unit is None else (unit, 1)
    cap = (resolution if slack > 0 else 0) if unit is None else int(math.floor(slack / unit + 1e-9))

    tol = _tolerance(budget)

    def units(extra: float) -> int | None:
        if extra > slack + tol:
            return None  # cannot fit whatever the others do
        if extra <= 0 or scale <= 0:
            return 0
        return min(cap, int(math.ceil(extra / scale * steps - 1e-9)))

    dp = np.zeros(cap + 1)  # dp[b]: least damage of the layers so far within b units
    back = []
    for opts in layers:
        low = min(c for c, _ in opts)
        new = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        order = sorted(range(len(opts)), key=lambda k: (opts[k][0], k))  # cheaper first wins ties
        for k in order:
            c, d = opts[k]
            u = units(c - low)
            if u is None or u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = dp[:cap + 1 - u] + d
            better = cand < new
            new[better], arg[better] = cand[better], k
        dp = new
        back.append(arg)
    choice = []
    b = cap
    for opts, arg in zip(reversed(layers), reversed(back)):
        k = int(arg[b])
        choice.append(k)
        b -= units(opts[k][0] - min(c for c, _ in opts))
    return choice[::-1]


def _hull(opts: Options) -> list[int]:
    """Indices of the lower convex hull of (cost, damage), from the least damage to the cheapest.

    Only options on it can be chosen by the Lagrangian for some multiplier; each step along it
    saves cost for more damage, at a rising price."""
    pts = sorted(range(len(opts)), key=lambda k: (opts[k][0], opts[k][1], k))
    best: dict[float, int] = {}
    for k in pts:  # per cost, the least damage
        best.setdefault(opts[k][0], k)
    hull: list[int] = []
    for k in sorted(best.values(), key=lambda k: opts[k][0]):
        if hull and opts[k][1] >= opts[hull[-1]][1]:
            continue  # costs more and damages no less: never worth it
        while len(hull) >= 2:
            (c1, d1), (c2, d2), (c3, d3) = opts[hull[-2]], opts[hull[-1]], opts[k]
            if (d2 - d1) * (c3 - c1) >= (d3 - d1) * (c2 - c1):  # middle point on or above the chord
                hull.pop()
            else:
                break
        hull.append(k)
    return hull[::-1]  # least damage (most expensive) first


def allocate_lagrangian(layers: Sequence[Options], budget: float) -> list[int]:
    """Walk every layer's hull from its least-damage option, cheapest damage per cost saved first,
    until the budget holds; then spend what the last step left over on the best damage reductions."""
    _check(layers, budget)
    hulls = [_hull(o) for o in layers]
    pos = [0] * len(layers)
    choice = [h[0] for h in hulls]
    cost = sum(layers[i][k][0] for i, k in enumerate(choice))
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        h = hulls[i]
        if pos[i] + 1 < len(h):
            (c0, d0), (c1, d1) = layers[i][h[pos[i]]], layers[i][h[pos[i] + 1]]
            heapq.heappush(heap, ((d1 - d0) / (c0 - c1), i))

    for i in range(len(layers)):
        push(i)
    while cost > budget and heap:
        _, i = heapq.heappop(heap)
        old = layers[i][choice[i]][0]
        pos[i] += 1
        choice[i] = hulls[i][pos[i]]
        cost += layers[i][choice[i]][0] - old
        push(i)
    _fill(layers, choice, budget)
    return choice


def _fill(layers: Sequence[Options], choice: list[int], budget: float) -> None:
    """Greedy: while some single change fits the budget and lowers the damage, take the best one."""
    cost, _ = total(layers, choice)
    while True:
        best = None
        for i, opts in enumerate(layers):
            c0, d0 = opts[choice[i]]
            for k, (c, d) in enumerate(opts):
                if d < d0 and cost - c0 + c <= budget:
                    gain = d0 - d
                    if best is None or gain > best[0]:
                        best = (gain, i, k)
        if best is None:
            return
        _, i, k = best
        cost += layers[i][k][0] - layers[i][choice[i]][0]
        choice[i] = k


class Allocator:
    """Ranks per layer within a budget, from each layer's cost table (:class:`LayerCosts`).

    ``spectra``: each layer's response eigenvalues; ``damage``: each layer's measured accuracy cost
    ``{rank: damage}`` (None unless :attr:`needs_damage`). Raises :class:`RankSelectionError` when even
    the cheapest choice exceeds ``budget`` (which includes ``fixed_cost``)."""

    name = ""
    #: Whether the pipeline must measure the damage tables first.
    needs_damage = False
    #: Whether the solved choice is then refined by exchanges checked end to end (exchange.py).
    refines = False

    def choose(self, options: list[LayerCosts], spectra: list, damage: list[dict[int, float]] | None,
               budget: float, fixed_cost: float, unit: str = "FLOPs",
               indices: list[int] | None = None) -> list[int | None]:
        raise NotImplementedError


class EnergyAllocator(Allocator):
    """Keep the most response energy (method.md section 5): the greedy of :func:`select_ranks_costed`."""

    name = "energy"

    def choose(self, options, spectra, damage, budget, fixed_cost, unit="FLOPs", indices=None):
        return select_ranks_costed(options, spectra, budget, fixed_cost, unit=unit, indices=indices)


class RefinedAllocator(EnergyAllocator):
    """The energy choice, solved, then refined by exchanges of rank steps measured on the whole model."""

    name = "refined"
    refines = True


class SensitivityAllocator(Allocator):
    """Least summed measured damage to the model's outputs: the knapsack of :func:`allocate_dp`."""

    name = "sensitivity"
    needs_damage = True

    def choose(self, options, spectra, damage, budget, fixed_cost, unit="FLOPs", indices=None):
        layers = [[(o.original, 0.0)] + [(c, damage_at(table, r)) for r, c in zip(o.ranks, o.costs)]
                  for o, table in zip(options, damage)]
        try:
            picked = allocate_dp(layers, float(budget) - float(fixed_cost))
        except AllocationError as err:
            before = float(fixed_cost) + sum(o.original for o in options)
            raise RankSelectionError(budget, err.min_cost + float(fixed_cost), before, unit) from err
        return [None if k == 0 else o.ranks[k - 1] for o, k in zip(options, picked)]


def damage_at(table: dict[int, float], rank: int) -> float:
    """Damage at ``rank``: measured, else interpolated between the measured ranks around it (clamped at
    the ends): geometrically where both are positive (damage falls about exponentially with the rank, so
    a straight line from a small rank's large damage would overstate every rank between), else linearly."""
    if rank in table:
        return float(table[rank])
    xs = sorted(table)
    if rank <= xs[0] or rank >= xs[-1]:
        return float(table[xs[0] if rank <= xs[0] else xs[-1]])
    hi = next(x for x in xs if x > rank)
    lo = xs[xs.index(hi) - 1]
    a, b, t = float(table[lo]), float(table[hi]), (rank - lo) / (hi - lo)
    if a > 0 and b > 0:
        return float(math.exp((1 - t) * math.log(a) + t * math.log(b)))
    return (1 - t) * a + t * b


def measured_ranks(candidates: list[int], most: int) -> list[int]:
    """At most ``most`` of the candidate ranks, denser at the small ranks where damage changes fastest:
    about evenly spaced on a log scale, always the smallest and the largest."""
    if len(candidates) <= most:
        return list(candidates)
    pos = np.unique(np.round(np.geomspace(1, len(candidates), most)).astype(int) - 1)
    return [candidates[i] for i in pos]


def damage_rows(free: list, damage: dict[str, dict[int, float]] | None) -> list[dict[int, float]] | None:
    """Each plan's damage table, in order (None without tables; a layer never measured: no damage)."""
    return None if damage is None else [damage.get(p.layer.name) or {0: 0.0} for p in free]


ALLOCATORS: dict[str, Allocator] = {a.name: a for a in (EnergyAllocator(), SensitivityAllocator(),
                                                         RefinedAllocator())}
