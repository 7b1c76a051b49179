"""Choosing each candidate layer's rank: from the response spectra and the cost model (costs/)."""

from __future__ import annotations

from dataclasses import replace

from . import progress
from .calibration.sampling import sample_key
from .plan import LayerPlan
from .sampling_plan import split
from .solve import energy
from .solver.gram import response_spectrum


def choose_ranks(plan: list[LayerPlan], samples, flops: dict[str, int], cfg, costs,
                 damage: dict[str, dict[int, float]] | None = None) -> list[LayerPlan]:
    """The plan with a rank (or the reason for none) for every candidate; ``damage``: the measured tables
    of ``--allocation sensitivity`` (None: the allocator needs none, or they are being measured)."""
    free = [p for p in plan if p.candidate]
    fixed_flops = sum(flops.values()) - sum(p.flops_before for p in free)
    spectra, fixed = [], {}
    for i, p in enumerate(free):
        key = sample_key(p.layer.output, p.layer_id)
        fit, _ = split(samples, key, cfg.holdout_every)
        free[i] = replace(p, rows=int(fit.sum()))
        spectra.append(response_spectrum(samples.rows[key], fit, p.layer.response_rank))
        if p.layer.name in cfg.ranks:
            r = cfg.ranks[p.layer.name]
            if r % cfg.rank_multiple:
                progress.log(f"warning: rank {r} for {p.layer.name!r} is not a multiple of --rank-multiple "
                             f"{cfg.rank_multiple}: onnxruntime may run it slower than the next multiple")
            fixed[i] = r
    if cfg.speedup is None:
        ranks = [fixed.get(i) for i in range(len(free))]
        ranks = [r if r is not None and p.shape.saves(r) else None for r, p in zip(ranks, free)]
    else:
        # Only given when measured: a cost model that cannot share a budget by damage keeps its signature.
        extra = {} if damage is None else {"damage": damage}
        ranks = costs.choose(free, spectra, fixed, fixed_flops, sum(flops.values()), cfg, **extra)
    times = costs.layer_times(free, ranks, fixed, cfg) or [(None, None)] * len(free)
    chosen = {}
    for p, r, spec, (before, after) in zip(free, ranks, spectra, times):
        p = replace(p, latency_before=before, latency_after=after)
        if damage is not None and damage.get(p.layer.name):
            table = {int(k): float(v) for k, v in damage[p.layer.name].items()}
            p = replace(p, damage=table, saving={r: v for r, v in costs.savings(p, cfg).items() if r in table})
        if r is None:
            chosen[p.layer_id] = replace(p, status="skipped", reason=_kept_reason(p, cfg, costs))
        else:
            chosen[p.layer_id] = replace(p, rank=int(r), status="factorised", reason="", spectrum=spec,
                                         energy_kept=energy(spec, r))
    return [chosen.get(p.layer_id, p) for p in plan]


def _kept_reason(p: LayerPlan, cfg, costs) -> str:
    if p.layer.name in cfg.ranks:
        return f"rank {cfg.ranks[p.layer.name]} is at or above break-even ({p.shape.break_even_rank()}): no FLOP saving"
    if not cfg.speedup:
        return "no rank given"
    if p.shape.break_even_rank() < cfg.rank_multiple:
        return f"break-even rank {p.shape.break_even_rank()} is below the rank multiple {cfg.rank_multiple}"
    return costs.kept_reason(p, cfg) or "kept at full rank by rank selection"
