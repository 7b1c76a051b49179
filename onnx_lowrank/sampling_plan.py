"""Which rows each layer is fitted on: positions sampled per image, and the images held back.

The original model's responses are sampled once (:func:`collect_original`); every layer's rows
are split into fitted and held-back images by :func:`split`, so the report's errors are measured
on images the layer was not fitted to.
"""

from __future__ import annotations

import numpy as np

from . import progress
from .calibration.inputs import FeedSource
from .calibration.sampling import SampledTensor, collect, sample_key
from .config import parse_size
from .errors import LowRankError
from .graph.dense import is_dense
from .solver.layer import solve_memory

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


def check_enough(images: int | None) -> None:
    if images is not None and images < MIN_CALIBRATION_IMAGES:
        raise LowRankError(f"only {images} calibration image(s): give at least {MIN_CALIBRATION_IMAGES} "
                           "(a few hundred is typical) so that some are held back to measure the error")


def fit_images(total: int, holdout_every: int) -> int:
    """Images whose rows are fitted (the others are held back for the report, see :func:`split`)."""
    if total < holdout_every or holdout_every < 2:
        return total
    return total - total // holdout_every


def positions_per_image(plan, total_images: int | None, cfg) -> dict[int, int]:
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


def sample_bytes(plan, positions: dict[int, int], images: int) -> int:
    """Memory the original model's samples take: float32 rows of d channels, the shortcut's too."""
    return sum(4 * positions[p.layer_id] * images * p.layer.out_channels * len(tensors(p)) for p in plan)


def fitted_symmetrically(p, fitted: int, cfg) -> bool:
    """Whether the asymmetric pass will fit the layer on its original inputs (too few rows per channel, or
    ``--no-asymmetric``) and hand the solver no approximated rows: layers that cannot be split into stages
    (dense, 1 x 1; others are fitted on their core's response, an array like the approximated one)."""
    unsplit = is_dense(p.layer) or tuple(p.layer.kernel) == (1, 1)
    return unsplit and (not cfg.asymmetric or fitted < MIN_ROWS_PER_CHANNEL * p.layer.out_channels)


def layer_solve_bytes(p, rows: int, fitted: int, cfg) -> int:
    """Memory one layer's solve takes beyond the samples: :func:`~.solver.layer.solve_memory` (by its activation
    kind, the method and whether it is fitted on approximated inputs) for its ``fitted`` rows, and the float32
    rows of the asymmetric pass's approximated samples of two layers like it (those solved at one stop: a
    block's two Convs feeding one Add), of each of its sampled tensors."""
    d = p.layer.out_channels
    asym = not fitted_symmetrically(p, fitted, cfg)
    return solve_memory(p.layer.activation, d, fitted, rows - fitted, asym, cfg.method, p.layer.response_rank) + \
        2 * 4 * rows * d * len(tensors(p))


def largest_solve(plan, rows_of, cfg) -> int:
    """The largest :func:`layer_solve_bytes` of the ``plan``; ``rows_of(p)``: the layer's (sampled, fitted) rows.
    What --max-memory reserves beside the samples, both when it bounds them (:func:`memory_need`) and when the
    asymmetric pass sizes its cache of feature maps (solve.cache_budget)."""
    return max((layer_solve_bytes(p, *rows_of(p), cfg) for p in plan), default=0)


def _planned_rows(positions: dict[int, int], images: int, cfg):
    fit = fit_images(images, cfg.holdout_every)
    return lambda p: (positions[p.layer_id] * images, positions[p.layer_id] * fit)


def memory_need(plan, positions: dict[int, int], images: int, cfg) -> int:
    """What --max-memory bounds: the samples, plus the largest layer's solve (:func:`largest_solve`)."""
    return sample_bytes(plan, positions, images) + largest_solve(plan, _planned_rows(positions, images, cfg), cfg)


