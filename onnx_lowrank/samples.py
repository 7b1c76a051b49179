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
from .errors import LowRankError
from .graph.dense import is_dense

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


def tensors(p) -> list[SampledTensor]:
    """What a layer needs sampled: its output, and the shortcut added to it (shaped like it)."""
    last = is_dense(p.layer)
    out = [SampledTensor(p.layer.output, p.layer_id, channels_last=last)]
    if p.layer.shortcut:
        out.append(SampledTensor(p.layer.shortcut, p.layer_id, like=p.layer.output, channels_last=last))
    return out


def collect_original(model, value_types, source: FeedSource, plan, batch: int, limit: int | None,
                     positions: dict[int, int], cfg):
    wanted = [t for p in plan for t in tensors(p)]
    with progress.bar("calibration", source.total(limit), "img") as update:
        return collect(model, value_types, source, wanted, batch, cfg.seed, positions, limit, update, cfg.threads)


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
