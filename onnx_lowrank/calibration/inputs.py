"""Where calibration and evaluation inputs come from.

Every source becomes a :class:`FeedSource`: something that yields feed dicts (model input name
to a batch array) as many times as asked, so the several passes over the calibration set see the
same images in the same order. Accepted: ``.npz`` (keys are input names, first axis is the
sample), ``.npy`` (single-input models), a folder of images with preprocessing, and (see
:mod:`.streams`, read batch by batch, never listed) any iterable of feed dicts, onnxruntime's
``CalibrationDataReader`` and functions returning either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import LowRankError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class InputSpec:
    """A model input as onnxruntime reports it: name, numpy dtype, shape with None for symbolic dims."""

    name: str
    dtype: np.dtype
    shape: tuple


@dataclass
class ImagePreprocess:
    """How a folder of images becomes input tensors (the usual torchvision / Keras recipes)."""

    size: tuple[int, int] | None = None   # (H, W) of the model input; None: taken from the model
    resize: int | None = None             # shorter side resized to this before the centre crop
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channel_order: str = "RGB"            # or "BGR"
    layout: str = "NCHW"                  # or "NHWC"


class FeedSource:
    """Re-iterable batches of feed dicts, cut or re-batched to a requested batch size.

    ``make_iter(start)`` opens one pass over the data; a ``seekable`` source begins it at sample
    ``start`` itself (arrays, image folders), any other is read from its beginning and the first
    ``start`` samples are dropped as they come. ``count`` is the number of samples when the source
    knows it; else :meth:`total` counts them once in a pass that keeps nothing.
    """

    def __init__(self, make_iter: Callable[..., Iterator[dict]], description: str, count: int | None = None,
                 seekable: bool = False, in_memory: bool = False):
        self._make_iter = make_iter
        self.description = description
        self.count = count
        self.seekable = seekable
        self.in_memory = in_memory  # arrays already in memory: a pass over them costs nothing

    def _feeds(self, start: int) -> Iterator[dict]:
        if self.seekable:
            yield from self._make_iter(start)
            return
        skipped = 0
        for feed in self._make_iter():
            n = _batch_len(feed)
            if skipped + n <= start:
                skipped += n
                continue
            if skipped < start:
                feed = {k: v[start - skipped:] for k, v in feed.items()}
                skipped = start
            yield feed

    def batches(self, batch_size: int, limit: int | None = None, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of ``batch_size`` samples (the last may be smaller), at most ``limit`` samples counted
        from sample ``start``. Only the feeds of the batch being built are held: nothing is listed."""
        pending: list[dict] = []
        held = 0
        seen = 0
        for feed in self._feeds(start):
            n = _batch_len(feed)
            if limit is not None and seen + n > limit:
                feed = {k: v[: limit - seen] for k, v in feed.items()}
                n = limit - seen
            if n <= 0:
                break
            seen += n
            pending.append(feed)
            held += n
            del feed
            while held >= batch_size:
                merged = _concat(pending)
                pending = []
                yield {k: v[:batch_size] for k, v in merged.items()}
                held -= batch_size
                if held:
                    pending = [{k: v[batch_size:] for k, v in merged.items()}]
                del merged
            if limit is not None and seen >= limit:
                break
        if held:
            yield _concat(pending)

    def known_total(self, limit: int | None = None) -> int | None:
        """The sample count if known without reading the data (for progress bars), else None."""
        if self.count is None:
            return None
        return min(self.count, limit) if limit is not None else self.count

    def total(self, limit: int | None = None) -> int:
        """The sample count; a source that does not know it is read once to count (nothing is kept)."""
        if self.count is None:
            from .. import progress

            progress.status(f"counting the samples of the {self.description} (one pass that keeps nothing)")
            self.count = sum(_batch_len(f) for f in self._feeds(0))
        return self.known_total(limit)


