"""The :class:`Compressor`: strings graph -> calibration -> solver -> graph together.

This is the only module that knows all three parts. The Python API (``api.compress``, which the
CLI calls) drives it; everything here works on in-memory models, and a new model is returned
only once it has passed ``onnx.checker`` and loaded in onnxruntime. The steps live in their own
modules: config, plan, samples, costs/, rank_choice, solve, report.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
from threadpoolctl import threadpool_limits

from . import progress
from .calibration.batching import batching, fixed_batch, input_specs
from .calibration.checks import check_source, review_samples
from .calibration.samples import Samples, check_samples, fingerprint, model_hash, shard_range
from .calibration.inputs import open_source
from .calibration.sampling import probe_shapes, sample_key
from .config import CompressConfig, check_config, parse_size, with_overrides
from .costs import COST_MODELS
from .errors import LowRankError
from .exchange import refine
from .graph.dense import find_dense_layers, is_dense, notional_shape
from .graph.external import release_mapped_pages, uses_external_data
from .graph.heads import mark_heads
from .graph.layers import ConvLayer, find_conv_layers, node_flops
from .graph.loading import infer_value_types, load_model, with_input_shapes
from .graph.normalise import normalise
from .graph.rewrite import rewrite_convs
from .plan import make_plan, no_candidate_message
from .rank_choice import choose_ranks
from .report import build_report
from .runtime import CALIBRATION, session
from .sampling_plan import (check_enough, collect_original, memory_need, positions_per_image, sample_bytes,
                            sampling_settings, tensors, within_memory)
from .schemes import SCHEME_CHOICES
from .sensitivity import measure_layer_damage
from .solver.allocation import ALLOCATORS
from .solve import energy, solve_all


def find_layers(model, value_types) -> list:
    """Every Conv and dense (MatMul / Gemm) layer of ``model``, output heads marked (graph/heads.py): what the
    Compressor plans over and what the ``layers`` command lists."""
    layers = find_conv_layers(model, value_types) + find_dense_layers(model, value_types)
    mark_heads(model, layers)
    return layers


@dataclass
class CompressionResult:
    model: onnx.ModelProto
    report: dict


class Compressor:
    """Load, normalise and calibrate once; then compress at as many settings as wanted.

    Searching for the largest speed-up within an accuracy budget, or sweeping speed-ups, reuses
    the original model's sampled responses instead of running calibration again each time.
    """

    #: Fields of CompressConfig that :meth:`run` may change without recalibrating.
    RUN_FIELDS = ("speedup", "ranks", "method", "asymmetric", "schedule", "balance", "objective", "rank_multiple",
                  "threads", "scheme", "allocation", "damage_metric", "damage_fit", "damage_images", "damage_passes",
                  "safety_net", "exchange_rounds", "exchange_tries",
                  "exchange_schedule", "exchange_resolve")

    def __init__(self, model, data, config: CompressConfig | None = None, *, samples: Samples | None = None,
                 shard: tuple[int, int] | None = None):
        """``samples``: responses sampled beforehand (``onnx-lowrank calibrate``, merged shards) instead of a
        calibration pass; ``shard=(i, n)``: only calibrate the i-th of n image ranges (see :mod:`.shards`)
        into ``self.samples``, nothing else (no cost measurement; such a Compressor cannot run)."""
        cfg = self.config = config or CompressConfig()
        check_config(cfg)
        self._t0 = time.perf_counter()
        self.source_model = load_model(model) if isinstance(model, (str, Path)) else model
        norm = self.model = normalise(self.source_model)
        inputs = input_specs(norm)
        self.source = open_source(data, inputs, cfg.preprocess)
        self.batch, self.limit = batching(inputs, self.source, cfg.batch_size, cfg.max_images)
        first = next(self.source.batches(1, 1))
        shapes = {i.name: [1] + list(first[i.name].shape[1:]) for i in inputs}
        shapes.update(cfg.input_shapes)
        self.value_types = infer_value_types(with_input_shapes(norm, shapes))
        self.layers = find_layers(norm, self.value_types)
        self.flops = node_flops(norm, self.value_types)
        _probe_unknown_shapes(norm, self.layers, self.flops, self.value_types,
                              lambda: next(self.source.batches(self.batch, self.batch)))
        plan = make_plan(self.layers, self.flops, cfg)
        candidates = [p for p in plan if p.candidate]
        if not candidates:
            raise LowRankError(no_candidate_message(plan))
        check_enough(self.source.known_total(self.limit))
        if self.source.in_memory:   # data that cannot teach anything: refused before any work
            check_source(self.source, self.limit)
        unknown = [p.layer for p in candidates if p.layer.activation_unknown]
        if unknown:
            progress.log("warning: fitted as linear: " + "; ".join(
                f"unknown activation {lay.activation_unknown} after conv {lay.name}" for lay in unknown))
        self._costs: dict = {}
        self._damage: dict = {}
        self.shard = shard
        if shard is None:   # measured costs (a latency table that does not fit) fail before calibrating
            self.costs(plan, cfg)
        counted = cfg.samples_per_image == "auto" or shard is not None or samples is not None
        total = self.source.total(self.limit) if counted else self.source.known_total(self.limit)
        wanted = positions_per_image(candidates, total, cfg)
        self.positions = within_memory(candidates, wanted, total, parse_size(cfg.max_memory), cfg)
        self.memory = {"max_memory_bytes": parse_size(cfg.max_memory), "rows_limited_by_memory": self.positions != wanted,
                       "samples_bytes": sample_bytes(candidates, self.positions, total) if total else None,
                       "samples_and_solve_bytes": memory_need(candidates, self.positions, total, cfg)
                       if total else None}
        self._sampled_keys = [t.key for p in candidates for t in tensors(p)]
        self.fingerprint = self.samples_fingerprint() if shard is not None or samples is not None else {}
        if samples is not None:
            self.samples = check_samples(samples, self.fingerprint)
        else:
            first, stop = shard_range(total, self.batch, shard) if shard else (0, self.limit)
            self.samples = collect_original(norm, self.value_types, self.source, candidates, self.batch,
                                            None if stop is None else stop - first, self.positions, cfg, first)
            self.samples.fingerprint, self.samples.shard = self.fingerprint, shard
        check_enough(total if shard else self.samples.images)
        if shard is None:   # a shard's images alone may all be alike: parts are reviewed once merged
            review_samples(self.samples, {p.layer.name: sample_key(p.layer.output, p.layer_id) for p in candidates})
        self._setup_seconds = time.perf_counter() - self._t0

    def samples_fingerprint(self) -> dict:
        """What a samples file must agree on to stand for this Compressor's calibration (counts the data)."""
        return fingerprint(model_hash(self.source_model), sampling_settings(self.config, self.batch),
                           self.positions, self._sampled_keys, self.source.total(self.limit))

    def timing_feed(self) -> dict:
        """One calibration input at batch 1 (the model's own batch if it is fixed): what latency is timed on."""
        n = self.batch if fixed_batch(input_specs(self.model)) else 1
        return next(self.source.batches(n, n))

    def costs(self, plan, cfg: CompressConfig):
        """The cost model's costs for this configuration, measured once per what they depend on."""
        model = COST_MODELS[cfg.objective]
        key = (model.name, *model.key(cfg))
        if key not in self._costs:
            self._costs[key] = model.costs(self, plan, cfg)
        return self._costs[key]

    def _stand_in_speedup(self, ranks: dict[str, int], cfg: CompressConfig) -> float:
        """Measured speed-up of the model factorised at ``ranks`` with constant weights (nothing solved):
        latency does not depend on the weights' values, so this checks the per-layer prediction."""
        from .latency import compare_models

        choice = SCHEME_CHOICES[cfg.scheme]
        stages = {lay.name: choice.for_layer(lay).stand_in(lay, ranks[lay.name]) for lay in self.layers
                  if lay.name in ranks}
        stand_in = rewrite_convs(self.model, stages) if stages else self.model
        progress.status(f"latency: checking {len(stages)} factorised layer(s) on the whole model")
        return compare_models(self.model, stand_in, self.timing_feed(), cfg.threads, 3 * cfg.latency_seconds)

    def _damage_tables(self, plan, cfg: CompressConfig, context: dict[str, int] | None) -> dict[str, dict[int, float]]:
        """Measured damage of each candidate layer at each candidate rank, the others at ``context``'s ranks
        (memory, then disk cache; see sensitivity.py)."""
        key = (cfg.rank_multiple, cfg.scheme, cfg.damage_metric, cfg.damage_fit, cfg.damage_images, cfg.objective,
               None if context is None else tuple(sorted(context.items())))
        if key not in self._damage:
            self._damage[key] = measure_layer_damage(self.model, self.source, self.samples, plan, self.batch,
                                                     self.limit, fixed_batch(input_specs(self.model)), cfg, context)
        return self._damage[key]

    def run(self, **overrides) -> CompressionResult:
        if self.shard is not None:
            raise RuntimeError("a shard's Compressor only calibrates: merge the parts' samples and pass them")
        bad = set(overrides) - set(self.RUN_FIELDS)
        if bad:
            raise TypeError(f"these options need a new Compressor: {sorted(bad)}")
        cfg = with_overrides(self.config, overrides)
        t0 = time.perf_counter()
        plan = make_plan(self.layers, self.flops, cfg)
        missing = [p.layer.name for p in plan if p.candidate and sample_key(p.layer.output, p.layer_id)
                   not in self.samples.rows]
        if missing:
            raise LowRankError(f"no calibration samples for {', '.join(missing)}: pass these --ranks when the "
                               "Compressor is created")
        costs = self.costs(plan, cfg)
        # One BLAS thread: multithreaded OpenBLAS is many times slower on a busy 2-core machine, and
        # single-threaded reductions make the output file reproducible bit for bit.
        with threadpool_limits(limits=1, user_api="blas"):
            damage = None
            if ALLOCATORS[cfg.allocation].needs_damage and cfg.speedup:
                damage = self._damage_tables(plan, cfg, None) if cfg.damage_passes == 0 else None
                for _ in range(cfg.damage_passes):  # each pass measures around the last choice
                    around = choose_ranks(plan, self.samples, self.flops,
                                          cfg if damage else replace(cfg, allocation="energy"), costs, damage)
                    damage = self._damage_tables(plan, cfg, {p.layer.name: p.rank for p in around if p.rank})
            plan = choose_ranks(plan, self.samples, self.flops, cfg, costs, damage)
            choice = SCHEME_CHOICES[cfg.scheme]
            shortcuts = {p.layer.shortcut for p in plan if p.rank is not None and p.layer.shortcut}
            chosen = [replace(p, alternative=choice.alternative(p, shortcuts, cfg.rank_multiple))
                      for p in plan if p.rank is not None]
            inputs = {} if ALLOCATORS[cfg.allocation].refines else None
            solved = solve_all(self.model, self.value_types, self.source, chosen, self.samples, self.batch,
                               self.limit, self.positions, cfg, inputs)
            exchanges = None
            if inputs is not None and solved:
                def solve_at(ranks):
                    again = [replace(p, rank=ranks[p.layer_id], energy_kept=energy(p.spectrum, ranks[p.layer_id]))
                             for p in chosen if ranks.get(p.layer_id)]
                    return solve_all(self.model, self.value_types, self.source, again, self.samples, self.batch,
                                     self.limit, self.positions, cfg)

                solved, exchanges = refine(self.model, self.source, self.samples, solved, inputs, costs, cfg,
                                           self.batch, self.limit, fixed_batch(input_specs(self.model)), solve_at)
        by_id = {p.layer_id: p for p in solved}
        plan = [by_id.get(p.layer_id, p) for p in plan]
        written = [p for p in solved if p.rank is not None]
        new_model = rewrite_convs(self.model, {p.layer.name: _stages(p) for p in written}) if written \
            else copy.deepcopy(self.model)
        _validate(new_model)
        seconds = self._setup_seconds + time.perf_counter() - t0
        report = build_report(plan, self.flops, cfg, self.samples.images, seconds, costs)
        if exchanges is not None:
            report["exchanges"] = exchanges
        return CompressionResult(new_model, {**report, **self.memory})


