"""The sensitivity pass of ``--allocation sensitivity``: each candidate layer's damage at each rank.

Strings the three parts together for one job: the solver fits each layer alone at each candidate
rank from the original model's samples (solver/candidates.py), calibration measures what each fit does
to the model's outputs on held-back images (calibration/damage.py). Tables are cached on disk next to
the latency tables, per model, data and settings.
"""

from __future__ import annotations

import numpy as np

from . import progress
from .calibration.damage import DamageCache, held_back_feeds, measure_damage
from .calibration.sampling import sample_key
from .costs.table import cache_dir
from .sampling_plan import split
from .solver.activations import Activation
from .solver.allocation import measured_ranks
from .solver.candidates import candidate_fits
from .solver.ranks import candidate_ranks

#: A short nonlinear schedule for ``damage_fit="nonlinear"``: the damage ranks candidates, it need not be final.
DAMAGE_SCHEDULE = ((5, 0.01), (5, 1.0))
#: Ranks measured per layer; the others are interpolated (as for latency timings).
MEASURED_RANKS = 10


def measure_layer_damage(model, source, samples, plan, batch: int, limit, fixed_batch: bool, cfg,
                         context: dict[str, int] | None = None) -> dict:
    """``{layer name: {rank: damage}}`` for every candidate layer of ``plan`` (see module docstring).

    ``context``: {layer name: rank} the other layers hold while one is measured (see
    :func:`~onnx_lowrank.calibration.damage.measure_damage`); None: each layer alone."""
    free = [p for p in plan if p.candidate]
    feeds = held_back_feeds(source.batches(batch, limit), cfg.holdout_every, cfg.damage_images, batch, fixed_batch)
    if not feeds:
        progress.log("warning: no held-back images to measure damage on: --allocation sensitivity falls back to "
                     "energy")
        return {}
    wanted = {p.layer.name: measured_ranks(candidate_ranks(p.shape.break_even_rank(), cfg.rank_multiple),
                                           MEASURED_RANKS) for p in free}
    settings = {"metric": cfg.damage_metric, "fit": cfg.damage_fit, "seed": cfg.seed, "holdout": cfg.holdout_every,
                "samples": cfg.samples_per_image, "ranks": wanted, "context": context, "version": 3}
    cache = DamageCache(cache_dir(cfg.latency_cache))
    key = DamageCache.key(model, feeds, settings)
    hit = cache.load(key)
    if hit is not None:
        progress.status(f"sensitivity: damage of {len(wanted)} layer(s) from the cache ({hit['metric']})")
        return {n: {int(r): float(v) for r, v in t.items()} for n, t in hit["tables"].items()}
    todo, fitted = [], {}
    for p in free:
        ranks = wanted[p.layer.name]
        if not ranks:
            continue
        at = (context or {}).get(p.layer.name)
        y_key = sample_key(p.layer.output, p.layer_id)
        fit, held = split(samples, y_key, cfg.holdout_every)
        s = samples.rows[sample_key(p.layer.shortcut, p.layer_id)].astype(np.float64) if p.layer.shortcut else None
        act = Activation(p.layer.activation, dict(p.layer.activation_params))
        fits = candidate_fits(samples.rows[y_key], sorted(set(ranks) | ({at} if at else set())), act, fit, held,
                              s=s, method=cfg.damage_fit, schedule=DAMAGE_SCHEDULE)
        if at:
            fitted[p.layer.name] = fits[at][0]
        todo.append((p.layer, {r: fits[r][0] for r in ranks}))
    n_images = sum(len(next(iter(f.values()))) for f in feeds)
    with progress.bar(f"sensitivity ({n_images} held-back images)", len(todo), "layer") as update:
        tables, metric = measure_damage(model, todo, feeds, cfg.damage_metric, cfg.threads, update,
                                        context=fitted if context is not None else None)
    cache.save(key, {"metric": metric, "tables": tables})
    return tables
