"""``--allocation refined``: the energy allocation's solved model, refined by exchanges checked end to end.

Issue 15: damage measured on linear fits, layer by layer, does not predict what the nonlinear asymmetric
fits do together. So the choice is refined on the model as built: starting from the solved factorised
model, a move takes one layer's rank a step up and pays for it with another's steps down, keeping the
summed cost of the cost model (FLOPs or latency table) within that of the built choice
(solver/exchange.py). Each layer moved is solved again by the real solver on the approximated rows it was
solved on (solve.py :func:`~onnx_lowrank.solve.solve_again`, cached per rank), and the whole model's
output damage on the held-back calibration images is measured with onnxruntime
(calibration/damage.py :class:`DamageMeter`, through one model with every movable layer's channel map
as an input, graph/probe.py). A move is kept only if that damage falls; greedy, at most
``cfg.exchange_rounds`` rounds of ``cfg.exchange_tries`` measured proposals each. Each layer's up-step
gain and down-step loss are measured once in the built context (again for the layers a kept move
changed) and rank the proposals; with ``cfg.exchange_schedule`` those three fits per layer use that short
schedule (cheaper; moves are still measured with the real fits). While moves are measured, layers after
a moved one keep the fits they were solved with; once moves were taken, every layer is solved again at
the refined ranks (``cfg.exchange_resolve``) and the better of the two models by held-back damage is
written: the written model is always one whose damage was measured.
"""

from __future__ import annotations

import time
from dataclasses import replace

from . import progress
from .calibration.damage import DamageMeter, factor_weights, held_back_feeds
from .graph.probe import map_inputs, probe_layers
from .graph.rewrite import rewrite_convs
from .runtime import CALIBRATION, session
from .solve import solve_again
from .solver.exchange import Ladder, Move, apply, moves, total_cost

KEPT_WHOLE = "kept whole: its rank steps paid for another layer's (exchange checked end to end)"


def ladder_of(p, costs, cfg) -> Ladder | None:
    """The layer's options (its cost model's candidate ranks that save, then whole) with costs relative to
    whole; None when its rank is not one of them (a hand-set rank) or it has no step to take."""
    saved = {int(r): float(v) for r, v in costs.savings(p, cfg).items() if v > 0}
    options = tuple(sorted(saved)) + (None,)
    if p.rank not in options or len(options) < 2:
        return None
    return Ladder(options, tuple(-saved[r] if r is not None else 0.0 for r in options))


def movable(p, inputs: dict) -> bool:
    """Plain channel steps (no stage before, no alternative) whose solve inputs were kept."""
    return p.layer_id in inputs and p.alternative is None and not (p.split and p.split[0])


