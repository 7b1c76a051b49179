"""``--objective latency``: the speed-up is measured latency on onnxruntime.

Each candidate layer is timed alone, whole and factorised at a few ranks (latency.py), into a
table (table.py); ranks are chosen on the table, and each choice is checked by timing the whole
model factorised at those ranks with stand-in weights (:meth:`LatencyCosts.checked_speedup`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import progress
from ..errors import LowRankError
from ..graph.rewrite import rewrite_convs
from ..graph.timing import layer_of, spec_of
from ..latency import measure_model, time_layer, timed_ranks
from ..solver.allocation import ALLOCATORS, damage_rows
from ..solver.ranks import LayerCosts, RankSelectionError, candidate_ranks
from .base import CostModel, Costs
from ..executors import refuse_timing_on_worker
from .table import LatencyTable, cache_dir, environment, interpolate, load_cache, model_key, save_cache


@dataclass
class LatencyCosts(Costs):
    """Measured times (ms): the whole original model and, per candidate layer name, its table entry."""

    model_ms: float
    layers: dict[str, dict]
    environment: str
    source: str  # "measured" or the table file it came from
    table: LatencyTable | None = None  # every entry used, written to the table file / cache as it grows
    table_path: Path | None = None
    frozen: bool = False  # the table came from a file: its layer timings are final
    cache: Path | None = None
    model_key: str = ""
    measure: Callable[[dict[str, int]], float] | None = None  # {layer name: rank} -> stand-in model's speed-up
    checks: list = field(default_factory=list)  # the whole-model checks of the last rank choice
    chosen_check: float | None = None  # checked speed-up of the ranks chosen

    def choose(self, free, spectra, fixed, fixed_flops, total_flops, cfg, damage=None):
        return _latency_ranks(free, spectra, fixed, self, cfg, damage)

    def savings(self, p, cfg):
        lc = _layer_costs(p, self.layers[p.layer.name], cfg.rank_multiple)
        return {r: lc.original - c for r, c in zip(lc.ranks, lc.costs)}

    def layer_times(self, free, ranks, fixed, cfg):
        times = []
        for i, (p, r) in enumerate(zip(free, ranks)):
            e = self.layers[p.layer.name]
            after = _fixed_latency(e, r) if i in fixed or r is None else _layer_costs(p, e, cfg.rank_multiple).cost_at(r)
            times.append((float(e["original_ms"]), after))
        return times

    def kept_reason(self, p, cfg):
        if not _layer_costs(p, self.layers[p.layer.name], cfg.rank_multiple).ranks:
            return "no candidate rank is faster than the original on onnxruntime (measured)"
        return None

    def report(self, plan, cfg) -> dict:
        table_ms = self.model_ms - sum(p.latency_before - p.latency_after for p in plan
                                       if p.latency_before is not None and p.rank is not None)
        # With a target the ranks were checked on the whole model: that measurement is the prediction.
        speedup = self.chosen_check if cfg.speedup else self.model_ms / table_ms
        return {
            "latency_original_ms": self.model_ms,
            "latency_table_ms": table_ms,
            "table_latency_speedup": self.model_ms / table_ms,
            "latency_predicted_ms": self.model_ms / speedup,
            "predicted_latency_speedup": speedup,
            "latency_checks": self.checks if cfg.speedup else None,
            "latency_table": self.source,
            "latency_environment": self.environment,
        }

    def checked_speedup(self, ranks: dict[str, int]) -> float:
        """Measured speed-up of the model with these ranks (stand-in weights), from the table if there."""
        key = "check_" + hashlib.sha256(json.dumps([self.model_key, sorted(ranks.items())]).encode()).hexdigest()[:20]
        if key not in self.table.entries:
            # A table file fixes the layer timings; a check it lacks (another --speedup) is measured and added.
            cached = None if self.frozen else load_cache(self.cache, self.table.env).entries.get(key)
            if cached is None:
                refuse_timing_on_worker(f"a whole-model check of the latency table {self.source}")
            self.table.entries[key] = cached or {"speedup": float(self.measure(ranks))}
            if cached is None and not self.frozen:
                save_cache(self.cache, LatencyTable(self.table.env, {key: self.table.entries[key]}))
            if self.table_path is not None:
                self.table.save(self.table_path)
        return float(self.table.entries[key]["speedup"])


def _timed(spec, scheme, ranks: list[int], threads: int | None, seconds: float) -> dict:
    """``{"original_ms": t, "ranks_ms": {"r": t, ...}}``: the layer alone, whole and as the scheme's chain."""
    base = spec.model()
    layer = layer_of(base)
    models = [base] + [rewrite_convs(base, {layer.name: scheme.stand_in(layer, r)}) for r in ranks]
    ms = time_layer(models, spec.input_shape, threads, seconds)
    return {"original_ms": ms[0], "ranks_ms": {str(r): t for r, t in zip(ranks, ms[1:])}}


