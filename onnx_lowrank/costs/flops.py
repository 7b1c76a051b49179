"""``--objective flops``: the speed-up is the whole model's FLOP count before / after."""

from __future__ import annotations

from ..solver.ranks import select_ranks, speedup_to_budget
from .base import CostModel, Costs


class FlopCosts(Costs):
    def choose(self, free, spectra, fixed, fixed_flops, total_flops, cfg):
        budget = speedup_to_budget(total_flops, cfg.speedup)
        return select_ranks([p.shape for p in free], spectra, budget, fixed_flops, fixed, multiple=cfg.rank_multiple)


class FlopModel(CostModel):
    name = "flops"
    help = "--speedup is the FLOP reduction"

    def costs(self, compressor, plan, cfg) -> Costs:
        return FlopCosts()