class Exchanges:
    """State of one refinement: the options of each movable layer, fits solved per rank, damages measured."""

    def __init__(self, model, plans: list, ladders: list[Ladder], samples, inputs: dict, feeds: list[dict],
                 fixed: list, cfg):
        self.plans, self.ladders, self.samples, self.inputs, self.cfg = plans, ladders, samples, inputs, cfg
        self.names = [p.layer.name for p in plans]
        self.at = [lad.options.index(p.rank) for lad, p in zip(ladders, plans)]
        self.fits = {(i, p.rank, False): p for i, p in enumerate(plans)}
        base = rewrite_convs(model, {p.layer.name: p.stages() for p in fixed}) if fixed else model
        self.meter = DamageMeter(model, probe_layers(base, [p.layer for p in plans]), feeds, cfg.damage_metric,
                                 cfg.threads)
        self.damages: dict[tuple, float] = {}
        self.solves = 0

    def plan_at(self, i: int, option, short: bool = False):
        """Layer i solved at ``option`` (a rank; None: kept whole), once per rank; ``short``: with
        ``cfg.exchange_schedule`` (a fit for ranking moves only, never written)."""
        p = self.plans[i]
        if option is None:
            return replace(p, rank=None, status="skipped", reason=KEPT_WHOLE, factorisation=None, balanced=None,
                           split=None, method=None, rel_error=None, rel_error_linear=None, energy_kept=None,
                           asymmetric=None, note="")
        if (i, option, short) not in self.fits:
            self.solves += 1
            cfg = replace(self.cfg, schedule=self.cfg.exchange_schedule) if short else self.cfg
            self.fits[(i, option, short)] = solve_again(p, option, self.samples, self.inputs[p.layer_id], cfg)
        return self.fits[(i, option, short)]

    def damage(self, at, short: int | None = None) -> float:
        """Output damage with every layer at its option of ``at`` (layer ``short`` with its short fit)."""
        key = (tuple(at), short)
        if key not in self.damages:
            feed = {}
            for i, k in enumerate(at):
                opt = self.ladders[i].options[k]
                f = None if opt is None else self.plan_at(i, opt, short == i).factorisation
                feed.update(zip(map_inputs(self.plans[i].layer), factor_weights(self.plans[i].layer, f)))
            self.damages[key] = self.meter(feed)
        return self.damages[key]

    def marginals(self, i: int, now: float) -> tuple[float | None, float | None]:
        """(damage decrease of layer i one step up, damage increase one step down) from the current state
        (with ``cfg.exchange_schedule``: each of the three measured with layer i's short fits)."""
        short = i if self.cfg.exchange_schedule else None
        if short is not None and self.ladders[i].options[self.at[i]] is not None:
            now = self.damage(self.at, short)
        up = down = None
        if self.at[i] + 1 < len(self.ladders[i].options):
            up = now - self.damage(apply(self.at, Move(i, None, 0, 0.0)), short)
        if self.at[i] > 0:
            down = self.damage(apply(self.at, Move(None, i, 1, 0.0)), short) - now
        return up, down


