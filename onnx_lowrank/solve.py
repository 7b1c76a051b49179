"""Solving the chosen layers: each layer's channel step from sampled rows, asymmetric by default.

Asymmetric (method.md section 3): layers are solved in graph order, each on its inputs as the
partly compressed model computes them, so errors do not pile up; the approximation of every
solved layer is applied to the cached feature maps before the next one is solved.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import progress
from .calibration.sampling import Propagator, SampledTensor, collect, sample_key
from .config import parse_size
from .graph.dense import is_dense
from .graph.rewrite import add_branches, rewrite_convs
from .graph.subgraph import producers
from .plan import LayerPlan
from .sampling_plan import MIN_ROWS_PER_CHANNEL, fitted_rows, largest_solve, split, tensors
from .solver.balance import balance


@dataclass
class LayerInputs:
    """The approximated rows one layer was solved on (asymmetric pass), kept to solve it again at another rank."""

    rows: dict[str, np.ndarray]


def solve_all(model, value_types, source, chosen: list[LayerPlan], samples, batch: int, limit: int | None,
              positions: dict[int, int], cfg, inputs: dict | None = None) -> list[LayerPlan]:
    """The chosen plans, solved (same order). ``inputs``: filled with each layer's :class:`LayerInputs`
    (None for a layer solved symmetrically), for :func:`solve_again`."""
    if not chosen:
        return []
    # Schemes with stages before their channel step (3-D) are sampled at their core's output: in a model
    # where those layers are replaced by pre + core (same output names, hence the same positions).
    chosen = [replace(p, split=p.scheme.split(p.layer, p.rank)) for p in chosen]
    split_layers = {p.layer.name: p for p in chosen if p.split[0]}
    sampling = rewrite_convs(model, {n: [*p.split[0], p.split[1]] for n, p in split_layers.items()}) \
        if split_layers else model
    # An alternative's pre + core run beside the layer, to an extra tensor sampled with it.
    alts = [p for p in chosen if p.alternative]
    if alts:
        sampling = add_branches(sampling, [(p.layer.output, p.layer.input, [*p.alternative.split[0],
                                                                            p.alternative.split[1]],
                                            p.alternative.tensor) for p in alts])
    # The symmetric fit of a split layer (or of an alternative) regresses on its core's response to the
    # original inputs: sampled from the original model with each core beside its layer.
    cores = [(p, p.layer.output, p.split) for p in split_layers.values()] + \
        [(p, p.alternative.tensor, p.alternative.split) for p in alts]
    plain = None
    if cores and (not cfg.asymmetric or any(_too_few_rows(p, samples, cfg) for p, _, _ in cores)):
        beside = add_branches(model, [(p.layer.output, p.layer.input, [*pre, core], _plain(name))
                                      for p, name, (pre, core) in cores])
        with progress.bar("sampling split layers", source.total(limit), "img") as update:
            plain = collect(beside, value_types, source, [SampledTensor(_plain(name), p.layer_id)
                                                          for p, name, _ in cores],
                            batch, cfg.seed, positions, limit, update, cfg.threads)
    if cfg.asymmetric:
        return _solve_asymmetric(sampling, value_types, source, chosen, samples, batch, limit, positions, cfg, plain,
                                 inputs)
    solved = []
    with progress.bar("solve", len(chosen), "layer") as update:
        for p in chosen:
            solved.append(_solve(p, samples, None, cfg, plain))
            update(1, _item(p))
            if inputs is not None:
                inputs[p.layer_id] = None
    return solved


def solve_again(p: LayerPlan, rank: int, samples, inputs: LayerInputs | None, cfg) -> LayerPlan:
    """A solved channel-step plan (no stage before it, no alternative) solved at another ``rank`` on the
    rows it was solved on: the original samples' targets, ``inputs`` (None: symmetric)."""
    if p.alternative is not None or (p.split and p.split[0]):
        raise ValueError(f"{p.layer.name}: only a plain channel step can be solved again at another rank")
    q = replace(p, rank=int(rank), split=p.scheme.split(p.layer, int(rank)), note="", status="factorised",
                reason="", energy_kept=energy(p.spectrum, int(rank)) if p.spectrum is not None else None)
    return _solve(q, samples, inputs, cfg)


def cache_budget(samples, chosen: list[LayerPlan], cfg) -> int:
    """Bytes of feature maps the asymmetric pass may cache in memory: what the samples and the largest layer's
    solve (sampling_plan.largest_solve, as --max-memory reserved it) leave of --max-memory, so that the three
    together stay within it (the rest goes to a temporary folder)."""
    def rows_of(p):
        return len(samples.rows[sample_key(p.layer.output, p.layer_id)]), fitted_rows(p, samples, cfg.holdout_every)

    solve = largest_solve(chosen, rows_of, cfg)
    return max(0, parse_size(cfg.max_memory) - sum(a.nbytes for a in samples.rows.values()) - solve)


def _input_keys(p: LayerPlan) -> list[str]:
    lay = p.layer
    return [sample_key(lay.output, p.layer_id)] + ([sample_key(lay.shortcut, p.layer_id)] if lay.shortcut else [])


def _item(p: LayerPlan) -> str:
    return f"{p.layer.name}, {p.layer.out_channels} -> {p.rank}"


def _plain(name: str) -> str:
    return f"{name}__lowrank_plain"


def _too_few_rows(p: LayerPlan, samples, cfg) -> bool:
    return fitted_rows(p, samples, cfg.holdout_every) < MIN_ROWS_PER_CHANNEL * p.layer.out_channels


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.3g}%"


