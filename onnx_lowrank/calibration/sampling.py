"""Running calibration data through onnxruntime and sampling layer responses.

Two passes exist. :func:`collect` runs the original model once with every needed intermediate
tensor exposed and keeps a few random output positions per image (memory stays bounded: only
samples are kept, batch by batch). :class:`Propagator` serves asymmetric reconstruction: it runs
the model segment by segment over a disk cache of the tensors that cross each cut, so that after a
layer is solved its approximation is applied to the cached output before later layers are
sampled. That costs about one extra forward pass in total, whatever the depth.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np
import onnx
from onnx import helper

from ..graph.subgraph import last_use, node_reads, segment, with_outputs
from ..errors import LowRankError
from .inputs import FeedSource
from .samples import Samples
from ..runtime import CALIBRATION, run, session


def probe_shapes(model: onnx.ModelProto, names: list[str], value_types: dict, feed: dict) -> dict[str, tuple]:
    """Shapes of intermediate tensors from one real run, for those that shape inference could not reach."""
    sess = session(with_outputs(model, names, value_types), CALIBRATION)
    return {n: tuple(a.shape) for n, a in zip(names, run(sess, names, feed))}


def sample_positions(seed: int, layer_id: int, image: int, count: int, k: int) -> np.ndarray:
    """The output positions sampled for one image of one layer: the same in every pass."""
    if k >= count:
        return np.arange(count)
    rng = np.random.default_rng([seed, layer_id, image])
    return np.sort(rng.choice(count, size=k, replace=False))


@dataclass(frozen=True)
class SampledTensor:
    """One tensor to sample for one layer, at that layer's positions.

    The same tensor can serve two layers (a block's output is the next block's shortcut), so
    samples are keyed by ``key``, never by the tensor name alone. ``like`` names a tensor whose
    shape this one is broadcast to first (a shortcut broadcast in an Add). ``channels_last``: the
    channel axis is the last one (MatMul / Gemm layers), every axis between batch and it is a position.
    """

    name: str
    layer_id: int
    like: str | None = None
    channels_last: bool = False

    @property
    def key(self) -> str:
        return sample_key(self.name, self.layer_id)

    @property
    def reads(self) -> list[str]:
        return [self.name] + ([self.like] if self.like else [])


def sample_key(name: str, layer_id: int) -> str:
    return f"{layer_id}:{name}"


def gather(batch: np.ndarray, first_image: int, layer_id: int, seed: int, k: int) -> np.ndarray:
    """Rows (one per sampled position, image-major) of an (N, C, H, W) batch: shape (N * k', C).

    Indexed as (image, position) rows of the (N, positions, C) view: whole rows where the channels are
    contiguous (a MatMul's (N, ..., d) output seen channels first), and all positions as a plain reshape
    (a 6,625-wide classifier's 40 positions: a view, not a gather of 10^7 elements; 3.2 s of the recogniser's
    solve went in ``take_along_axis``)."""
    n, c = batch.shape[:2]
    rows = batch.reshape(n, c, -1).transpose(0, 2, 1)  # (n, positions, c)
    count = rows.shape[1]
    if k >= count:
        return rows.reshape(-1, c)
    idx = np.stack([sample_positions(seed, layer_id, first_image + i, count, k) for i in range(n)])
    return rows[np.arange(n)[:, None], idx].reshape(-1, c)


def _broadcast(t: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.broadcast_to(t, like.shape) if t.shape != like.shape else t


def to_channels_first(a: np.ndarray) -> np.ndarray:
    """``(N, ..., d)`` as ``(N, d, positions, 1)``."""
    return np.moveaxis(a.reshape(a.shape[0], -1, a.shape[-1]), 2, 1)[..., None]


def per_layer(k: int | Mapping[int, int], layer_id: int) -> int:
    """Positions per image for one layer: one number for all layers, or a number per layer id."""
    return k if isinstance(k, int) else k[layer_id]


class _Sampler:
    """Accumulates sampled rows batch by batch, the same way in both passes."""

    def __init__(self, tensors: list[SampledTensor], seed: int, k: int | Mapping[int, int], first: int = 0,
                 expected: int | None = None):
        """``expected``: the image count when known; each key's rows then go straight into one array of
        their final size (no per-batch pieces to join: the samples are held once, not fragmented)."""
        self.tensors, self.seed, self.k, self.expected = tensors, seed, k, expected
        self.rows: dict[str, list] = {t.key: [] for t in tensors}
        self.filled: dict[str, tuple[np.ndarray, int]] = {}
        self.imgs: dict[str, list] = {t.key: [] for t in tensors}
        self.first = self.seen = first  # global image index: positions and the held-back split follow it
        self.digests: list[np.ndarray] = []
        self.flat: list[np.ndarray] = []

    def inspect(self, feed: dict) -> None:
        """Per image: a digest of its inputs and whether each is constant (see calibration/checks.py)."""
        from .checks import image_digests

        d, f = image_digests(feed)
        self.digests.append(d)
        self.flat.append(f)

    def add(self, n: int, get: Callable[[str], np.ndarray]) -> None:
        for t in self.tensors:
            a = get(t.name)
            if t.like:
                a = _broadcast(a, get(t.like))
            if t.channels_last:
                a = to_channels_first(a)
            if a.ndim != 4:
                a = a.reshape(a.shape[0], a.shape[1], -1, 1) if a.ndim == 3 else a.reshape(a.shape[0], -1, 1, 1)
            r = gather(a, self.seen, t.layer_id, self.seed, per_layer(self.k, t.layer_id))
            self._keep(t.key, r, n)
            self.imgs[t.key].append(np.repeat(np.arange(self.seen, self.seen + n), len(r) // n))
        self.seen += n

    def _keep(self, key: str, r: np.ndarray, n: int) -> None:
        if not self.expected or self.rows[key]:
            self.rows[key].append(r.astype(np.float32))
            return
        buf, used = self.filled.get(key) or (np.empty((self.expected * (len(r) // n), r.shape[1]), np.float32), 0)
        if used + len(r) > len(buf):   # more images than expected: the rest as pieces
            self.rows[key].append(r.astype(np.float32))
            return
        buf[used:used + len(r)] = r
        self.filled[key] = buf, used + len(r)

    def _all_rows(self) -> dict[str, np.ndarray]:
        for key in list(self.filled):   # a buffer first, the pieces (if any) after it, in image order
            buf, used = self.filled.pop(key)
            self.rows[key].insert(0, buf if used == len(buf) else buf[:used].copy())
            del buf
        return _joined(self.rows)

    def result(self) -> Samples:
        if self.seen == self.first:
            raise LowRankError("the calibration data holds no samples" + (f" from image {self.first} on"
                                                                           if self.first else ""))
        return Samples(self._all_rows(), _joined(self.imgs), self.seen - self.first, self.first,
                       np.concatenate(self.digests) if self.digests else None,
                       np.concatenate(self.flat) if self.flat else None)


def _joined(pieces: dict[str, list]) -> dict[str, np.ndarray]:
    """Each key's per-batch pieces joined into one array, freeing them key by key (emptying ``pieces``): the
    samples are held about once (plus one key's), not twice as a join of every key before any is freed."""
    out = {}
    for k in list(pieces):
        v = pieces.pop(k)
        out[k] = v[0] if len(v) == 1 else np.concatenate(v)
    return out


def collect(model: onnx.ModelProto, value_types: dict, source: FeedSource, tensors: list[SampledTensor],
            batch_size: int, seed: int, samples_per_image: int | Mapping[int, int], max_images: int | None = None,
            progress: Callable | None = None, threads: int | None = None, first: int = 0,
            inspect: bool = False, images: int | None = None) -> Samples:
    """Run the model once over the data and sample each tensor at its layer's positions.

    ``samples_per_image``: positions per image, for every layer or per layer id. ``first``: the images
    from this global index on (a shard), at most ``max_images`` of them. ``inspect``: also keep a digest
    of each image's inputs (to refuse data that cannot teach anything). ``images``: how many images the
    pass will see, when known (the samples are then kept in arrays of their final size).
    """
    names = list(dict.fromkeys(n for t in tensors for n in t.reads))
    sess = session(with_outputs(model, names, value_types), CALIBRATION, threads)
    sampler = _Sampler(tensors, seed, samples_per_image, first, images)
    for feed in source.batches(batch_size, max_images, start=first):
        outs = dict(zip(names, run(sess, names, feed)))
        n = _batch_count(feed)
        sampler.add(n, outs.__getitem__)
        if inspect:
            sampler.inspect(feed)
        del outs
        if progress:
            progress(n)
    return sampler.result()


def _batch_count(feed: dict) -> int:
    return len(next(iter(feed.values())))


class Propagator:
    """Segment-by-segment forward pass of the partly approximated model over a disk cache.

    ``stops`` maps a node index to the tensors that must be sampled once every node up to it has
    run. :meth:`run` yields ``(node_index, samples)`` at each stop; before resuming, the caller may
    call :meth:`transform` to replace a cached Conv output by its low-rank approximation
    ``M y + b``, which is exactly what the factorised chain computes.
    """

    def __init__(self, model: onnx.ModelProto, value_types: dict, source: FeedSource, batch_size: int,
                 seed: int, samples_per_image: int | Mapping[int, int], max_images: int | None = None,
                 cache_dir: str | None = None, threads: int | None = None, memory_budget: int = 2 << 30):
        self.model = model
        self.value_types = value_types
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.k = samples_per_image
        self.max_images = max_images
        self.threads = threads
        self._dir = tempfile.mkdtemp(prefix="onnx-lowrank-cache-", dir=cache_dir)
        # Cached tensors stay in memory up to the budget, and spill to disk beyond it.
        self.memory_budget = memory_budget
        self._mem: dict[tuple[int, str], np.ndarray] = {}
        self._mem_bytes = 0
        self._batches: list[int] = []
        self._types: dict[str, int] = {}

    def close(self) -> None:
        self._mem.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _path(self, b: int, name: str) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        return os.path.join(self._dir, f"{b:06d}_{safe}_{abs(hash(name)) % 10**8}.npy")

    def _save(self, b: int, name: str, a: np.ndarray) -> None:
        self._drop(b, name)
        if self._mem_bytes + a.nbytes <= self.memory_budget:
            self._mem[(b, name)] = a
            self._mem_bytes += a.nbytes
        else:
            np.save(self._path(b, name), a, allow_pickle=False)

    def _load(self, b: int, name: str) -> np.ndarray:
        a = self._mem.get((b, name))
        return a if a is not None else np.load(self._path(b, name), allow_pickle=False)

    def _drop(self, b: int, name: str) -> None:
        a = self._mem.pop((b, name), None)
        if a is not None:
            self._mem_bytes -= a.nbytes
            return
        try:
            os.unlink(self._path(b, name))
        except FileNotFoundError:
            pass

    def run(self, stops: dict[int, list[SampledTensor]],
            progress: Callable | None = None) -> Iterator[tuple[int, Samples]]:
        g = self.model.graph
        inits = {t.name for t in g.initializer}
        last = last_use(self.model)
        for b, feed in enumerate(self.source.batches(self.batch_size, self.max_images)):
            self._batches.append(_batch_count(feed))
            for name, a in feed.items():
                self._save(b, name, np.array(a))  # a copy: the cache never keeps the reader's arrays alive
                self._types[name] = helper.np_dtype_to_tensor_dtype(a.dtype)
        live = {i.name for i in g.input if i.name not in inits}
        prev = -1
        order = sorted(stops)
        needed_later = {n for s in order for t in stops[s] for n in t.reads}
        for stop in order:
            produced = {o for n in g.node[prev + 1: stop + 1] for o in n.output if o}
            reads = {i for n in g.node[prev + 1: stop + 1] for i in node_reads(n) if i not in inits}
            keep_now = {n for t in stops[stop] for n in t.reads}
            outputs = sorted(o for o in produced if last.get(o, -1) > stop or o in keep_now
                             or o in needed_later)
            inputs = sorted(i for i in reads if i in live)
            if outputs:
                seg = segment(self.model, prev + 1, stop + 1, inputs, outputs, self.value_types, self._types)
                sess = session(seg, CALIBRATION, self.threads)
                for b in range(len(self._batches)):
                    res = run(sess, outputs, {i: self._load(b, i) for i in inputs})
                    for name, a in zip(outputs, res):
                        self._save(b, name, a)
                        self._types[name] = helper.np_dtype_to_tensor_dtype(a.dtype)
                del sess
            live |= set(outputs)
            yield stop, self._sample(stops[stop])
            later = {n for s, ts in stops.items() if s > stop for t in ts for n in t.reads}
            dead = {t for t in live if last.get(t, -1) <= stop and t not in later}
            for t in dead:
                for b in range(len(self._batches)):
                    self._drop(b, t)
            live -= dead
            prev = stop
            if progress:
                progress(1)

    def _sample(self, tensors: list[SampledTensor]) -> Samples:
        sampler = _Sampler(tensors, self.seed, self.k, expected=sum(self._batches))
        for b, n in enumerate(self._batches):
            sampler.add(n, lambda name, b=b: self._load(b, name))
        return sampler.result()

    def transform(self, name: str, apply: Callable[[np.ndarray], np.ndarray], source: str | None = None,
                  channels_last: bool = False) -> None:
        """Replace the cached tensor ``name`` (N, d, ...) by ``apply`` of it (or of the cached ``source``,
        shaped like it), reshaped (N, d, positions) in its own dtype (float32 as the model computes it): a
        scheme's channel step (e.g. ``Factorisation.apply_channels``). ``channels_last``: the tensor is (N, ..., d)."""
        for b in range(len(self._batches)):
            y = self._load(b, source or name)
            shape = y.shape
            if channels_last:
                out = apply(to_channels_first(y)[..., 0])
                self._save(b, name, np.moveaxis(out, 1, 2).reshape(shape).astype(y.dtype, copy=False))
                continue
            out = apply(y.reshape(shape[0], shape[1], -1))
            self._save(b, name, out.reshape(shape).astype(y.dtype, copy=False))
