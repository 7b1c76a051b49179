"""The compression pipeline: graph -> calibration -> solver -> graph, and the report.

This is the only module that knows all three parts. The Python API (``api.compress``, which the
CLI calls) drives :class:`Compressor`; everything here works on in-memory models, and a new model
is returned only once it has passed ``onnx.checker`` and loaded in onnxruntime.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from . import progress
from .calibration.inputs import FeedSource, ImagePreprocess, InputSpec, open_source
from .calibration.sampling import Propagator, SampledTensor, collect, probe_shapes, sample_key
from .errors import LowRankError
from .graph.dense import find_dense_layers, is_dense, notional_shape
from .graph.external import release_mapped_pages, uses_external_data
from .graph.layers import ConvLayer, find_conv_layers, node_flops
from .graph.loading import infer_value_types, load_model, normalise, real_inputs, with_input_shapes
from .graph.rewrite import ConvStage, add_branches, rewrite_convs
from .graph.subgraph import producers
from .latency import (LatencyTable, LayerSpec, cache_dir, compare_models, environment, interpolate, load_cache,
                      measure_model, model_key, save_cache, time_layer, timed_ranks)
from .runtime import CALIBRATION, session
from .schemes import SCHEMES, ChannelScheme, Scheme
from .schemes.dense import DenseScheme
from .schemes.spatial3d import explicit_pads
from .solver.balance import Balanced, balance
from .solver.ranks import (ConvShape, LayerCosts, RankSelectionError, candidate_ranks, select_ranks,
                           select_ranks_costed, speedup_to_budget)
from .solver.reconstruction import Factorisation, response_spectrum

METHODS = ("linear", "nonlinear")
OBJECTIVES = ("latency", "flops")
#: Asymmetric fits regress d channels on d channels: with fewer rows than this many per channel the
#: regression overfits the calibration samples, so such a layer is fitted symmetrically instead.
MIN_ROWS_PER_CHANNEL = 2
#: Fewest calibration images accepted: with fewer, no image of the default ``holdout_every`` (5) is
#: held back, and the report's errors would be measured on the very images the layers were fitted to.
MIN_CALIBRATION_IMAGES = 5
#: ``samples_per_image="auto"`` samples enough positions per image that each layer is fitted on at least
#: this many rows per output channel (measured on the demo model, benchmarks/RESULTS.md "Samples per layer").
ROWS_PER_CHANNEL = 16
#: ... but never fewer positions per image than the old fixed default.
MIN_SAMPLES_PER_IMAGE = 10
DEFAULT_SCHEDULE = ((25, 0.01), (25, 1.0))


@dataclass
class CompressConfig:
    """Every knob of :func:`compress`; the CLI options map one to one onto these fields."""

    speedup: float | None = 2.0
    ranks: dict[str, int] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    method: str = "nonlinear"
    asymmetric: bool = True
    samples_per_image: int | str = "auto"
    max_images: int | None = None
    seed: int = 0
    batch_size: int = 16
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    schedule: tuple = DEFAULT_SCHEDULE
    holdout_every: int = 5
    threads: int | None = None
    cache_dir: str | None = None
    preprocess: ImagePreprocess | None = None
    balance: bool = True
    #: "latency": --speedup is measured on onnxruntime (layers timed, see latency.py); "flops": FLOP count.
    objective: str = "latency"
    #: Chosen ranks are multiples of this (onnxruntime's NCHWc block); 1 = any rank.
    rank_multiple: int = 16
    #: A latency table file: used if it exists (every timing must be in it), else written.
    latency_table: str | None = None
    #: Where measured layer timings are cached (default: $ONNX_LOWRANK_CACHE or ~/.cache/onnx-lowrank).
    latency_cache: str | None = None
    #: Seconds of timing per layer (all its candidate ranks together).
    latency_seconds: float = 1.0
    #: Decomposition scheme (onnx_lowrank/schemes): "channel" (k x k then 1 x 1) or "3d" (k x 1, 1 x k,
    #: 1 x 1; layers it cannot split keep the channel pair); "auto" (flops objective): ranks are chosen as for
    #: "3d", then each 3-D layer is also fitted as a pair at the highest rank costing no more, and keeps the
    #: one with the smaller error on the held-back images.
    scheme: str = "channel"


@dataclass
class CompressionResult:
    model: onnx.ModelProto
    report: dict


def _config(config: CompressConfig | None, overrides: dict) -> CompressConfig:
    cfg = replace(config) if config else CompressConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown option {k!r}")
        setattr(cfg, k, v)
    _check_config(cfg)
    return cfg


class Compressor:
    """Load, normalise and calibrate once; then compress at as many settings as wanted.

    Searching for the largest speed-up within an accuracy budget, or sweeping speed-ups, reuses
    the original model's sampled responses instead of running calibration again each time.
    """

    #: Fields of CompressConfig that :meth:`run` may change without recalibrating.
    RUN_FIELDS = ("speedup", "ranks", "method", "asymmetric", "schedule", "balance", "objective", "rank_multiple",
                  "threads", "scheme")

    def __init__(self, model, data, config: CompressConfig | None = None):
        cfg = self.config = config or CompressConfig()
        _check_config(cfg)
        self._t0 = time.perf_counter()
        self.source_model = load_model(model) if isinstance(model, (str, Path)) else model
        norm = self.model = normalise(self.source_model)
        inputs = input_specs(norm)
        self.source = open_source(data, inputs, cfg.preprocess)
        self.batch, self.limit = _batching(inputs, self.source, cfg)
        first = next(self.source.batches(1, 1))
        shapes = {i.name: [1] + list(first[i.name].shape[1:]) for i in inputs}
        shapes.update(cfg.input_shapes)
        self.value_types = infer_value_types(with_input_shapes(norm, shapes))
        self.layers = find_conv_layers(norm, self.value_types) + find_dense_layers(norm, self.value_types)
        self.flops = node_flops(norm, self.value_types)
        _probe_unknown_shapes(norm, self.layers, self.flops, self.value_types,
                              lambda: next(self.source.batches(self.batch, self.batch)))
        plan = _plan(self.layers, self.flops, cfg)
        candidates = [p for p in plan if p.candidate]
        if not candidates:
            raise LowRankError(_no_candidate_message(plan))
        _check_enough(self.source.total(self.limit))
        unknown = [p.layer for p in candidates if p.layer.activation_unknown]
        if unknown:
            progress.log("warning: fitted as linear: " + "; ".join(
                f"unknown activation {lay.activation_unknown} after conv {lay.name}" for lay in unknown))
        self._latency: dict = {}
        if cfg.objective == "latency":  # a latency table that does not fit is an error before calibrating
            self._latency_costs(plan, cfg)
        # Sample every layer either objective may factorise, so that run() can switch objective.
        sampled = _plan(self.layers, self.flops, replace(cfg, objective="flops"))
        self.positions = positions_per_image(sampled, self.source.total(self.limit), cfg)
        self.samples = _collect_original(norm, self.value_types, self.source, [p for p in sampled if p.candidate],
                                         self.batch, self.limit, self.positions, cfg)
        self._setup_seconds = time.perf_counter() - self._t0

    def timing_feed(self) -> dict:
        """One calibration input at batch 1 (the model's own batch if it is fixed): what latency is timed on."""
        n = self.batch if _fixed_batch(input_specs(self.model)) else 1
        return next(self.source.batches(n, n))

    def _latency_costs(self, plan: list[LayerPlan], cfg: CompressConfig) -> LatencyCosts:
        key = (cfg.rank_multiple, cfg.threads, cfg.latency_table, cfg.scheme)
        if key not in self._latency:
            lat = _measure_latency(self.model, self.value_types, plan, self.timing_feed(), cfg)
            lat.measure = lambda ranks: self._stand_in_speedup(ranks, cfg)
            self._latency[key] = lat
        return self._latency[key]

    def _stand_in_speedup(self, ranks: dict[str, int], cfg: CompressConfig) -> float:
        """Measured speed-up of the model factorised at ``ranks`` with constant weights (nothing solved):
        latency does not depend on the weights' values, so this checks the per-layer prediction."""
        stages = {lay.name: _scheme(lay, cfg).stand_in(lay, ranks[lay.name]) for lay in self.layers
                  if lay.name in ranks}
        stand_in = rewrite_convs(self.model, stages) if stages else self.model
        progress.status(f"latency: checking {len(stages)} factorised layer(s) on the whole model")
        return compare_models(self.model, stand_in, self.timing_feed(), cfg.threads, 3 * cfg.latency_seconds)

    def run(self, **overrides) -> CompressionResult:
        bad = set(overrides) - set(self.RUN_FIELDS)
        if bad:
            raise TypeError(f"these options need a new Compressor: {sorted(bad)}")
        cfg = _config(self.config, overrides)
        t0 = time.perf_counter()
        plan = _plan(self.layers, self.flops, cfg)
        missing = [p.layer.name for p in plan if p.candidate and sample_key(p.layer.output, p.layer_id)
                   not in self.samples.rows]
        if missing:
            raise LowRankError(f"no calibration samples for {', '.join(missing)}: pass these --ranks when the "
                               "Compressor is created")
        # One BLAS thread: multithreaded OpenBLAS is many times slower on a busy 2-core machine, and
        # single-threaded reductions make the output file reproducible bit for bit.
        latency = self._latency_costs(plan, cfg) if cfg.objective == "latency" else None
        with threadpool_limits(limits=1, user_api="blas"):
            _choose_ranks(plan, self.samples, self.flops, cfg, latency)
            chosen = [p for p in plan if p.rank is not None]
            if cfg.scheme == "auto":
                _offer_pair(chosen, cfg)
            _solve_all(self.model, self.value_types, self.source, chosen, self.samples, self.batch, self.limit,
                       self.positions, cfg)
        new_model = rewrite_convs(self.model, {p.layer.name: _stages(p) for p in chosen}) if chosen \
            else copy.deepcopy(self.model)
        _validate(new_model)
        seconds = self._setup_seconds + time.perf_counter() - t0
        return CompressionResult(new_model, _report(plan, self.flops, cfg, self.samples.images, seconds, latency))


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


def _check_enough(images: int | None) -> None:
    if images is not None and images < MIN_CALIBRATION_IMAGES:
        raise LowRankError(f"only {images} calibration image(s): give at least {MIN_CALIBRATION_IMAGES} "
                           "(a few hundred is typical) so that some are held back to measure the error")


def _shape_known(value_types, name: str) -> bool:
    s = value_types.get(name, (None, None))[1]
    return s is not None and all(isinstance(v, int) for v in s[1:])


def _check_config(cfg: CompressConfig) -> None:
    if cfg.method not in METHODS:
        raise LowRankError(f"--method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    if cfg.speedup is not None and not (isinstance(cfg.speedup, (int, float)) and cfg.speedup > 1.0):
        raise LowRankError(f"--speedup must be a number greater than 1 (got {cfg.speedup}); "
                           "2 means twice as fast, or half the FLOPs with --objective flops")
    k = cfg.samples_per_image
    if k != "auto" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise LowRankError(f"--samples-per-image must be 'auto' or an integer of at least 1, not {k!r}")
    if cfg.scheme not in (*SCHEMES, "auto"):
        raise LowRankError(f"--scheme must be one of {', '.join(SCHEMES)}, auto, not {cfg.scheme!r}")
    if cfg.scheme == "auto" and cfg.objective != "flops":
        raise LowRankError("--scheme auto needs --objective flops (it compares the schemes at equal FLOPs)")
    if cfg.objective not in OBJECTIVES:
        raise LowRankError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {cfg.objective!r}")
    if isinstance(cfg.rank_multiple, bool) or not isinstance(cfg.rank_multiple, int) or cfg.rank_multiple < 1:
        raise LowRankError(f"--rank-multiple must be a positive integer, not {cfg.rank_multiple!r}")
    if not (isinstance(cfg.latency_seconds, (int, float)) and cfg.latency_seconds > 0):
        raise LowRankError(f"latency_seconds must be positive, not {cfg.latency_seconds!r}")
    if cfg.max_images is not None and cfg.max_images < 1:
        raise LowRankError("--max-images must be at least 1")
    if cfg.batch_size < 1:
        raise LowRankError("--batch-size must be at least 1")
    if cfg.seed < 0:
        raise LowRankError(f"--seed must be 0 or more, not {cfg.seed}")
    for name, r in cfg.ranks.items():
        if not isinstance(r, int) or r < 1:
            raise LowRankError(f"rank for {name!r} must be a positive integer, not {r!r}")


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    specs = []
    for vi in real_inputs(model):
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, np.dtype(dtype), shape))
    return specs