def energy(spec: np.ndarray, r: int) -> float:
    """Fraction of the response energy the top ``r`` directions keep."""
    return float(spec[:r].sum() / spec.sum()) if spec.sum() > 0 else 1.0


def _solve(p: LayerPlan, original, approximated, cfg, plain=None) -> LayerPlan:
    """Solve one layer: ``original`` samples give targets, ``approximated`` (or None) the inputs.

    ``plain``: samples of split layers' cores on the original inputs (their symmetric inputs).
    """
    lay = p.layer
    y_key = sample_key(lay.output, p.layer_id)
    s_key = sample_key(lay.shortcut, p.layer_id) if lay.shortcut else None
    fit, held = split(original, y_key, cfg.holdout_every)
    # The rows as kept (float32): the solver widens only the rows it fits, once (solver/layer.py).
    y = original.rows[y_key]
    s = original.rows[s_key] if s_key else None
    n_fit, d = int(fit.sum()), y.shape[1]
    note = p.note
    if approximated is not None and n_fit < MIN_ROWS_PER_CHANNEL * d:
        note = (f"fitted symmetrically: {n_fit} samples < {MIN_ROWS_PER_CHANNEL} x {d} channels "
                "(more images or --samples-per-image allow asymmetric)")
        progress.log(f"warning: {lay.name}: {note}")
        approximated = None
    yh = approximated.rows[y_key] if approximated is not None else None
    sh = approximated.rows[s_key] if s_key and approximated is not None else None
    plain_key = sample_key(_plain(lay.output), p.layer_id)
    if approximated is None and plain is not None and plain_key in plain.rows:
        yh, sh = plain.rows[plain_key], s  # symmetric: the core's response, original shortcut
    p = replace(p, asymmetric=approximated is not None)
    sol = p.scheme.solve(y, yh, p.rank, lay, fit, held, s=s, sh=sh, method=cfg.method, schedule=cfg.schedule,
                         safety_net=cfg.safety_net)
    alt = p.alternative
    if alt:
        rows = (approximated.rows[sample_key(alt.tensor, p.layer_id)] if approximated is not None
                else plain.rows[sample_key(_plain(alt.tensor), p.layer_id)])
        other = alt.scheme.solve(y, rows, alt.rank, lay, fit, held, s=s, sh=sh if approximated is not None else s,
                                 method=cfg.method, schedule=cfg.schedule, safety_net=cfg.safety_net)
        compared = (f"auto: {p.scheme.name} rank {p.rank} err {_pct(sol.rel_error)}, {alt.scheme.name} rank "
                    f"{alt.rank} err {_pct(other.rel_error)}")
        if other.rel_error is not None and sol.rel_error is not None and other.rel_error < sol.rel_error:
            p = replace(p, scheme=alt.scheme, rank=alt.rank, split=alt.split, energy_kept=energy(p.spectrum, alt.rank))
            sol, yh = other, rows
        else:
            p = replace(p, alternative=None)
        note = "; ".join(filter(None, [note, compared]))
    note = "; ".join(filter(None, [note, sol.note]))
    # Balancing is exact (the function is unchanged); it only decides how INT8 will see the d' channels.
    return replace(p, note=note, method=sol.method, rel_error=sol.rel_error, rel_error_linear=sol.rel_error_linear,
                   factorisation=sol.factorisation,
                   balanced=balance(sol.factorisation, y if yh is None else yh) if cfg.balance else None)


def _solve_asymmetric(model, value_types, source, chosen: list[LayerPlan], samples, batch: int,
                      limit: int | None, positions: dict[int, int], cfg, plain=None,
                      inputs: dict | None = None) -> list[LayerPlan]:
    """Solve layers in graph order, each on inputs from the partly approximated model."""
    producer = producers(model)
    stops: dict[int, list[SampledTensor]] = {}
    by_stop: dict[int, list[LayerPlan]] = {}
    for p in chosen:
        lay, alt = p.layer, p.alternative
        stop = max(producer[lay.output], producer[alt.tensor] if alt else -1,
                   producer.get(lay.shortcut, -1) if lay.shortcut else -1)
        stops.setdefault(stop, []).extend(tensors(p) + ([SampledTensor(alt.tensor, p.layer_id)] if alt else []))
        by_stop.setdefault(stop, []).append(p)
    solved: dict[int, LayerPlan] = {}
    last = max(by_stop)
    with Propagator(model, value_types, source, batch, cfg.seed, positions, limit,
                    cfg.cache_dir, cfg.threads, cache_budget(samples, chosen, cfg)) as prop, \
            progress.bar("asymmetric solve", len(chosen), "layer") as update:
        for stop, approx in prop.run(stops):
            for i, p in enumerate(by_stop[stop]):
                q = solved[p.layer_id] = _solve(p, samples, approx, cfg, plain)
                if inputs is not None:
                    inputs[p.layer_id] = LayerInputs({k: approx.rows[k] for k in _input_keys(p)}) \
                        if q.asymmetric else None
                update(1, _item(q))
                f = q.factorisation
                if stop != last:  # the last segment's maps are read by nothing after it
                    prop.transform(q.layer.output, lambda maps, q=q, f=f: q.scheme.propagate(f, maps),
                                   source=q.alternative.tensor if q.alternative else None,
                                   channels_last=is_dense(q.layer))
                # Two layers feeding one Add are each other's shortcut: the second one must see the
                # first one's approximation, as the rewritten model will.
                for r in by_stop[stop][i + 1:]:
                    if r.layer.shortcut == q.layer.output:
                        key = sample_key(r.layer.shortcut, r.layer_id)
                        approx.rows[key] = f.predict(approx.rows[key].astype(np.float64)).astype(np.float32)
    return [solved[p.layer_id] for p in chosen]