def _cap_wide_layers(plan, positions: dict[int, int], images: int, max_bytes: int, cfg) -> dict:
    """Layers whose own solve would take more than half of ``max_bytes`` (a very wide layer, e.g. a
    6,625-class classifier) are capped alone first, so that one such layer does not scale every other
    layer's rows down with it."""
    out = dict(positions)
    fit, half = fit_images(images, cfg.holdout_every), max_bytes // 2
    for p in plan:
        k = out[p.layer_id]
        # one position per image more or less can switch an asymmetric fit to a symmetric one: search down
        while k > 1 and layer_solve_bytes(p, k * images, k * fit, cfg) > half:
            k -= 1
        if k == out[p.layer_id] and layer_solve_bytes(p, k * images, k * fit, cfg) <= half:
            continue
        fixed = layer_solve_bytes(p, 0, 0, cfg)              # its (d, d) matrices
        progress.log(f"note: {p.layer.name}: {out[p.layer_id]} -> {k} positions per image, so that its "
                     f"solve fits half of --max-memory ({fixed / 2 ** 20:.0f}M of it for (d, d) matrices)")
        out[p.layer_id] = k
    return out


def within_memory(plan, positions: dict[int, int], images: int | None, max_bytes: int, cfg) -> dict[int, int]:
    """``positions`` scaled down together (keeping each layer's share) until the samples and the largest
    layer's solve (:func:`memory_need`) fit ``max_bytes``.

    Unknown image counts (a stream that is not counted) cannot be bounded in advance: returned as they are.
    """
    def need(pos):
        return memory_need(plan, pos, images, cfg)

    if not images or need(positions) <= max_bytes:
        return positions
    positions = _cap_wide_layers(plan, positions, images, max_bytes, cfg)
    needed = need(positions)
    if needed <= max_bytes:
        return positions
    scale = max_bytes / needed
    out = {i: max(1, int(k * scale)) for i, k in positions.items()}
    needed = need(out)
    while needed > max_bytes and any(k > 1 for k in out.values()):
        out = {i: max(1, k - 1) for i, k in out.items()}
        needed = need(out)
    if needed > max_bytes:
        raise LowRankError(f"--max-memory {max_bytes / 2 ** 20:.0f}M cannot hold one sampled position per image of "
                           f"{images} images ({needed / 2 ** 20:.0f}M with the largest layer's solve): raise "
                           "--max-memory or lower --max-images")
    progress.log(f"note: calibration samples limited to --max-memory {max_bytes / 2 ** 20:.0f}M (samples and the "
                 f"largest layer's solve): positions per image scaled by {scale:.2f} (the report gives the rows per "
                 "layer)")
    return out


def tensors(p) -> list[SampledTensor]:
    """What a layer needs sampled: its output, and the shortcut added to it (shaped like it)."""
    last = is_dense(p.layer)
    out = [SampledTensor(p.layer.output, p.layer_id, channels_last=last)]
    if p.layer.shortcut:
        out.append(SampledTensor(p.layer.shortcut, p.layer_id, like=p.layer.output, channels_last=last))
    return out


def collect_original(model, value_types, source: FeedSource, plan, batch: int, limit: int | None,
                     positions: dict[int, int], cfg, first: int = 0):
    """The original model's responses at ``limit`` images from global index ``first`` on (a shard), with a
    digest of each image's inputs (calibration/checks.py)."""
    wanted = [t for p in plan for t in tensors(p)]
    known = source.known_total()
    count = limit if known is None else max(0, min(known - first, limit if limit is not None else known))
    with progress.bar("calibration", count, "img") as update:
        return collect(model, value_types, source, wanted, batch, cfg.seed, positions, limit, update, cfg.threads,
                       first=first, inspect=True, images=count)


def sampling_settings(cfg, batch: int) -> dict:
    """The settings that decide which rows calibration samples (a samples file must agree on all of them)."""
    return {"seed": cfg.seed, "samples_per_image": cfg.samples_per_image, "max_images": cfg.max_images,
            "batch_size": batch, "holdout_every": cfg.holdout_every, "max_memory": parse_size(cfg.max_memory), "input_shapes": cfg.input_shapes,
            "preprocess": cfg.preprocess}


def split(samples, key: str, holdout_every: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (fit, held back): every ``holdout_every``-th image is held back for the report.

    Too few images (or ``holdout_every`` < 2) hold nothing back: all are fitted and no error is reported.
    """
    img = samples.image[key]
    if held_back(samples.images, holdout_every) == 0:
        mask = np.zeros(len(img), dtype=bool)
        return ~mask, mask
    held = img % holdout_every == holdout_every - 1
    return ~held, held


def held_back(images: int, holdout_every: int) -> int:
    return images // holdout_every if holdout_every >= 2 else 0


def fitted_rows(p, samples, holdout_every: int) -> int:
    fit, _ = split(samples, sample_key(p.layer.output, p.layer_id), holdout_every)
    return int(fit.sum())