def _batch_len(feed: dict) -> int:
    lens = {len(v) for v in feed.values()}
    if len(lens) != 1:
        raise LowRankError(f"calibration feed has inputs with different sample counts {sorted(lens)}: "
                           "every input needs the same first axis")
    return lens.pop()


def _concat(feeds: list[dict]) -> dict:
    if len(feeds) == 1:
        return feeds[0]
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def open_source(data, inputs: list[InputSpec], preprocess: ImagePreprocess | None = None,
                role: str = "calibration") -> FeedSource:
    """Turn a path or Python object into a FeedSource checked against the model's inputs.

    ``role`` ("calibration" or "evaluation") only names the data in messages. Arrays named after
    no model input (labels, ids) are ignored with one note; a model input without data is an error.
    """
    if isinstance(data, FeedSource):
        return data
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise LowRankError(f"{role} data not found: {path} (give a .npz, a .npy or a folder of images)")
        if path.is_dir():
            return _image_folder(path, inputs, preprocess or ImagePreprocess())
        if path.suffix == ".npz":
            return _arrays_source(load_npz(path), inputs, str(path), role)
        if path.suffix == ".npy":
            if len(inputs) != 1:
                raise LowRankError(f"{path} is a .npy but the model has {len(inputs)} inputs: use a .npz whose keys "
                                   f"are the input names ({', '.join(i.name for i in inputs)})")
            return _arrays_source({inputs[0].name: _load_npy(path)}, inputs, str(path), role)
        raise LowRankError(f"unsupported {role} data {path}: give a .npz, a .npy or a folder of images")
    if isinstance(data, dict):
        return _arrays_source(data, inputs, "arrays", role)
    from .streams import stream_source  # readers, factories and iterables: read batch by batch

    return stream_source(data, inputs, role)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise LowRankError(f"cannot read {path} as .npz ({type(exc).__name__}: {exc})") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise LowRankError(f"cannot read {path} as .npy ({type(exc).__name__}: {exc})") from None


def _arrays_source(arrays: dict, inputs: list[InputSpec], desc: str, role: str) -> FeedSource:
    feed = _check_feed({k: np.asarray(v) for k, v in arrays.items()}, inputs, desc, role)
    _note_ignored(feed, inputs, desc, role)
    feed = {i.name: feed[i.name] for i in inputs}
    n = _batch_len(feed)
    if n == 0:
        raise LowRankError(f"the {desc} {role} data holds no samples (first axis has length 0)")
    return FeedSource(lambda start: iter([{k: v[start:] for k, v in feed.items()}]), desc, n, seekable=True,
                      in_memory=True)


def _note_ignored(feed: dict, inputs: list[InputSpec], desc: str, role: str) -> None:
    from .. import progress

    extra = sorted(set(feed) - {i.name for i in inputs})
    if extra:
        progress.log(f"note: {role} data {desc}: ignoring {', '.join(map(repr, extra))} "
                     "(not a model input)")


def _check_feed(feed: dict, inputs: list[InputSpec], desc: str, role: str = "calibration") -> dict:
    """The feed with each model input checked (and floats cast); arrays for no input are kept, unchecked."""
    names = {i.name for i in inputs}
    missing = names - set(feed)
    if missing:
        raise LowRankError(f"{role} data {desc} has no array for model input(s) {sorted(missing)} "
                           f"(it has {sorted(feed)}): name the arrays after the model inputs")
    out = dict(feed)
    for spec in inputs:
        a = feed[spec.name]
        if a.ndim != len(spec.shape):
            raise LowRankError(f"{role} input {spec.name!r} has shape {list(a.shape)} but the model expects "
                               f"{len(spec.shape)} dims {_fmt_shape(spec.shape)} (first axis = samples)")
        for axis, (got, want) in enumerate(zip(a.shape, spec.shape)):
            if axis > 0 and isinstance(want, int) and want > 0 and got != want:
                raise LowRankError(f"{role} input {spec.name!r} has shape {list(a.shape)} but the model expects "
                                   f"{_fmt_shape(spec.shape)}")
        if a.dtype != spec.dtype:
            if np.issubdtype(spec.dtype, np.floating) and np.issubdtype(a.dtype, np.integer):
                # Raw pixels fed to a float model: unscaled, they compress and evaluate a model
                # that sees inputs 255 times too large, and nothing fails.
                raise LowRankError(f"{role} input {spec.name!r} in {desc} is {a.dtype} but the model expects "
                                   f"{spec.dtype}: convert it to float with the model's preprocessing first "
                                   "(e.g. x.astype('float32') / 255), or pass a folder of images with "
                                   "--scale/--mean/--std")
            if np.issubdtype(spec.dtype, np.floating) and np.issubdtype(a.dtype, np.floating):
                a = a.astype(spec.dtype)
            else:
                raise LowRankError(f"{role} input {spec.name!r} is {a.dtype}, the model expects {spec.dtype}")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise LowRankError(f"{role} input {spec.name!r} in {desc} contains NaN or infinite values")
        out[spec.name] = a
    return out