def _probe_unknown_shapes(model, layers: list[ConvLayer], flops: dict[str, int], value_types, first_batch) -> None:
    """Tensors that shape inference could not reach (shapes computed at run time): measure them, so
    that every node is counted in ``flops`` and such Convs can be compressed."""
    uncounted = [n for n in model.graph.node if (n.name or n.output[0]) not in flops]
    # Only tensors of a known element type: a graph output declared with the wrong type fails to load.
    names = {t for n in uncounted for t in list(n.input) + list(n.output) if t and value_types.get(t, (0,))[0]}
    names |= {lay.output for lay in layers if lay.out_shape is None and lay.weight is not None}
    unknown = sorted(t for t in names if not _shape_known(value_types, t))
    if not unknown:
        return
    shapes = probe_shapes(model, unknown, value_types, first_batch())
    measured = dict(value_types)
    for t, shape in shapes.items():
        measured[t] = (value_types.get(t, (onnx.TensorProto.FLOAT, None))[0], list(shape))
    flops.update(node_flops(model, measured))
    for lay in layers:
        shape = shapes.get(lay.output)
        if lay.out_shape is not None or lay.weight is None or shape is None or \
                (len(shape) != 4 and not is_dense(lay)):
            continue
        lay.out_shape = notional_shape(shape) if is_dense(lay) else [1] + list(shape[1:])
        if lay.skip_reason and lay.skip_reason.startswith("output shape unknown"):
            lay.skip_reason = None


def _shape_known(value_types, name: str) -> bool:
    s = value_types.get(name, (None, None))[1]
    return s is not None and all(isinstance(v, int) for v in s[1:])


def _stages(p) -> list:
    stages = p.stages()
    release_mapped_pages()  # weights kept on disk: the old ones need not stay in memory (graph/external.py)
    return stages


def _validate(model: onnx.ModelProto) -> None:
    """The model we write must pass the full checker and load in onnxruntime."""
    try:
        if not uses_external_data(model):  # the checker reads weights in the proto only
            onnx.checker.check_model(model, full_check=True)
        session(model, CALIBRATION)
    except Exception as exc:  # an internal failure: say so plainly rather than write a broken file
        raise RuntimeError(f"the rewritten model failed validation, nothing was written: {exc}") from exc
