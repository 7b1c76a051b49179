"""Atomic file output: a result appears whole, with normal permissions, or not at all.

Several outputs of one command (a model and its report, a CSV and its plot) are committed
together: all are written to temporary files first and renamed only once every one of them
was written, so a failing report never leaves a model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import LowRankError


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, an output path that cannot be written (``what`` names the option).

    Missing parent folders are fine (they are created when the output is written), as long as
    the nearest existing one is a writable folder; writability is probed with a temporary file,
    which also catches read-only file systems and root-owned places.
    """
    p = Path(path)
    if p.is_dir():
        raise LowRankError(f"{what} {p} is a directory: give a file name")
    parent = p.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise LowRankError(f"cannot write {what} {p}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", dir=parent)
    except OSError as exc:
        raise LowRankError(f"cannot write {what} {p}: {parent} is not writable ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def write_together(outputs: list[tuple[str | os.PathLike, Callable[[str], None]]]) -> None:
    """Write every ``(path, writer)`` output or none of them.

    ``writer(tmp)`` writes the file at ``tmp`` (a path named like the target inside a temporary
    folder beside it; it may add sibling files there, e.g. external weight data). Only when all
    writers succeeded are the files renamed into place; otherwise temporaries and any parent
    folders created for them are removed and the error is re-raised (an OSError, such as a full
    disk, as a one-line LowRankError).
    """
    created: list[Path] = []
    staged: list[tuple[str, Path]] = []
    p = None
    renamed = 0
    try:
        for path, writer in outputs:
            p = Path(path)
            created.extend(_make_parents(p.parent))
            tmpdir = tempfile.mkdtemp(prefix=f".{p.name}.", dir=p.parent)
            staged.append((tmpdir, p.parent))
            writer(os.path.join(tmpdir, p.name))
        umask = os.umask(0)
        os.umask(umask)
        for tmpdir, parent in staged:
            for name in sorted(os.listdir(tmpdir)):
                os.chmod(os.path.join(tmpdir, name), 0o666 & ~umask)
        for tmpdir, parent in staged:
            for name in sorted(os.listdir(tmpdir)):
                p = parent / name
                os.replace(os.path.join(tmpdir, name), p)
                renamed += 1
    except BaseException as exc:
        for tmpdir, _ in staged:
            shutil.rmtree(tmpdir, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(exc, OSError):
            done = "nothing was written" if not renamed else f"{renamed} other file(s) were already written"
            raise LowRankError(f"cannot write {p}: {exc.strerror or exc}; {done}") from None
        raise
    for tmpdir, _ in staged:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for d in missing:
        d.mkdir(exist_ok=True)
    return missing


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def json_default(o):
    """NumPy scalars and arrays in a report, as plain JSON numbers and lists."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
