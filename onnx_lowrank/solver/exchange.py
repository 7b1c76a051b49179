"""Exchanges of rank steps between layers at a fixed budget: the proposals of ``--allocation refined``.

Pure. Each layer offers a ladder of options, ranks ascending then whole (``None``), each with a cost
in any additive unit (FLOPs, table milliseconds). From the current option of every layer, a move takes
one layer up one step and pays for it with another layer down the fewest steps (at most ``max_down``)
that keep the summed cost within the budget; where the slack allows, a layer goes up alone, and a layer
whose measured down step *lowers* the damage goes down alone. Proposals are ordered by the damage
decrease the marginal measurements predict (the up step's gain less the down steps' loss, the loss of
``k`` steps taken as ``k`` times one step's); the caller measures the first few end to end and keeps one
only if the damage really falls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Ladder", "Move", "MAX_DOWN", "apply", "moves", "total_cost"]

#: Most rank steps one layer goes down to pay for another's step up.
MAX_DOWN = 3


@dataclass(frozen=True)
class Ladder:
    """One layer's options, ranks ascending then ``None`` (kept whole), and their costs (same order)."""

    options: tuple
    costs: tuple

    def __post_init__(self):
        if len(self.options) != len(self.costs) or not self.options:
            raise ValueError("a ladder needs one cost per option, and at least one option")


@dataclass(frozen=True)
class Move:
    """Layer ``up`` one step up (None: none), layer ``down`` ``steps`` steps down (None: none)."""

    up: int | None
    down: int | None
    steps: int
    predicted: float

    def describe(self, names: Sequence[str]) -> str:
        parts = ([f"{names[self.up]} up"] if self.up is not None else []) + \
            ([f"{names[self.down]} down {self.steps}"] if self.down is not None else [])
        return ", ".join(parts)


def total_cost(ladders: Sequence[Ladder], at: Sequence[int]) -> float:
    return float(sum(lad.costs[i] for lad, i in zip(ladders, at)))


def apply(at: Sequence[int], move: Move) -> list[int]:
    """Option indices after ``move``."""
    new = list(at)
    if move.up is not None:
        new[move.up] += 1
    if move.down is not None:
        new[move.down] -= move.steps
    return new


def _tolerance(budget: float) -> float:
    return 1e-9 * max(1.0, abs(float(budget)))


def moves(ladders: Sequence[Ladder], at: Sequence[int], budget: float, gain: Sequence[float | None],
          loss: Sequence[float | None], max_down: int = MAX_DOWN) -> list[Move]:
    """Every move within ``budget``, best predicted first (a pair predicted to raise the damage is still
    offered, last: the marginals are measured one layer at a time and moves interact).

    ``gain[i]``: damage decrease measured when layer i goes one step up (None: not measured / no step);
    ``loss[i]``: damage increase when it goes one step down. Ties: lower layer indices first."""
    cost, tol = total_cost(ladders, at), _tolerance(budget)
    out: list[Move] = []
    for b in range(len(ladders)):
        if at[b] > 0 and loss[b] is not None and loss[b] < 0:
            out.append(Move(None, b, 1, -float(loss[b])))
    for a, lad in enumerate(ladders):
        if at[a] + 1 >= len(lad.options) or gain[a] is None:
            continue
        added = lad.costs[at[a] + 1] - lad.costs[at[a]]
        if cost + added <= budget + tol:
            out.append(Move(a, None, 0, float(gain[a])))
        for b, other in enumerate(ladders):
            if b == a or loss[b] is None:
                continue
            for k in range(1, min(max_down, at[b]) + 1):
                if cost + added - (other.costs[at[b]] - other.costs[at[b] - k]) <= budget + tol:
                    out.append(Move(a, b, k, float(gain[a]) - k * float(loss[b])))
                    break
    return sorted(out, key=lambda m: (-m.predicted, -1 if m.up is None else m.up,
                                       -1 if m.down is None else m.down))
