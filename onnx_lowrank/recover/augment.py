"""Augmentations for image inputs, so a short distillation on a hundred images does not learn them by
heart. The teacher is run on the augmented batch, so any change of the input is a fair target; these
only keep it near the images the model sees. NumPy only, driven by the recovery's seeded generator."""

from __future__ import annotations

import numpy as np


class Augmentation:
    name = ""

    def __call__(self, x: np.ndarray, axes: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class Flip(Augmentation):
    """Mirror half of the images left to right."""

    name = "flip"

    def __call__(self, x, axes, rng):
        pick = rng.random(len(x)) < 0.5
        out = x.copy()
        out[pick] = np.flip(x[pick], axis=axes[1])
        return out


class Shift(Augmentation):
    """Crop a window shifted by up to 1/16 of each side from the edge-padded image (same size out)."""

    name = "crop"

    def __call__(self, x, axes, rng):
        h, w = x.shape[axes[0]], x.shape[axes[1]]
        ph, pw = max(1, h // 16), max(1, w // 16)
        pad = [(0, 0)] * x.ndim
        pad[axes[0]], pad[axes[1]] = (ph, ph), (pw, pw)
        padded = np.pad(x, pad, mode="edge")
        out = np.empty_like(x)
        for i in range(len(x)):
            dy, dx = rng.integers(0, 2 * ph + 1), rng.integers(0, 2 * pw + 1)
            idx = [slice(None)] * (x.ndim - 1)
            idx[axes[0] - 1], idx[axes[1] - 1] = slice(dy, dy + h), slice(dx, dx + w)
            out[i] = padded[i][tuple(idx)]
        return out


class Noise(Augmentation):
    """Gaussian noise of 2 % of the batch's standard deviation."""

    name = "noise"

    def __call__(self, x, axes, rng):
        scale = 0.02 * float(x.std()) or 0.0
        return (x + rng.standard_normal(x.shape).astype(x.dtype) * scale).astype(x.dtype)


REGISTRY = {a.name: a for a in (Flip(), Shift(), Noise())}
AUTO = ("crop", "noise")


def image_axes(x: np.ndarray) -> tuple[int, int] | None:
    """Spatial axes (H, W) of a float image batch (NCHW or NHWC with 1, 3 or 4 channels), else None."""
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating) or min(x.shape[1:]) < 1:
        return None
    if x.shape[1] in (1, 3, 4) and min(x.shape[2:]) >= 8:
        return 2, 3
    if x.shape[3] in (1, 3, 4) and min(x.shape[1:3]) >= 8:
        return 1, 2
    return None


def resolve(spec: str | None, arrays: dict[str, np.ndarray]) -> list[str]:
    """The augmentation names to use: ``"auto"`` is crop and noise when every input is an image batch.
    Flips are not in ``auto``: they cost accuracy on digits (benchmarks/RESULTS.md "Recovery"), and
    mirrored text or digits are not what such models see."""
    from ..errors import LowRankError

    if spec in (None, "", "none"):
        return []
    if spec == "auto":
        return list(AUTO) if all(image_axes(a) is not None for a in arrays.values()) else []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in REGISTRY]
    if bad:
        raise LowRankError(f"--augment takes auto, none or names from {', '.join(REGISTRY)}, not {', '.join(bad)}")
    if names and not all(image_axes(a) is not None for a in arrays.values()):
        raise LowRankError("--augment needs image inputs (4-D float batches, NCHW or NHWC): use --augment none")
    return names


def apply(names: list[str], feed: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for k, x in feed.items():
        for n in names:
            x = REGISTRY[n](x, image_axes(x), rng)
        out[k] = x
    return out
