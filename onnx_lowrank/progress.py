"""Progress bars for the long steps: shown on a terminal, silent in logs and with --quiet."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


@contextmanager
def bar(desc: str, total: int | None = None, unit: str = "it"):
    """Yield an ``update(n)`` callable; a tqdm bar only when stderr is a terminal and not quiet."""
    show = _enabled and sys.stderr.isatty()
    with tqdm(total=total, desc=desc, unit=unit, disable=not show, leave=False, file=sys.stderr) as t:
        yield t.update


def log(message: str) -> None:
    """One status line on stderr, unless quiet."""
    if _enabled:
        print(message, file=sys.stderr, flush=True)


def status(message: str) -> None:
    """A status line for a person watching a terminal: silent in logs, pipes and with --quiet."""
    if _enabled and sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)