def _fixed_batch(inputs: list[InputSpec]) -> bool:
    return any(i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0 for i in inputs)


def _batching(inputs: list[InputSpec], source: FeedSource, cfg: CompressConfig) -> tuple[int, int | None]:
    """Batch size and sample limit: a model exported with a fixed batch N is fed whole batches of N only."""
    fixed = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    if len(fixed) != 1:
        return cfg.batch_size, cfg.max_images
    n_fixed = fixed.pop()
    total = source.total(cfg.max_images)
    if total is None or total % n_fixed == 0:
        return n_fixed, cfg.max_images
    usable = total // n_fixed * n_fixed
    if usable == 0:
        raise LowRankError(f"the model's batch size is fixed at {n_fixed} but the calibration data has only {total} "
                           f"samples: give at least {n_fixed}")
    progress.log(f"note: the model's batch size is fixed at {n_fixed}; using {usable} of {total} calibration samples")
    return n_fixed, usable


@dataclass
class LayerPlan:
    layer: ConvLayer
    layer_id: int
    flops_before: int = 0
    rank: int | None = None
    status: str = "skipped"
    reason: str = ""
    energy_kept: float | None = None
    rel_error: float | None = None
    rel_error_linear: float | None = None
    method: str | None = None
    scheme: Scheme = field(default_factory=ChannelScheme)
    split: tuple | None = None  # the scheme's (pre, core) at the chosen rank, once computed
    alt: tuple | None = None  # --scheme auto: (scheme, rank, (pre, core), core output tensor) also fitted
    spectrum: np.ndarray | None = None
    factorisation: Factorisation | None = None
    balanced: Balanced | None = None
    candidate: bool = False
    asymmetric: bool | None = None
    note: str = ""
    rows: int | None = None
    latency_before: float | None = None
    latency_after: float | None = None

    @property
    def shape(self) -> ConvShape:
        return self.scheme.shape(self.layer)

    @property
    def flops_after(self) -> int:
        return self.shape.factorised_flops(self.rank) if self.rank is not None else self.flops_before