def measure_latency(model, value_types, plan: list, feed: dict, cfg) -> LatencyCosts:
    """Time the whole model and each candidate layer (cache or table first); see latency.py."""
    env = environment(cfg.threads)
    free = [p for p in plan if p.candidate]
    wanted = {}  # table key -> (layer spec, ranks to time)
    names = {}
    for p in free:
        spec = spec_of(p.layer, value_types)
        key = LatencyTable.layer_key(spec.key() + p.scheme.timing_tag, cfg.rank_multiple)
        names[p.layer.name] = key
        wanted[key] = (spec, p.scheme, timed_ranks(candidate_ranks(p.shape.break_even_rank(), cfg.rank_multiple)))
    mkey = model_key(model, feed)
    table_path = Path(cfg.latency_table) if cfg.latency_table else None
    if table_path is not None and table_path.exists():
        table = LatencyTable.load(table_path)
        missing = [k for k in [mkey, *wanted] if k not in table.entries]
        if missing:
            raise LowRankError(f"latency table {table_path} lacks {len(missing)} timing(s) this compression needs "
                               f"(e.g. {missing[0]}): it was made for another model, --rank-multiple or input size; "
                               "give a new file name to measure and write one")
        if table.env != env:
            progress.log(f"note: latency table {table_path} was measured with {table.env}; here: {env}")
        return LatencyCosts(float(table.entries[mkey]["ms"]), {n: table.entries[k] for n, k in names.items()},
                            table.env, str(table_path), table, table_path, True, None, mkey)
    where = cache_dir(cfg.latency_cache)
    cache = load_cache(where, env)
    todo = [k for k in wanted if k not in cache.entries]
    if mkey not in cache.entries or todo:
        refuse_timing_on_worker("layer timings")
        progress.status(f"latency: timing the model and {len(todo)} layer shape(s) on onnxruntime ({env}); "
                     f"about {cfg.latency_seconds:g} s each, cached in {where}")
    if mkey not in cache.entries:
        cache.entries[mkey] = {"ms": measure_model(model, feed, cfg.threads, seconds=2 * cfg.latency_seconds)}
        progress.status(f"latency: whole model {cache.entries[mkey]['ms']:.3f} ms")
    for n, k in enumerate(todo, 1):
        spec, scheme, ranks = wanted[k]
        cache.entries[k] = _timed(spec, scheme, ranks, cfg.threads, cfg.latency_seconds)
        progress.status(f"latency: [{n}/{len(todo)}] {k}: original {cache.entries[k]['original_ms']:.3f} ms, "
                     f"{len(ranks)} rank(s) timed")
    save_cache(where, LatencyTable(env, {k: cache.entries[k] for k in [mkey, *todo]}))
    used = LatencyTable(env, {k: cache.entries[k] for k in [mkey, *wanted]})
    if table_path is not None:
        used.save(table_path)
    return LatencyCosts(float(used.entries[mkey]["ms"]), {n: used.entries[k] for n, k in names.items()}, env,
                        str(table_path) if table_path else "measured", used, table_path, False, where, mkey)


def _layer_costs(p, entry: dict, multiple: int) -> LayerCosts:
    ranks = candidate_ranks(p.shape.break_even_rank(), multiple)
    return LayerCosts.from_table(p.layer.out_channels, float(entry["original_ms"]), interpolate(entry, ranks))


def _fixed_latency(entry: dict, r: int | None) -> float:
    """Time of a hand-set rank: interpolated when timed ranks surround it, else the original's."""
    return interpolate(entry, [r]).get(r, float(entry["original_ms"])) if r is not None else float(entry["original_ms"])


#: Checked whole-model speed-ups within this fraction of the target are accepted.
CHECK_TOLERANCE = 0.03
MAX_CHECKS = 5


