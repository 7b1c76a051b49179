"""``--objective flops``: the speed-up is the whole model's FLOP count before / after."""

from __future__ import annotations

from ..solver.allocation import ALLOCATORS, damage_rows
from ..solver.ranks import LayerCosts, candidate_ranks, select_ranks, speedup_to_budget
from .base import CostModel, Costs


class FlopCosts(Costs):
    def choose(self, free, spectra, fixed, fixed_flops, total_flops, cfg, damage=None):
        budget = speedup_to_budget(total_flops, cfg.speedup)
        if damage is None:
            return select_ranks([p.shape for p in free], spectra, budget, fixed_flops, fixed,
                                multiple=cfg.rank_multiple)
        ranks = [fixed[i] if i in fixed and free[i].shape.saves(fixed[i]) else None for i in range(len(free))]
        movable = [i for i in range(len(free)) if i not in fixed]
        fixed_cost = fixed_flops + sum(free[i].shape.flops_at(ranks[i]) for i in fixed)
        chosen = ALLOCATORS[cfg.allocation].choose(
            [LayerCosts.from_flops(free[i].shape, cfg.rank_multiple) for i in movable],
            [spectra[i] for i in movable], damage_rows([free[i] for i in movable], damage), budget, fixed_cost,
            indices=movable)
        for i, r in zip(movable, chosen):
            ranks[i] = r
        return ranks

    def savings(self, p, cfg):
        return {r: float(p.flops_before - p.shape.factorised_flops(r))
                for r in candidate_ranks(p.shape.break_even_rank(), cfg.rank_multiple)}


class FlopModel(CostModel):
    name = "flops"
    unit = "FLOPs"
    help = "--speedup is the FLOP reduction"

    def costs(self, compressor, plan, cfg) -> Costs:
        return FlopCosts()