def _plan(layers: list[ConvLayer], flops: dict[str, int], cfg: CompressConfig) -> list[LayerPlan]:
    names = {lay.name for lay in layers}
    for name in cfg.ranks:
        if name not in names:
            raise LowRankError(f"--ranks names {name!r}, which is not a Conv layer of the model "
                               f"(run `onnx-lowrank layers MODEL` to see the names)")
    plan = []
    for i, lay in enumerate(layers):
        p = LayerPlan(lay, i, flops.get(lay.name, 0), scheme=_scheme(lay, cfg))
        if lay.skip_reason:
            p.reason = lay.skip_reason
        elif any(fnmatch.fnmatchcase(lay.name, pat) for pat in cfg.exclude):
            p.reason = "excluded by --exclude"
        elif is_dense(lay) and cfg.objective == "latency":
            p.reason = "MatMul / Gemm layers are compressed with --objective flops only (not timed yet)"
        elif lay.name in cfg.ranks and cfg.ranks[lay.name] > lay.out_channels:
            raise LowRankError(f"rank {cfg.ranks[lay.name]} for {lay.name!r} exceeds its {lay.out_channels} filters")
        elif lay.name not in cfg.ranks and p.shape.break_even_rank() < 1:
            p.reason = "no rank saves FLOPs (break-even rank is 0)"
        else:
            p.candidate = True
        plan.append(p)
    return plan


