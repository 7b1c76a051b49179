"""Calibration data that cannot teach anything, refused before any layer is solved.

A factorisation is fitted to how responses vary over the calibration images. Constant images
(all zero, one grey level) or one image repeated give responses with no variation to fit: the
written model keeps whatever the solver happened to pick (the demo: 15.9 % accuracy against
97.9 %). Those are errors. Data that varies but leaves some layers' responses almost constant
is only suspicious (a layer may truly saturate), so those layers are named in a warning.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import LowRankError
from ..solver.gram import _row_blocks

#: A layer whose sampled responses vary by less than this fraction of their mean square is "flat".
FLAT_RESPONSE = 1e-6


def image_digests(feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of a batch: a 64-bit digest of all its inputs, and whether every input is constant in it."""
    names = sorted(feed)
    n = len(feed[names[0]])
    digests = np.empty(n, dtype=np.uint64)
    flat = np.ones(n, dtype=bool)
    for i in range(n):
        h = hashlib.blake2b(digest_size=8)
        for k in names:
            a = np.ascontiguousarray(feed[k][i])
            h.update(a.tobytes())
            if a.size and flat[i]:
                flat[i] = bool((a == a.flat[0]).all())
        digests[i] = int.from_bytes(h.digest(), "little")
    return digests, flat


def check_informative(digests: np.ndarray | None, flat: np.ndarray | None, what: str = "calibration") -> None:
    """One-line error for constant images or copies of one image (see the module docstring)."""
    if digests is None or len(digests) == 0:
        return
    n = len(digests)
    if flat.all():
        raise LowRankError(f"every {what} image is constant (e.g. all zeros): the layers' responses do not vary, "
                           "so there is nothing to fit; give real inputs, preprocessed as the model expects")
    if n > 1 and len(np.unique(digests)) == 1:
        raise LowRankError(f"all {n} {what} images are copies of one image: there is nothing to fit across "
                           "images; give different real inputs (a few hundred is typical)")


def flat_layers(samples, keys: dict[str, str]) -> list[str]:
    """Names (from ``keys``: layer name -> sample key) whose sampled responses hardly vary."""
    out = []
    for name, key in keys.items():
        rows = samples.rows.get(key)
        if rows is None or len(rows) < 2:
            continue
        var, ms = _spread(rows)
        if var <= FLAT_RESPONSE * ms or ms == 0.0:
            out.append(name)
    return out


def _spread(rows: np.ndarray) -> tuple[float, float]:
    """Summed per-channel variance and mean square of the (n, d) rows, in float64 over the Gram's blocks of rows
    (:func:`~..solver.gram._row_blocks`, two passes): a 6,625-wide classifier's 12,000 rows widened whole took
    0.6 GB, three times over."""
    blocks, n = _row_blocks(rows, None)
    mean = sum(b.sum(axis=0) for b in blocks()) / n
    var = ms = 0.0
    for y in blocks():
        ms += float(np.einsum("ij,ij->", y, y))
        y = y - mean   # a new block: ``y`` is a view of the caller's rows where they are float64 already
        var += float(np.einsum("ij,ij->", y, y))
    return var / n, ms / n


def check_source(source, limit: int | None, batch: int = 64) -> None:
    """The check above on data already in memory, before any work (streams are checked as calibration reads them)."""
    digests, flat = [], []
    for feed in source.batches(batch, limit):
        d, f = image_digests(feed)
        digests.append(d)
        flat.append(f)
    if digests:
        check_informative(np.concatenate(digests), np.concatenate(flat))


def review_samples(samples, keys: dict[str, str]) -> None:
    """After calibration (of all images, or all parts merged): refuse data that cannot teach, and name the
    layers (``keys``: layer name -> sample key) whose responses barely vary."""
    from .. import progress

    check_informative(samples.digests, samples.flat)
    flat = flat_layers(samples, keys)
    if flat:
        progress.log(f"warning: the calibration responses barely vary at {', '.join(flat)} (variance below "
                     f"{FLAT_RESPONSE:g} of their mean square): those fits learn little; give more varied data")