def _fmt_shape(shape) -> str:
    return "x".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in shape)


def _image_folder(path: Path, inputs: list[InputSpec], pp: ImagePreprocess) -> FeedSource:
    if len(inputs) != 1:
        raise LowRankError(f"a folder of images needs a single-input model; this one has {len(inputs)} inputs")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LowRankError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
    spec = inputs[0]
    if len(spec.shape) != 4:
        raise LowRankError(f"a folder of images needs a 4-D model input; {spec.name!r} has {len(spec.shape)} dims")
    layout = pp.layout.upper()
    if layout not in ("NCHW", "NHWC"):
        raise LowRankError(f"layout must be NCHW or NHWC, not {pp.layout!r}")
    hw = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    channels = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    size = pp.size or hw
    if not all(isinstance(v, int) and v > 0 for v in size):
        raise LowRankError("the model's image size is symbolic: give --image-size HxW")
    if channels not in (1, 3):
        raise LowRankError(f"model input {spec.name!r} has {channels} channels; images need 1 or 3")
    for what, values in (("mean", pp.mean), ("std", pp.std)):
        if len(values) not in (1, channels):
            raise LowRankError(f"--{what} has {len(values)} values; the model's images have {channels} channels: "
                               f"give 1 or {channels}")
    if any(v == 0 for v in pp.std):
        raise LowRankError("--std values must not be 0")
    if not np.issubdtype(spec.dtype, np.floating):
        raise LowRankError(f"model input {spec.name!r} is {spec.dtype}: image folders feed float inputs only; "
                           "give a .npz instead")

    def load(p: Path) -> np.ndarray:
        from PIL import Image  # only needed for image folders

        try:
            img = Image.open(p)
            img = img.convert("L" if channels == 1 else "RGB")
        except Exception as exc:
            raise LowRankError(f"cannot read image {p} ({type(exc).__name__})") from None
        img = _resize_crop(img, size, pp.resize)
        a = np.asarray(img, dtype=np.float64)
        if a.ndim == 2:
            a = a[:, :, None]
        if pp.channel_order.upper() == "BGR":
            a = a[:, :, ::-1]
        a = (a * pp.scale - np.asarray(pp.mean, dtype=np.float64)) / np.asarray(pp.std, dtype=np.float64)
        if layout == "NCHW":
            a = a.transpose(2, 0, 1)
        return a.astype(spec.dtype)

    def make_iter(start: int):
        for p in files[start:]:
            yield {spec.name: load(p)[None]}

    return FeedSource(make_iter, f"{len(files)} images in {path}", len(files), seekable=True)


def _resize_crop(img, size: tuple[int, int], resize: int | None):
    """Scale (shorter side to ``resize``, or just enough to cover ``size``), then centre-crop to ``size``."""
    from PIL import Image

    h, w = size
    iw, ih = img.size
    scale = max(resize / min(iw, ih) if resize else 0.0, h / ih, w / iw)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    if (nw, nh) != (iw, ih):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))