def _scheme(lay: ConvLayer, cfg: CompressConfig) -> Scheme:
    """The configured scheme, or the channel pair for a layer it cannot take; MatMul / Gemm: their own."""
    if is_dense(lay):
        return DENSE
    scheme = SCHEMES["3d" if cfg.scheme == "auto" else cfg.scheme]
    if not lay.skip_reason and scheme.skip_reason(lay) is None:
        return scheme
    return SCHEMES["channel"]


DENSE = DenseScheme()


def _no_candidate_message(plan: list[LayerPlan]) -> str:
    if not plan:
        return "the model has no Conv layer (nor MatMul / Gemm by a constant matrix) to compress"
    reasons = sorted({p.reason for p in plan})
    return f"none of the model's {len(plan)} Conv / MatMul / Gemm layers can be compressed ({'; '.join(reasons)})"


def fit_images(total: int, holdout_every: int) -> int:
    """Images whose rows are fitted (the others are held back for the report, see :func:`_split`)."""
    if total < holdout_every or holdout_every < 2:
        return total
    return total - total // holdout_every


def positions_per_image(plan: list[LayerPlan], total_images: int | None, cfg: CompressConfig) -> dict[int, int]:
    """Sampled positions per image for each layer id.

    An asymmetric fit regresses d channels on d channels, so it needs rows in proportion to d:
    ``"auto"`` takes enough positions that a layer's fitted rows reach ``ROWS_PER_CHANNEL x d``, at least
    ``MIN_SAMPLES_PER_IMAGE`` and at most the layer's positions per image. An explicit number is used as
    it is for every layer.
    """
    out = {}
    for p in plan:
        if cfg.samples_per_image != "auto":
            out[p.layer_id] = cfg.samples_per_image
            continue
        n_fit = fit_images(total_images, cfg.holdout_every) if total_images else 0
        k = max(MIN_SAMPLES_PER_IMAGE, -(-ROWS_PER_CHANNEL * p.layer.out_channels // n_fit) if n_fit else 0)
        positions = p.layer.positions
        out[p.layer_id] = min(k, positions) if positions else k
    return out


def _tensors(p: LayerPlan) -> list[SampledTensor]:
    """What a layer needs sampled: its Conv output, and the shortcut added to it (shaped like it)."""
    last = is_dense(p.layer)
    tensors = [SampledTensor(p.layer.output, p.layer_id, channels_last=last)]
    if p.layer.shortcut:
        tensors.append(SampledTensor(p.layer.shortcut, p.layer_id, like=p.layer.output, channels_last=last))
    return tensors


def _collect_original(model, value_types, source: FeedSource, plan, batch: int, limit: int | None,
                      positions: dict[int, int], cfg: CompressConfig):
    tensors = [t for p in plan for t in _tensors(p)]
    with progress.bar("calibration", source.total(limit), "img") as update:
        return collect(model, value_types, source, tensors, batch, cfg.seed, positions,
                       limit, update, cfg.threads)


def _split(samples, key: str, holdout_every: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (fit, held back): every ``holdout_every``-th image is held back for the report.

    Too few images (or ``holdout_every`` < 2) hold nothing back: all are fitted and no error is reported.
    """
    img = samples.image[key]
    if _held_back(samples.images, holdout_every) == 0:
        mask = np.zeros(len(img), dtype=bool)
        return ~mask, mask
    held = img % holdout_every == holdout_every - 1
    return ~held, held


def _held_back(images: int, holdout_every: int) -> int:
    return images // holdout_every if holdout_every >= 2 else 0


@dataclass
class LatencyCosts:
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

    def checked_speedup(self, ranks: dict[str, int]) -> float:
        """Measured speed-up of the model with these ranks (stand-in weights), from the table if there."""
        key = "check_" + hashlib.sha256(json.dumps([self.model_key, sorted(ranks.items())]).encode()).hexdigest()[:20]
        if key not in self.table.entries:
            # A table file fixes the layer timings; a check it lacks (another --speedup) is measured and added.
            cached = None if self.frozen else load_cache(self.cache, self.table.env).entries.get(key)
            self.table.entries[key] = cached or {"speedup": float(self.measure(ranks))}
            if cached is None and not self.frozen:
                save_cache(self.cache, LatencyTable(self.table.env, {key: self.table.entries[key]}))
            if self.table_path is not None:
                self.table.save(self.table_path)
        return float(self.table.entries[key]["speedup"])


def _layer_spec(lay: ConvLayer, value_types, scheme: Scheme | None = None) -> LayerSpec:
    shape = value_types.get(lay.input, (None, None))[1]
    if shape and len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:]):
        hw = shape[2:]
    else:  # input size from the output size: exact up to the stride's remainder, enough for timing
        s = lay.attrs.get("strides", [1, 1])
        dil = lay.attrs.get("dilations", [1, 1])
        pads = lay.attrs.get("pads", [0, 0, 0, 0])
        hw = [(lay.out_shape[2 + a] - 1) * s[a] + dil[a] * (lay.kernel[a] - 1) + 1 - pads[a] - pads[a + 2]
              for a in range(2)]
    if scheme is not None and scheme.name == "3d":  # its chain is written with explicit pads
        attrs = {k: v for k, v in lay.attrs.items() if k != "auto_pad"}
        attrs["pads"] = explicit_pads(lay)
        return LayerSpec.from_attrs(lay.in_channels, lay.out_channels, lay.kernel, hw, attrs, "3d")
    return LayerSpec.from_attrs(lay.in_channels, lay.out_channels, lay.kernel, hw, lay.attrs)


def _measure_latency(model, value_types, plan: list[LayerPlan], feed: dict, cfg: CompressConfig) -> LatencyCosts:
    """Time the whole model and each candidate layer (cache or table first); see latency.py."""
    env = environment(cfg.threads)
    free = [p for p in plan if p.candidate]
    wanted = {}  # table key -> (layer spec, ranks to time)
    names = {}
    for p in free:
        spec = _layer_spec(p.layer, value_types, p.scheme)
        key = LatencyTable.layer_key(spec, cfg.rank_multiple)
        names[p.layer.name] = key
        wanted[key] = (spec, timed_ranks(candidate_ranks(p.shape.break_even_rank(), cfg.rank_multiple)))
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
        progress.status(f"latency: timing the model and {len(todo)} layer shape(s) on onnxruntime ({env}); "
                     f"about {cfg.latency_seconds:g} s each, cached in {where}")
    if mkey not in cache.entries:
        cache.entries[mkey] = {"ms": measure_model(model, feed, cfg.threads, seconds=2 * cfg.latency_seconds)}
        progress.status(f"latency: whole model {cache.entries[mkey]['ms']:.3f} ms")
    for n, k in enumerate(todo, 1):
        spec, ranks = wanted[k]
        cache.entries[k] = time_layer(spec, ranks, cfg.threads, cfg.latency_seconds)
        progress.status(f"latency: [{n}/{len(todo)}] {k}: original {cache.entries[k]['original_ms']:.3f} ms, "
                     f"{len(ranks)} rank(s) timed")
    save_cache(where, LatencyTable(env, {k: cache.entries[k] for k in [mkey, *todo]}))
    used = LatencyTable(env, {k: cache.entries[k] for k in [mkey, *wanted]})
    if table_path is not None:
        used.save(table_path)
    return LatencyCosts(float(used.entries[mkey]["ms"]), {n: used.entries[k] for n, k in names.items()}, env,
                        str(table_path) if table_path else "measured", used, table_path, False, where, mkey)


def _layer_costs(p: LayerPlan, entry: dict, multiple: int) -> LayerCosts:
    ranks = candidate_ranks(p.shape.break_even_rank(), multiple)
    return LayerCosts.from_table(p.layer.out_channels, float(entry["original_ms"]), interpolate(entry, ranks))


def _fixed_latency(entry: dict, r: int | None) -> float:
    """Time of a hand-set rank: interpolated when timed ranks surround it, else the original's."""
    return interpolate(entry, [r]).get(r, float(entry["original_ms"])) if r is not None else float(entry["original_ms"])


#: Checked whole-model speed-ups within this fraction of the target are accepted.
CHECK_TOLERANCE = 0.03
MAX_CHECKS = 5


def _latency_ranks(free: list[LayerPlan], spectra, fixed: dict[int, int], latency: LatencyCosts,
                   cfg: CompressConfig) -> list[int | None]:
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
    for attempt in range(MAX_CHECKS):
        budget = model_ms - request
        fastest = False
        try:
            chosen = select_ranks_costed(options, [spectra[i] for i in movable], budget, fixed_ms,
                                         unit="ms of predicted latency", indices=movable)
        except RankSelectionError as err:
            if any(t["fastest"] for t in tried):
                break
            # The table may understate what the layers save inside the model: check the fastest choice
            # before giving up (also when a rescaled budget asks for more than the table allows).
            fastest = True
            chosen = select_ranks_costed(options, [spectra[i] for i in movable], err.min_flops, fixed_ms,
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


def _choose_ranks(plan: list[LayerPlan], samples, flops: dict[str, int], cfg: CompressConfig,
                  latency: LatencyCosts | None = None) -> None:
    free = [p for p in plan if p.candidate]
    fixed_flops = sum(flops.values()) - sum(p.flops_before for p in free)
    spectra, fixed = [], {}
    for i, p in enumerate(free):
        key = sample_key(p.layer.output, p.layer_id)
        fit, _ = _split(samples, key, cfg.holdout_every)
        p.rows = int(fit.sum())
        spectra.append(response_spectrum(samples.rows[key][fit]))
        if p.layer.name in cfg.ranks:
            r = cfg.ranks[p.layer.name]
            if r % cfg.rank_multiple:
                progress.log(f"warning: rank {r} for {p.layer.name!r} is not a multiple of --rank-multiple "
                             f"{cfg.rank_multiple}: onnxruntime may run it slower than the next multiple")
            fixed[i] = r
    total = sum(flops.values())
    if cfg.speedup is None:
        ranks = [fixed.get(i) for i in range(len(free))]
        ranks = [r if r is not None and p.shape.saves(r) else None for r, p in zip(ranks, free)]
    elif latency is None:
        budget = speedup_to_budget(total, cfg.speedup)
        ranks = select_ranks([p.shape for p in free], spectra, budget, fixed_flops, fixed, multiple=cfg.rank_multiple)
    else:
        ranks = _latency_ranks(free, spectra, fixed, latency, cfg)
    if latency is not None:
        for i, (p, r) in enumerate(zip(free, ranks)):
            e = latency.layers[p.layer.name]
            p.latency_before = float(e["original_ms"])
            p.latency_after = _fixed_latency(e, r) if i in fixed or r is None else \
                _layer_costs(p, e, cfg.rank_multiple).cost_at(r)
    for p, r, spec in zip(free, ranks, spectra):
        if r is None:
            p.status = "skipped"
            if p.layer.name in cfg.ranks:
                p.reason = (f"rank {cfg.ranks[p.layer.name]} is at or above break-even "
                            f"({p.shape.break_even_rank()}): no FLOP saving")
            elif not cfg.speedup:
                p.reason = "no rank given"
            elif p.shape.break_even_rank() < cfg.rank_multiple:
                p.reason = (f"break-even rank {p.shape.break_even_rank()} is below the rank multiple "
                            f"{cfg.rank_multiple}")
            elif latency is not None and not _layer_costs(p, latency.layers[p.layer.name], cfg.rank_multiple).ranks:
                p.reason = "no candidate rank is faster than the original on onnxruntime (measured)"
            else:
                p.reason = "kept at full rank by rank selection"
            continue
        p.rank, p.status, p.reason = int(r), "factorised", ""
        p.spectrum = spec
        p.energy_kept = _energy(spec, r)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.3g}%"


def _energy(spec: np.ndarray, r: int) -> float:
    return float(spec[:r].sum() / spec.sum()) if spec.sum() > 0 else 1.0


def _offer_pair(chosen: list[LayerPlan], cfg: CompressConfig) -> None:
    """--scheme auto: give each 3-D layer the channel pair at the highest rank that costs no more FLOPs."""
    pair = SCHEMES["channel"]
    shortcuts = {p.layer.shortcut for p in chosen if p.layer.shortcut}
    for p in chosen:
        # A layer that is another's shortcut would need its other rows at that layer's positions too: kept simple.
        if p.scheme is pair or p.scheme is DENSE or p.layer.output in shortcuts:
            continue
        shape, budget = pair.shape(p.layer), p.flops_after
        fits = [r for r in candidate_ranks(shape.break_even_rank(), cfg.rank_multiple)
                if shape.factorised_flops(r) <= budget]
        if fits:
            p.alt = (pair, fits[-1], pair.split(p.layer, fits[-1]), f"{p.layer.output}__lowrank_channel")


def _solve_all(model, value_types, source, chosen: list[LayerPlan], samples, batch: int, limit: int | None,
               positions: dict[int, int], cfg: CompressConfig) -> None:
    if not chosen:
        return
    # Schemes with stages before their channel step (3-D) are sampled at their core's output: in a model
    # where those layers are replaced by pre + core (same output names, hence the same positions).
    for p in chosen:
        p.split = p.scheme.split(p.layer, p.rank)
    split = {p.layer.name: p for p in chosen if p.split[0]}
    sampling = rewrite_convs(model, {n: [*p.split[0], p.split[1]] for n, p in split.items()}) if split else model
    # --scheme auto: the alternative's pre + core run beside the layer, to an extra tensor sampled with it.
    alts = {p.layer.name: p for p in chosen if p.alt}
    if alts:
        sampling = add_branches(sampling, [(p.layer.output, p.layer.input, [*p.alt[2][0], p.alt[2][1]], p.alt[3])
                                           for p in alts.values()])
    # The symmetric fit of a split layer (or of an alternative) regresses on its core's response to the
    # original inputs: sampled from the original model with each core beside its layer.
    cores = [(p, p.layer.output, p.split) for p in split.values()] + [(p, p.alt[3], p.alt[2]) for p in alts.values()]
    plain = None
    if cores and (not cfg.asymmetric or any(_too_few_rows(p, samples, cfg) for p, _, _ in cores)):
        beside = add_branches(model, [(p.layer.output, p.layer.input, [*pre, core], _plain(name))
                                      for p, name, (pre, core) in cores])
        with progress.bar("sampling split layers", source.total(limit), "img") as update:
            plain = collect(beside, value_types, source, [SampledTensor(_plain(name), p.layer_id)
                                                          for p, name, _ in cores],
                            batch, cfg.seed, positions, limit, update, cfg.threads)
    if cfg.asymmetric:
        _solve_asymmetric(sampling, value_types, source, chosen, samples, batch, limit, positions, cfg, plain)
        return
    with progress.bar("solve", len(chosen), "layer") as update:
        for p in chosen:
            _solve(p, samples, None, cfg, plain)
            update(1)


def _plain(name: str) -> str:
    return f"{name}__lowrank_plain"


def _too_few_rows(p: LayerPlan, samples, cfg: CompressConfig) -> bool:
    fit, _ = _split(samples, sample_key(p.layer.output, p.layer_id), cfg.holdout_every)
    return int(fit.sum()) < MIN_ROWS_PER_CHANNEL * p.layer.out_channels


def _solve(p: LayerPlan, original, approximated, cfg: CompressConfig, plain=None) -> None:
    """Solve one layer: ``original`` samples give targets, ``approximated`` (or None) the inputs.

    ``plain``: samples of split layers' cores on the original inputs (their symmetric inputs).
    """
    lay = p.layer
    y_key = sample_key(lay.output, p.layer_id)
    s_key = sample_key(lay.shortcut, p.layer_id) if lay.shortcut else None
    fit, held = _split(original, y_key, cfg.holdout_every)
    y = original.rows[y_key].astype(np.float64)
    s = original.rows[s_key].astype(np.float64) if s_key else None
    n_fit, d = int(fit.sum()), y.shape[1]
    if approximated is not None and n_fit < MIN_ROWS_PER_CHANNEL * d:
        p.note = (f"fitted symmetrically: {n_fit} samples < {MIN_ROWS_PER_CHANNEL} x {d} channels "
                  "(more images or --samples-per-image allow asymmetric)")
        progress.log(f"warning: {lay.name}: {p.note}")
        approximated = None
    yh = approximated.rows[y_key].astype(np.float64) if approximated is not None else None
    sh = approximated.rows[s_key].astype(np.float64) if s_key and approximated is not None else None
    plain_key = sample_key(_plain(lay.output), p.layer_id)
    if approximated is None and plain is not None and plain_key in plain.rows:
        yh, sh = plain.rows[plain_key].astype(np.float64), s  # symmetric: the core's response, original shortcut
    p.asymmetric = approximated is not None
    sol = p.scheme.solve(y, yh, p.rank, lay, fit, held, s=s, sh=sh, method=cfg.method, schedule=cfg.schedule)
    if p.alt:
        scheme, r_alt, split, core = p.alt
        rows = (approximated.rows[sample_key(core, p.layer_id)] if approximated is not None
                else plain.rows[sample_key(_plain(core), p.layer_id)]).astype(np.float64)
        alt = scheme.solve(y, rows, r_alt, lay, fit, held, s=s, sh=sh if approximated is not None else s,
                           method=cfg.method, schedule=cfg.schedule)
        note = (f"auto: {p.scheme.name} rank {p.rank} err {_pct(sol.rel_error)}, {scheme.name} rank {r_alt} "
                f"err {_pct(alt.rel_error)}")
        if alt.rel_error is not None and sol.rel_error is not None and alt.rel_error < sol.rel_error:
            p.scheme, p.rank, p.split, sol, yh = scheme, r_alt, split, alt, rows
            p.energy_kept = _energy(p.spectrum, r_alt)
        else:
            p.alt = None
        p.note = "; ".join(filter(None, [p.note, note]))
    p.method, p.rel_error, p.rel_error_linear = sol.method, sol.rel_error, sol.rel_error_linear
    p.factorisation = sol.factorisation
    # Balancing is exact (the function is unchanged); it only decides how INT8 will see the d' channels.
    p.balanced = balance(p.factorisation, y if yh is None else yh) if cfg.balance else None


def _solve_asymmetric(model, value_types, source, chosen: list[LayerPlan], samples, batch: int,
                      limit: int | None, positions: dict[int, int], cfg: CompressConfig, plain=None) -> None:
    """Solve layers in graph order, each on inputs from the partly approximated model."""
    producer = producers(model)
    stops: dict[int, list[SampledTensor]] = {}
    by_stop: dict[int, list[LayerPlan]] = {}
    for p in chosen:
        lay = p.layer
        stop = max(producer[lay.output], producer[p.alt[3]] if p.alt else -1,
                   producer.get(lay.shortcut, -1) if lay.shortcut else -1)
        stops.setdefault(stop, []).extend(_tensors(p) + ([SampledTensor(p.alt[3], p.layer_id)] if p.alt else []))
        by_stop.setdefault(stop, []).append(p)
    with Propagator(model, value_types, source, batch, cfg.seed, positions, limit,
                    cfg.cache_dir, cfg.threads) as prop, \
            progress.bar("asymmetric solve", len(stops), "segment") as update:
        for stop, approx in prop.run(stops, update):
            for i, p in enumerate(by_stop[stop]):
                _solve(p, samples, approx, cfg, plain)
                f = p.factorisation
                prop.transform(p.layer.output, lambda maps, p=p, f=f: p.scheme.propagate(f, maps),
                               source=p.alt[3] if p.alt else None, channels_last=is_dense(p.layer))
                # Two Convs feeding one Add are each other's shortcut: the second one must see the
                # first one's approximation, as the rewritten model will.
                for q in by_stop[stop][i + 1:]:
                    if q.layer.shortcut == p.layer.output:
                        key = sample_key(q.layer.shortcut, q.layer_id)
                        approx.rows[key] = f.predict(approx.rows[key].astype(np.float64)).astype(np.float32)


def _stages(p: LayerPlan) -> list[ConvStage]:
    stages = p.scheme.stages(p.layer, p.rank, p.factorisation, p.balanced, p.split)
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


def _report(plan: list[LayerPlan], flops: dict[str, int], cfg: CompressConfig, images: int, seconds: float,
            latency: LatencyCosts | None = None) -> dict:
    total_before = sum(flops.values())
    conv_before = sum(p.flops_before for p in plan if not is_dense(p.layer))
    saved = sum(p.flops_before - p.flops_after for p in plan)
    dense_before = sum(p.flops_before for p in plan if is_dense(p.layer))
    dense_after = sum(p.flops_after for p in plan if is_dense(p.layer))
    layers = []
    for p in plan:
        lay = p.layer
        layers.append({
            "name": lay.name,
            "op": lay.op if is_dense(lay) else "Conv",
            "in_channels": lay.in_channels,
            "out_channels": lay.out_channels,
            "kernel": list(lay.kernel),
            "output_size": list(lay.out_shape[2:]) if lay.out_shape else None,
            "group": lay.group,
            "activation": lay.activation,
            "activation_unknown": lay.activation_unknown,
            "target": lay.target_description,
            "status": p.status,
            "reason": p.reason,
            "rank": p.rank,
            "break_even_rank": p.shape.break_even_rank() if p.candidate else None,
            "flops_before": p.flops_before,
            "flops_after": p.flops_after,
            "latency_before_ms": p.latency_before,
            "latency_after_ms": p.latency_after,
            "energy_kept": p.energy_kept,
            "method": p.method,
            "scheme": p.scheme.name if p.rank is not None else None,
            "asymmetric": p.asymmetric,
            "note": p.note,
            "rows": p.rows,
            "rel_error_linear": p.rel_error_linear,
            "rel_error": p.rel_error,
        })
    after = total_before - saved
    conv_after = conv_before - saved + dense_before - dense_after
    table_ms = speedup = None
    if latency is not None:
        table_ms = latency.model_ms - sum(p.latency_before - p.latency_after for p in plan
                                          if p.latency_before is not None and p.rank is not None)
        # With a target the ranks were checked on the whole model: that measurement is the prediction.
        speedup = latency.chosen_check if cfg.speedup else latency.model_ms / table_ms
    return {
        "flops_before": total_before,
        "flops_after": after,
        "speedup_theoretical": total_before / after if after else math.inf,
        "conv_flops_before": conv_before,
        "conv_flops_after": conv_after,
        "conv_speedup_theoretical": conv_before / conv_after if conv_after else math.inf,
        # MatMul / Gemm layers with a constant weight (graph/dense.py)
        "dense_flops_before": dense_before,
        "dense_flops_after": dense_after,
        "target_speedup": cfg.speedup,
        "objective": cfg.objective,
        "rank_multiple": cfg.rank_multiple,
        "latency_original_ms": latency.model_ms if latency else None,
        "latency_table_ms": table_ms,
        "table_latency_speedup": latency.model_ms / table_ms if latency else None,
        "latency_predicted_ms": latency.model_ms / speedup if latency else None,
        "predicted_latency_speedup": speedup,
        "latency_checks": latency.checks if latency and cfg.speedup else None,
        "latency_table": latency.source if latency else None,
        "latency_environment": latency.environment if latency else None,
        "method": cfg.method,
        "scheme": cfg.scheme,
        "asymmetric": cfg.asymmetric,
        "balance": cfg.balance,
        "calibration_images": images,
        "held_back_images": _held_back(images, cfg.holdout_every),
        "samples_per_image": cfg.samples_per_image,
        "seed": cfg.seed,
        "seconds": round(seconds, 2),
        "layers": layers,
    }
