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


class Zoom(Augmentation):
    """Enlarge a random window of 80 to 100 % of each side back to full size (bilinear): a new framing
    of the same photograph, with no padded border (the edge padding of ``crop`` is not what a camera gives)."""

    name = "zoom"

    def __call__(self, x, axes, rng):
        h, w = x.shape[axes[0]], x.shape[axes[1]]
        out = np.empty_like(x)
        for i in range(len(x)):
            img = np.moveaxis(x[i], (axes[0] - 1, axes[1] - 1), (0, 1))
            s = rng.uniform(0.8, 1.0)
            ys = _grid(h, s, rng.random())
            xs = _grid(w, s, rng.random())
            rows = _lerp(img, ys, 0)
            out[i] = np.moveaxis(_lerp(rows, xs, 1), (0, 1), (axes[0] - 1, axes[1] - 1))
        return out


def _grid(n: int, scale: float, where: float) -> np.ndarray:
    """Sample positions of ``n`` pixels over a window of ``scale * n`` starting at ``where`` of the slack."""
    size = scale * n
    start = where * (n - size)
    return np.clip(start + (np.arange(n) + 0.5) * scale - 0.5, 0, n - 1)


def _lerp(a: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, a.shape[axis] - 1)
    t = (pos - lo).astype(a.dtype).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
    return (np.take(a, lo, axis=axis) * (1 - t) + np.take(a, hi, axis=axis) * t).astype(a.dtype)


class Noise(Augmentation):
    """Gaussian noise of 2 % of the batch's standard deviation."""

    name = "noise"

    def __call__(self, x, axes, rng):
        scale = 0.02 * float(x.std()) or 0.0
        return (x + rng.standard_normal(x.shape).astype(x.dtype) * scale).astype(x.dtype)


class Mixup(Augmentation):
    """Blend each image with another of the batch, weight drawn uniformly in [0, 1]: images the
    factorisation was not fitted to (the solver saw every fit image), still made of real content.
    The teacher labels the blend, so no labels are needed."""

    name = "mixup"

    def __call__(self, x, axes, rng):
        if len(x) < 2:
            return x
        other = x[rng.permutation(len(x))]
        lam = rng.random(len(x)).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return (lam * x + (1 - lam) * other).astype(x.dtype)


class Cutmix(Augmentation):
    """Paste a random box (up to half of each side) of another image of the batch into each image."""

    name = "cutmix"

    def __call__(self, x, axes, rng):
        if len(x) < 2:
            return x
        h, w = x.shape[axes[0]], x.shape[axes[1]]
        other = rng.permutation(len(x))
        out = x.copy()
        for i in range(len(x)):
            bh, bw = rng.integers(1, h // 2 + 1), rng.integers(1, w // 2 + 1)
            y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            idx = [slice(None)] * (x.ndim - 1)
            idx[axes[0] - 1], idx[axes[1] - 1] = slice(y0, y0 + bh), slice(x0, x0 + bw)
            out[i][tuple(idx)] = x[other[i]][tuple(idx)]
        return out


REGISTRY = {a.name: a for a in (Flip(), Shift(), Zoom(), Noise(), Mixup(), Cutmix())}
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
