"""Options shared by several commands, and the parsing of option values into API arguments."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .config import DEFAULT_MAX_MEMORY
from .errors import LowRankError


def shapes_option(f):
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
                        help="Concrete shape for an input with symbolic dims, e.g. input:1x3x224x224 (repeatable).")(f)


def max_memory_option(f):
    return click.option("--max-memory", default=DEFAULT_MAX_MEMORY, show_default=True, metavar="SIZE",
                        help="Bound on the calibration samples kept in memory, all layers together, plus the largest "
                             "layer's solve (e.g. 512M, 8G): with more, every layer samples fewer positions per image "
                             "(the report gives the rows). The asymmetric pass keeps its cached feature maps within what "
                             "these leave of it (the rest goes to a temporary folder). The process needs this plus the "
                             "model and onnxruntime's own memory.")(f)


def image_options(f):
    opts = [
        click.option("--image-size", metavar="HxW", help="Image folders: model input size when the model's is symbolic."),
        click.option("--resize", type=int, metavar="PX", help="Image folders: resize the shorter side to PX, then centre-crop."),
        click.option("--scale", type=float, default=1 / 255, show_default="1/255", help="Image folders: pixel multiplier."),
        click.option("--mean", default="0", show_default=True, metavar="M[,M,M]", help="Image folders: subtracted after scaling."),
        click.option("--std", default="1", show_default=True, metavar="S[,S,S]", help="Image folders: divisor after the mean."),
        click.option("--bgr", is_flag=True, help="Image folders: feed channels in BGR order (default RGB)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False), default="NCHW",
                     show_default=True, help="Image folders: tensor layout of the model input."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def preprocess(image_size, resize, scale, mean, std, bgr, layout):
    from .calibration.inputs import ImagePreprocess

    def floats(s, what):
        try:
            return tuple(float(v) for v in s.split(","))
        except ValueError:
            raise LowRankError(f"--{what} takes numbers separated by commas, not {s!r}") from None

    size = None
    if image_size:
        try:
            h, w = (int(v) for v in image_size.lower().split("x"))
            size = (h, w)
        except ValueError:
            raise LowRankError(f"--image-size takes HxW, e.g. 224x224, not {image_size!r}") from None
    return ImagePreprocess(size=size, resize=resize, scale=scale, mean=floats(mean, "mean"), std=floats(std, "std"),
                           channel_order="BGR" if bgr else "RGB", layout=layout.upper())


def parse_schedule(spec: str) -> tuple:
    try:
        steps = tuple((int(k), float(lam)) for k, lam in (part.split(":") for part in spec.split(",") if part.strip()))
    except ValueError:
        raise LowRankError(f"--schedule takes ITERS:LAMBDA pairs separated by commas, e.g. 25:0.01,25:1, not {spec!r}") \
            from None
    if any(k < 0 or lam <= 0 for k, lam in steps):
        raise LowRankError("--schedule needs iterations >= 0 and lambda > 0")
    return steps


def parse_samples(spec: str) -> int | str:
    if spec.strip().lower() == "auto":
        return "auto"
    try:
        return int(spec)
    except ValueError:
        raise LowRankError(f"--samples-per-image takes a positive integer or 'auto', not {spec!r}") from None


def objective_options(f):
    from .calibration.damage import METRICS
    from .costs import COST_MODELS
    from .schemes import SCHEME_CHOICES
    from .solver.allocation import ALLOCATORS

    opts = [
        click.option("--objective", type=click.Choice(list(COST_MODELS)), default="latency", show_default=True,
                     help="; ".join(f"{name}: {m.help}" for name, m in COST_MODELS.items()) + "."),
        click.option("--rank-multiple", type=click.IntRange(min=1), default=16, show_default=True, metavar="N",
                     help="Ranks are multiples of N (onnxruntime's NCHWc block; 1 = any rank)."),
        click.option("--latency-table", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                     help="Latency objective: use this table of timings if it exists (same ranks, byte-identical "
                          "output), else write the timings used to it."),
        click.option("--scheme", type=click.Choice(list(SCHEME_CHOICES)), default="channel", show_default=True,
                     help="channel: k x k then 1 x 1; 3d: k x 1, 1 x k, 1 x 1 (TPAMI; 1-wide kernels keep the pair); "
                          "auto (--objective flops): 3d ranks, then per layer whichever fits better at equal FLOPs."),
        click.option("--allocation", type=click.Choice(list(ALLOCATORS)), default="energy", show_default=True,
                     help="How ranks are chosen within the budget: energy keeps the most response energy per layer; "
                          "sensitivity measures each layer's damage to the outputs at each rank on held-back images "
                          "(with the other layers approximated) and minimises the summed damage (a knapsack); "
                          "refined solves the energy choice, then exchanges rank steps between layers at the same "
                          "cost while the whole model's damage on held-back images, measured with the real fits, "
                          "falls."),
        click.option("--factorise-head", is_flag=True,
                     help="Let automatic ranks cut the model's output head too (the layer whose output reaches "
                          "the outputs only through bias, Softmax or reshapes). By default it is kept whole: "
                          "response energy does not see what its error does to the outputs (a classifier can "
                          "keep 97 % of its logits' energy and lose its top class). --ranks sets it by hand."),
        click.option("--damage-metric", type=click.Choice([*METRICS, "auto"]), default="auto", show_default=True,
                     help="Sensitivity allocation: output damage as NMSE or KL divergence (auto: KL for probability "
                          "outputs, else NMSE)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def parse_ranks(spec: str | None) -> dict[str, int]:
    if not spec:
        return {}
    p = Path(spec)
    if p.suffix == ".json" or p.is_file():
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise LowRankError(f"cannot read --ranks file {p}: {exc}") from None
        if not isinstance(data, dict):
            raise LowRankError(f"--ranks file {p} must hold a JSON object {{\"layer name\": rank}}")
        items = data.items()
    else:
        items = []
        for part in spec.split(","):
            if "=" not in part:
                raise LowRankError(f"bad --ranks entry {part!r}: write NAME=RANK,NAME=RANK or a JSON file")
            name, r = part.rsplit("=", 1)
            items.append((name.strip(), r.strip()))
    ranks = {}
    for name, r in items:
        if isinstance(r, str) and r.strip().lstrip("+").isdigit():
            r = int(r)
        if not isinstance(r, int) or isinstance(r, bool):
            raise LowRankError(f"rank for {name!r} must be a positive integer, not {r!r}")
        ranks[name] = r
    return ranks


def executor_options(f):
    opts = [
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Where independent work runs: local worker processes, or Ray tasks (pip install "
                          "'onnx-lowrank[ray]'; the cluster of RAY_ADDRESS, else a local one)."),
        click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Worker processes at a time [default: calibrate / compress: one per shard, at most the "
                          "cores; sweep: 1, in this process]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def samples_files(samples, extra) -> list[Path] | None:
    """--samples FILE plus the further files a shell glob (--samples part*.npz) leaves as arguments."""
    if extra and not samples:
        raise LowRankError(f"unexpected argument(s) {' '.join(map(str, extra))}: compress takes one MODEL")
    return [samples, *extra] if samples else None