def refine(model, source, samples, solved: list, inputs: dict, costs, cfg, batch: int, limit, fixed_batch: bool,
           solve_at=None):
    """``(solved plans after the exchanges, summary for the report)``; plans that an exchange kept whole come
    back with ``rank`` None (see module docstring). ``solve_at({layer id: rank or None})``: every layer solved
    again at those ranks (the asymmetric pass); with ``cfg.exchange_resolve``, once moves were taken, the
    refined ranks are solved again so that the layers after a moved one fit its new output, and that model
    is kept if its held-back damage is lower still."""
    t0 = time.perf_counter()
    pairs = [(p, ladder_of(p, costs, cfg)) for p in solved if movable(p, inputs)]
    pairs = [(p, lad) for p, lad in pairs if lad is not None]
    feeds = held_back_feeds(source.batches(batch, limit), cfg.holdout_every, cfg.damage_images, batch, fixed_batch)
    if len(pairs) < 1 or not feeds:
        progress.log("exchanges: nothing to exchange (" + ("no held-back images" if not feeds else
                                                            "no layer with a rank step") + ")")
        return solved, {"layers_movable": len(pairs), "taken": [], "seconds": time.perf_counter() - t0}
    names = {p.layer.name for p, _ in pairs}
    ex = Exchanges(model, [p for p, _ in pairs], [lad for _, lad in pairs], samples, inputs, feeds,
                   [p for p in solved if p.layer.name not in names], cfg)
    budget = total_cost(ex.ladders, ex.at)
    start = now = ex.damage(ex.at)
    gain, loss = [None] * len(pairs), [None] * len(pairs)
    images = sum(len(next(iter(f.values()))) for f in feeds)
    with progress.bar(f"exchange marginals ({len(pairs)} layers, {images} held-back images, {ex.meter.metric.name})",
                      len(pairs), "layer") as update:
        for i in range(len(pairs)):
            gain[i], loss[i] = ex.marginals(i, now)
            update(1, ex.names[i])
    first = dict(zip(ex.names, zip(gain, loss)))
    taken, tried = [], []
    with progress.bar("exchanges", cfg.exchange_rounds, "round") as update:
        for _ in range(cfg.exchange_rounds):
            proposals = moves(ex.ladders, ex.at, budget, gain, loss)[:cfg.exchange_tries]
            measured = [(ex.damage(apply(ex.at, m)), k, m) for k, m in enumerate(proposals)]
            tried.append([{"move": m.describe(ex.names), "predicted": m.predicted, "damage": d}
                          for d, _, m in measured])
            best = min(measured, default=None, key=lambda t: (t[0], t[1]))
            if best is None or not best[0] < now:
                update(1, "no proposal lowers the damage" if proposals else "no proposal")
                break
            d, _, m = best
            before = [ex.ladders[i].options[k] for i, k in enumerate(ex.at)]
            ex.at = apply(ex.at, m)
            taken.append({"move": m.describe(ex.names), "predicted": m.predicted, "damage_before": now,
                          "damage_after": d, "ranks": {ex.names[i]: [before[i], ex.ladders[i].options[ex.at[i]]]
                                                       for i in (m.up, m.down) if i is not None}})
            now = d
            for i in {m.up, m.down} - {None}:
                gain[i], loss[i] = ex.marginals(i, now)
            update(1, f"{m.describe(ex.names)}: damage {taken[-1]['damage_before']:.4g} -> {d:.4g}")
    out = {p.layer_id: p for p in solved}
    for i, p in enumerate(ex.plans):
        q = ex.plan_at(i, ex.ladders[i].options[ex.at[i]])
        if q.rank != p.rank:
            saved = -ex.ladders[i].costs[ex.at[i]]
            after = None if p.latency_before is None else p.latency_before - saved
            q = replace(q, latency_after=after, note="; ".join(filter(None, [q.note, f"exchange: rank {p.rank} -> "
                                                                              f"{q.rank or 'whole'}"])))
        out[p.layer_id] = q
    result = [out[p.layer_id] for p in solved]
    resolved = None
    if taken and cfg.exchange_resolve and solve_at is not None:
        resolved, result = _solved_again(model, result, solve_at, ex.meter, cfg, now)
    summary = {"metric": ex.meter.metric.name, "damage_before": start, "damage_after": now, "budget": budget,
               "damage_solved_again": resolved, "kept_solved_again": resolved is not None and resolved < now,
               "cost_after": total_cost(ex.ladders, ex.at), "layers_movable": len(pairs),
               "held_back_images": images, "evaluations": ex.meter.calls,
               "solves": ex.solves, "taken": taken, "tried": tried, "marginals": first,
               "schedule": [list(st) for st in cfg.exchange_schedule] if cfg.exchange_schedule else None,
               "seconds": time.perf_counter() - t0}
    progress.log(f"exchanges: {len(taken)} taken, damage ({summary['metric']}) {start:.4g} -> {now:.4g}"
                 + ("" if resolved is None else f", solved again {resolved:.4g}"
                    + (" (kept)" if summary["kept_solved_again"] else " (not kept)"))
                 + f", {ex.meter.calls} evaluations, {ex.solves} solves, {summary['seconds']:.1f} s")
    return result, summary


def _solved_again(model, plans: list, solve_at, meter: DamageMeter, cfg, now: float):
    """(held-back damage of the refined ranks solved again from scratch, against ``meter``'s references; the
    plans to keep)."""
    again = {p.layer_id: p for p in solve_at({p.layer_id: p.rank for p in plans})}
    written = [again[p.layer_id] for p in plans if p.layer_id in again]
    rewritten = rewrite_convs(model, {p.layer.name: p.stages() for p in written}) if written else model
    damage = meter.damage(session(rewritten, CALIBRATION, cfg.threads), {})
    if not damage < now:
        return damage, plans
    def note(p, q):
        moved = [t for t in p.note.split("; ") if t.startswith("exchange:")]
        return "; ".join(filter(None, [q.note, *moved, "solved again at the refined ranks"]))

    return damage, [replace(again[p.layer_id], latency_after=p.latency_after, note=note(p, again[p.layer_id]))
                    if p.layer_id in again else p for p in plans]