def _latency_ranks(free: list, spectra, fixed: dict[int, int], latency: LatencyCosts, cfg,
                   damage=None) -> list[int | None]:
    """Ranks for a measured speed-up of ``cfg.speedup``: the per-layer table chooses, the whole model checks.

    The table's savings are measured on layers alone; inside the whole model a layer saves a
    somewhat different amount (caches, fused neighbours, threads). So each choice is checked
    by timing the whole model factorised at those ranks (constant weights, nothing solved) and
    the requested table saving is corrected before choosing again: scaled by ``target saving /
    measured saving`` until one check lies on each side of the target, then interpolated between
    the closest two on either side (measured saving grows with the requested one), until the checked
    speed-up is within ``CHECK_TOLERANCE`` of the target (at most MAX_CHECKS times). The choice kept is
    the checked one closest to the target from above, else the fastest.
    """
    base = [fixed[i] if i in fixed and p.shape.saves(fixed[i]) else None for i, p in enumerate(free)]
    movable = [i for i in range(len(free)) if i not in fixed]
    entries = [latency.layers[p.layer.name] for p in free]
    options = [_layer_costs(free[i], entries[i], cfg.rank_multiple) for i in movable]
    model_ms, target = latency.model_ms, float(cfg.speedup)
    fixed_ms = model_ms - sum(float(e["original_ms"]) for e in entries) + \
        sum(_fixed_latency(entries[i], base[i]) for i in fixed)
    want = model_ms * (1 - 1 / target)  # the measured saving that meets the target
    request, tried = want, []
    allocator, rows = ALLOCATORS[cfg.allocation], damage_rows([free[i] for i in movable], damage)
    for attempt in range(MAX_CHECKS):
        budget = model_ms - request
        fastest = False
        try:
            chosen = allocator.choose(options, [spectra[i] for i in movable], rows, budget, fixed_ms,
                                      unit="ms of predicted latency", indices=movable)
        except RankSelectionError as err:
            if any(t["fastest"] for t in tried):
                break
            # The table may understate what the layers save inside the model: check the fastest choice
            # before giving up (also when a rescaled budget asks for more than the table allows).
            fastest = True
            chosen = allocator.choose(options, [spectra[i] for i in movable], rows, err.min_flops, fixed_ms,
                                      unit="ms of predicted latency", indices=movable)
        ranks = list(base)
        for i, r in zip(movable, chosen):
            ranks[i] = r
        saving = sum(float(entries[i]["original_ms"]) - _fixed_latency(entries[i], r) if i in fixed
                     else float(entries[i]["original_ms"]) - _layer_costs(free[i], entries[i], cfg.rank_multiple)
                     .cost_at(r) for i, r in enumerate(ranks) if r is not None)
        checked = latency.checked_speedup({free[i].layer.name: r for i, r in enumerate(ranks) if r is not None})
        measured_saving = model_ms * (1 - 1 / checked)
        tried.append({"table_speedup": model_ms / (model_ms - saving) if saving < model_ms else math.inf,
                      "checked_speedup": checked, "ranks": ranks, "fastest": fastest,
                      "request": model_ms - budget if not fastest else saving, "measured": measured_saving})
        if fastest and checked < target * (1 - CHECK_TOLERANCE):
            raise RankSelectionError(model_ms / target, model_ms / checked, model_ms, "ms of measured latency")
        if abs(checked / target - 1) <= CHECK_TOLERANCE or saving <= 0 or measured_saving <= 0:
            break
        request = _next_request(tried, want, saving, measured_saving)
    above = [t for t in tried if t["checked_speedup"] >= target * (1 - CHECK_TOLERANCE)]
    best = min(above, key=lambda t: t["checked_speedup"]) if above else max(tried, key=lambda t: t["checked_speedup"])
    latency.checks = [{k: v for k, v in t.items() if k in ("table_speedup", "checked_speedup")} for t in tried]
    latency.chosen_check = best["checked_speedup"]
    return best["ranks"]


def _next_request(tried: list[dict], want: float, saving: float, measured_saving: float) -> float:
    """The table saving to ask for next: interpolated between the closest checks below and above the
    wanted measured saving once both exist, else the last request scaled by how far its check fell."""
    below = [t for t in tried if t["measured"] < want]
    above = [t for t in tried if t["measured"] >= want]
    if below and above:
        lo = max(below, key=lambda t: t["measured"])
        hi = min(above, key=lambda t: t["measured"])
        if hi["measured"] > lo["measured"] and hi["request"] != lo["request"]:
            f = (want - lo["measured"]) / (hi["measured"] - lo["measured"])
            return lo["request"] + f * (hi["request"] - lo["request"])
    return saving * want / measured_saving


class LatencyModel(CostModel):
    name = "latency"
    unit = "latency (ms)"
    measures = True
    help = ("--speedup is measured latency on this CPU (layers are timed on onnxruntime, cached)")

    def key(self, cfg) -> tuple:
        return (cfg.rank_multiple, cfg.threads, cfg.latency_table, cfg.scheme)

    def costs(self, compressor, plan, cfg) -> Costs:
        lat = measure_latency(compressor.model, compressor.value_types, plan, compressor.timing_feed(), cfg)
        lat.measure = lambda ranks: compressor._stand_in_speedup(ranks, cfg)
        return lat
