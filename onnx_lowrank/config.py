"""Every knob of a compression (:class:`CompressConfig`) and its validation.

The choices of ``--objective`` and ``--scheme`` are the keys of their registries (costs/ and
schemes/), so adding a cost model or a scheme adds its option value here without an edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .calibration.damage import METRICS
from .calibration.inputs import ImagePreprocess
from .costs import COST_MODELS
from .errors import LowRankError
from .schemes import SCHEME_CHOICES
from .solver.allocation import ALLOCATORS
from .solver.candidates import FITS

METHODS = ("linear", "nonlinear")
#: Default bound on the calibration samples kept in memory, all layers together (bytes or "512M", "4G").
#: A fixed default, not a share of the free memory: the rows sampled, hence the output file, must not
#: depend on what else the machine is doing (and shards on different machines must agree).
DEFAULT_MAX_MEMORY = "2G"
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
DEFAULT_SCHEDULE = ((25, 0.01), (25, 1.0))


@dataclass
class CompressConfig:
    """Every knob of :func:`~onnx_lowrank.api.compress`; the CLI options map one to one onto these fields."""

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
    #: What --speedup counts: a key of costs.COST_MODELS ("latency": measured on onnxruntime; "flops": FLOPs).
    objective: str = "latency"
    #: Chosen ranks are multiples of this (onnxruntime's NCHWc block); 1 = any rank.
    rank_multiple: int = 16
    #: A latency table file: used if it exists (every timing must be in it), else written.
    latency_table: str | None = None
    #: Where measured layer timings are cached (default: $ONNX_LOWRANK_CACHE or ~/.cache/onnx-lowrank).
    latency_cache: str | None = None
    #: Seconds of timing per layer (all its candidate ranks together).
    latency_seconds: float = 1.0
    #: Let the automatic rank choice factorise the model's output head (graph/heads.py); by default it is
    #: kept whole, because response energy does not see what its error does to the outputs.
    factorise_head: bool = False
    #: A key of schemes.SCHEME_CHOICES: "channel" (k x k then 1 x 1), "3d" (k x 1, 1 x k, 1 x 1; layers it
    #: cannot split keep the channel pair) or "auto" (3-D ranks, then per layer whichever of 3-D and the
    #: pair at equal FLOPs fits the held-back images better).
    scheme: str = "channel"
    #: Bound on the calibration samples kept (all layers): with more, every layer's positions per image are
    #: scaled down together, and the report says so (bytes, or a size such as "512M", "4G").
    max_memory: int | str = DEFAULT_MAX_MEMORY
    #: How ranks are chosen within the budget (solver/allocation.py ALLOCATORS): "energy" keeps the most
    #: response energy (method.md section 5); "sensitivity" least summed measured damage to the outputs.
    allocation: str = "energy"
    #: The damage measure of "sensitivity" (calibration/damage.py METRICS): "nmse", "kl" or "auto" (KL for
    #: probability outputs, else NMSE).
    damage_metric: str = "auto"
    #: How each candidate rank is fitted to measure its damage: "linear" (PCA) or "nonlinear" (the real fit).
    damage_fit: str = "linear"
    #: Held-back images the damage is measured on (at most).
    damage_images: int = 64
    #: Sensitivity passes: the first measures each layer with the others at the energy allocation's ranks,
    #: each further pass with the others at the previous pass's choice (0: each layer alone, unchanged others).
    damage_passes: int = 1
    #: A layer whose nonlinear or asymmetric fit is worse on the held-back images than the linear (or the
    #: symmetric linear) fit keeps the better one, and its note says so.
    safety_net: bool = True
    #: ``--allocation refined``: rounds of exchanges at most (each keeps the best measured move that lowers the
    #: damage), and proposals measured end to end per round.
    exchange_rounds: int = 4
    exchange_tries: int = 4
    #: ... the solver schedule of the fits that only rank the moves (each layer's step up and down); None: the
    #: real schedule. Moves are always measured with real fits.
    exchange_schedule: tuple | None = None
    #: ... once moves were taken, solve every layer again at the refined ranks (one more asymmetric pass) and
    #: keep that model if its held-back damage is lower.
    exchange_resolve: bool = True


def parse_size(value) -> int:
    """Bytes from an int or a size such as "512M" / "4G" / "1.5G" (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
    elif isinstance(value, str):
        text = value.strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in _UNITS and text[-1:] else ""
        try:
            n = float(text[:-1] if unit else text)
        except ValueError:
            n = -1
        if n > 0:
            return int(n * _UNITS[unit])
    raise LowRankError(f"--max-memory takes a size such as 512M or 4G (bytes if no unit), not {value!r}")


def with_overrides(config: CompressConfig | None, overrides: dict) -> CompressConfig:
    """A checked copy of ``config`` (or the defaults) with some fields set."""
    cfg = replace(config) if config else CompressConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown option {k!r}")
        setattr(cfg, k, v)
    check_config(cfg)
    return cfg


def _one_of(option: str, value, choices) -> None:
    if value not in choices:
        raise LowRankError(f"--{option} must be one of {', '.join(choices)}, not {value!r}")


def check_config(cfg: CompressConfig) -> None:
    _one_of("method", cfg.method, METHODS)
    if cfg.speedup is not None and not (isinstance(cfg.speedup, (int, float)) and cfg.speedup > 1.0):
        raise LowRankError(f"--speedup must be a number greater than 1 (got {cfg.speedup}); "
                           "2 means twice as fast, or half the FLOPs with --objective flops")
    k = cfg.samples_per_image
    if k != "auto" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise LowRankError(f"--samples-per-image must be 'auto' or an integer of at least 1, not {k!r}")
    _one_of("scheme", cfg.scheme, SCHEME_CHOICES)
    choice = SCHEME_CHOICES[cfg.scheme]
    if choice.objective is not None and cfg.objective != choice.objective:
        raise LowRankError(f"--scheme {cfg.scheme} needs --objective {choice.objective} ({choice.why_objective})")
    _one_of("objective", cfg.objective, COST_MODELS)
    _one_of("allocation", cfg.allocation, ALLOCATORS)
    _one_of("damage-metric", cfg.damage_metric, (*METRICS, "auto"))
    _one_of("damage-fit", cfg.damage_fit, FITS)
    for name in ("exchange_rounds", "exchange_tries"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LowRankError(f"{name} must be a positive integer, not {v!r}")
    for name in ("damage_images", "damage_passes"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "damage_images" else 0):
            raise LowRankError(f"{name} must be an integer of at least {1 if name == 'damage_images' else 0}, "
                               f"not {v!r}")
    if isinstance(cfg.rank_multiple, bool) or not isinstance(cfg.rank_multiple, int) or cfg.rank_multiple < 1:
        raise LowRankError(f"--rank-multiple must be a positive integer, not {cfg.rank_multiple!r}")
    if not (isinstance(cfg.latency_seconds, (int, float)) and cfg.latency_seconds > 0):
        raise LowRankError(f"latency_seconds must be positive, not {cfg.latency_seconds!r}")
    if cfg.max_images is not None and cfg.max_images < 1:
        raise LowRankError("--max-images must be at least 1")
    if cfg.batch_size < 1:
        raise LowRankError("--batch-size must be at least 1")
    parse_size(cfg.max_memory)
    if cfg.seed < 0:
        raise LowRankError(f"--seed must be 0 or more, not {cfg.seed}")
    for name, r in cfg.ranks.items():
        if not isinstance(r, int) or r < 1:
            raise LowRankError(f"rank for {name!r} must be a positive integer, not {r!r}")
