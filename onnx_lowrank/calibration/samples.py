"""Sampled layer responses: what calibration keeps, written to and read from files, and merged.

Every row carries the global index of the image it came from, and sampled positions depend on that
index only (:func:`sampling.sample_positions`), so calibration split into image ranges in separate
processes (shards) gives parts whose merge is exactly the single-process result. A part carries a
fingerprint (model hash and the settings that decide what is sampled); merging refuses parts of
different runs and an incomplete or repeated set of shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LowRankError

FORMAT = "onnx-lowrank-samples/1"


@dataclass
class Samples:
    rows: dict[str, np.ndarray]     # sample key -> (n_samples, channels)
    image: dict[str, np.ndarray]    # sample key -> global image index of each row
    images: int                     # images sampled (a shard's own count; merged: all)
    first: int = 0                  # global index of the first image
    #: per image (in order): a 64-bit digest of its inputs, and whether every input is constant within it
    digests: np.ndarray | None = None
    flat: np.ndarray | None = None
    fingerprint: dict = field(default_factory=dict)
    shard: tuple[int, int] | None = None   # (i, n), 1-based i, for a part of a sharded calibration

    def save(self, path: str | Path) -> None:
        """Write as .npz (arrays by position, names and fingerprint as JSON), atomically."""
        from ..files import atomic_path

        keys = sorted(self.rows)
        meta = {"format": FORMAT, "keys": keys, "images": self.images, "first": self.first,
                "fingerprint": self.fingerprint, "shard": list(self.shard) if self.shard else None}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        for i, k in enumerate(keys):
            arrays[f"rows_{i}"] = self.rows[k]
            arrays[f"image_{i}"] = self.image[k]
        if self.digests is not None:
            arrays["digests"], arrays["flat"] = self.digests, self.flat
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Samples":
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}")
                keys = meta["keys"]
                rows = {k: z[f"rows_{i}"] for i, k in enumerate(keys)}
                image = {k: z[f"image_{i}"] for i, k in enumerate(keys)}
                digests = z["digests"] if "digests" in z.files else None
                flat = z["flat"] if "flat" in z.files else None
        except (OSError, ValueError, KeyError) as exc:
            raise LowRankError(f"cannot read {path} as calibration samples from `onnx-lowrank calibrate` "
                               f"({type(exc).__name__}: {exc})") from None
        return cls(rows, image, int(meta["images"]), int(meta["first"]), digests, flat, meta["fingerprint"],
                   tuple(meta["shard"]) if meta["shard"] else None)


def merge(parts: list[Samples], names: list[str] | None = None) -> Samples:
    """The single-process samples from the parts of one sharded calibration (any order).

    ``names`` (file names, for messages) go with ``parts``. Refuses parts of different runs, and
    missing or repeated shards, each in one line.
    """
    names = names or [f"part {i + 1}" for i in range(len(parts))]
    if not parts:
        raise LowRankError("no calibration samples to merge")
    if any(p.shard is None for p in parts):
        bad = next(n for n, p in zip(names, parts) if p.shard is None)
        raise LowRankError(f"{bad} holds the samples of a whole calibration, not of a shard: give it alone")
    ref = parts[0].fingerprint
    for n, p in zip(names, parts):
        diff = sorted(k for k in set(ref) | set(p.fingerprint) if ref.get(k) != p.fingerprint.get(k))
        if diff:
            raise LowRankError(f"{n} and {names[0]} come from different calibrations (they differ in "
                               f"{', '.join(diff)}): give the parts of one run of `onnx-lowrank calibrate --shard`")
    counts = {p.shard[1] for p in parts}
    if len(counts) != 1:
        raise LowRankError(f"the parts were made for different shard counts {sorted(counts)}: give the parts of one run")
    total = counts.pop()
    seen: dict[int, str] = {}
    for n, p in zip(names, parts):
        if p.shard[0] in seen:
            raise LowRankError(f"shard {p.shard[0]}/{total} is given twice ({seen[p.shard[0]]} and {n})")
        seen[p.shard[0]] = n
    missing = [i for i in range(1, total + 1) if i not in seen]
    if missing:
        raise LowRankError(f"shard(s) {', '.join(f'{i}/{total}' for i in missing)} missing: give all {total} parts "
                           f"(--samples 'part*.npz')")
    ordered = sorted(parts, key=lambda p: p.shard[0])
    pos = 0
    for p in ordered:
        if p.first != pos:
            raise LowRankError(f"shard {p.shard[0]}/{total} starts at image {p.first}, expected {pos}: "
                               "the parts do not tile the data")
        pos += p.images
    keys = list(ordered[0].rows)
    return Samples({k: np.concatenate([p.rows[k] for p in ordered]) for k in keys},
                   {k: np.concatenate([p.image[k] for p in ordered]) for k in keys},
                   pos, 0, _cat([p.digests for p in ordered]), _cat([p.flat for p in ordered]), dict(ref), None)


def _cat(arrays: list) -> np.ndarray | None:
    return None if any(a is None for a in arrays) else np.concatenate(arrays)


def load_parts(paths: list[str | Path]) -> Samples:
    """``compress --samples``: one whole calibration, or the parts of a sharded one merged."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise LowRankError(f"samples file not found: {p} (write it with `onnx-lowrank calibrate`)")
    parts = [Samples.load(p) for p in paths]
    if len(parts) == 1 and parts[0].shard is None:
        return parts[0]
    return merge(parts, [os.fspath(p) for p in paths])


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` (1-based) as (i, n)."""
    try:
        i, n = (int(v) for v in str(spec).split("/"))
    except ValueError:
        raise LowRankError(f"--shard takes I/N, e.g. 2/3 for the second of three shards, not {spec!r}") from None
    if not 1 <= i <= n:
        raise LowRankError(f"--shard {spec}: I must be between 1 and N")
    return i, n


def shard_range(total: int, batch: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Images [start, stop) of shard ``(i, n)``: whole batches, so each batch is the one a single process runs."""
    i, n = shard
    batches = -(-total // batch)
    if n > batches:
        raise LowRankError(f"{n} shards of {total} calibration images at batch size {batch} leave some shards "
                           f"empty: use at most {batches} shards (or a smaller --batch-size)")
    return min(total, batches * (i - 1) // n * batch), min(total, batches * i // n * batch)


def fingerprint(model_hash: str, settings: dict, positions: dict[int, int], keys: list[str], images: int) -> dict:
    """What must agree between parts (and with the Compressor that uses them), as JSON-able values."""
    return {"model_sha256": model_hash, **{k: _plain(v) for k, v in settings.items()},
            "positions": {str(k): int(v) for k, v in sorted(positions.items())}, "sampled": sorted(keys),
            "images": int(images)}


def _plain(v):
    return json.loads(json.dumps(v, default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o)))


def model_hash(model) -> str:
    """SHA-256 over an onnx model's parts one by one (a model over 2 GB cannot be serialised whole)."""
    import hashlib

    h = hashlib.sha256()
    g = model.graph
    for part in [*model.opset_import, *g.input, *g.output, *g.node, *g.initializer]:
        h.update(part.SerializeToString(deterministic=True))
    return h.hexdigest()


def check_samples(samples: Samples, expected: dict) -> Samples:
    """``samples`` if they stand for the calibration whose fingerprint is ``expected``, else a one-line error."""
    if samples.shard is not None:
        raise LowRankError(f"these samples are shard {samples.shard[0]}/{samples.shard[1]} only: give all the parts")
    diff = sorted(k for k in set(expected) | set(samples.fingerprint)
                  if expected.get(k) != samples.fingerprint.get(k))
    if diff:
        raise LowRankError(f"the samples were calibrated with another {', '.join(diff)} than this compression: "
                           "calibrate again with the same model and options, or drop --samples")
    return samples
