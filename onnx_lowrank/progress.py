"""Progress for the long steps: a bar on a terminal, one line per phase in logs, nothing with --quiet."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


@contextmanager
def bar(desc: str, total: int | None = None, unit: str = "it"):
    """Yield an ``update(n)`` callable.

    On a terminal a tqdm bar; otherwise (CI logs, redirected stderr) a line when the phase starts
    and one when it ends, with the count and seconds, so a log shows where a long run is. A phase
    that fails logs no end line: the error follows.
    """
    tty = sys.stderr.isatty()
    lines = _enabled and not tty
    if lines:
        log(f"{desc}: started" + (f" ({total} {unit})" if total is not None else ""))
    t0 = time.perf_counter()
    done = 0
    with tqdm(total=total, desc=desc, unit=unit, disable=not (_enabled and tty), leave=False, file=sys.stderr) as t:
        def update(n: int = 1) -> None:
            nonlocal done
            done += n
            t.update(n)

        yield update
    if lines:
        log(f"{desc}: done, {done} {unit} in {time.perf_counter() - t0:.1f} s")


def log(message: str) -> None:
    """One status line on stderr, unless quiet."""
    if _enabled:
        print(message, file=sys.stderr, flush=True)


def status(message: str) -> None:
    """A status line for a person watching a terminal: silent in logs, pipes and with --quiet."""
    if _enabled and sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)
