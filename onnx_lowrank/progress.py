"""Progress for the long steps: a bar on a terminal, one line per phase in logs, nothing with --quiet."""

from __future__ import annotations

import resource
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
    """Yield an ``update(n, item=None)`` callable.

    On a terminal a tqdm bar; otherwise (CI logs, redirected stderr) a line when the phase starts
    and one when it ends, with the count, seconds and the process's peak memory, so a log shows where a
    long run is and what it costs. An ``item`` (e.g. a layer being solved) also gets a line of its own
    with the time so far and an estimate of the rest: a phase that takes minutes is never silent. A phase
    that fails logs no end line: the error follows.
    """
    tty = sys.stderr.isatty()
    lines = _enabled and not tty
    if lines:
        log(f"{desc}: started" + (f" ({total} {unit})" if total is not None else ""))
    t0 = time.perf_counter()
    done = 0
    with tqdm(total=total, desc=desc, unit=unit, disable=not (_enabled and tty), leave=False, file=sys.stderr) as t:
        def update(n: int = 1, item: str | None = None) -> None:
            nonlocal done
            done += n
            t.update(n)
            if item is not None:
                t.set_postfix_str(item, refresh=False)
                if lines:
                    log(f"{desc}: {unit} {done} of {total if total is not None else '?'} ({item}), "
                        f"{_elapsed(t0)}{_eta(t0, done, total)}")

        yield update
    if lines:
        log(f"{desc}: done, {done} {unit} in {time.perf_counter() - t0:.1f} s, peak {peak_memory_mb():.0f} MB")


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:.1f} s"


def _eta(t0: float, done: int, total: int | None) -> str:
    if not total or done <= 0 or done >= total:
        return ""
    return f", ETA {(time.perf_counter() - t0) / done * (total - done):.0f} s"


def log(message: str) -> None:
    """One status line on stderr, unless quiet."""
    if _enabled:
        print(message, file=sys.stderr, flush=True)


def status(message: str) -> None:
    """A status line for a person watching a terminal: silent in logs, pipes and with --quiet."""
    if _enabled and sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)
