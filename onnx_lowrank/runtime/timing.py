"""Interleaved timing, and when to stop: the one loop every latency figure comes from.

Each round runs every candidate once, the order rotated per round (two models: A B, B A, A B,
...), so that slow drifts of a shared machine and any advantage of going first hit all alike.
A speed-up is the median of per-round ratios (candidates timed seconds apart, under the same
load), not a ratio of two medians taken over different moments. Rounds go on until the median
is known well enough - the distribution-free confidence interval of the median (order
statistics of a binomial, no assumption on the noise) lies within ``tolerance`` of it on each
side - but not before ``min_rounds`` rounds and ``min_seconds`` (a fast model is not judged on a
few milliseconds of a shared machine's quiet spell), and no later than ``seconds`` (once past
``min_rounds``) or ``max_rounds``. Callers that only want a time budget give no tolerance.

The clock is a parameter so that the statistics are tested with known durations and noise.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["Spread", "Rounds", "median_interval", "interleave", "MIN_ROUNDS", "MIN_SECONDS", "TOLERANCE", "MAX_SECONDS"]

#: Defaults for measurements that are reported (bench, --measure, whole-model checks).
MIN_ROUNDS = 10
MIN_SECONDS = 1.0
TOLERANCE = 0.02
MAX_SECONDS = 60.0
CONFIDENCE = 0.95


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free interval holding the median with at least ``confidence``.

    With the values sorted, ``[x_(j), x_(n+1-j)]`` misses the median only if fewer than ``j``
    values fall on one side, a Binomial(n, 1/2) tail; ``j`` is the largest rank whose two tails
    stay within ``1 - confidence``. Too few values for any such ``j``: the whole range, and
    ``(-inf, inf)`` when even that is not enough (n < 6 at 95 %).
    """
    xs = sorted(values)
    n = len(xs)
    alpha = 1.0 - confidence
    tail, j = 0.0, 0  # tail = P(Binomial(n, 1/2) <= j - 1)
    while j < n // 2:
        nxt = tail + math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) - n * math.log(2))
        if 2 * nxt > alpha:
            break
        tail, j = nxt, j + 1
    if j == 0:
        return (-math.inf, math.inf)
    return (xs[j - 1], xs[n - j])


@dataclass(frozen=True)
class Spread:
    """Summary of one series: median, quartiles, the median's confidence interval, count."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float], confidence: float = CONFIDENCE) -> "Spread":
        xs = sorted(values)
        if len(xs) == 1:
            q1 = q3 = xs[0]
        else:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        low, high = median_interval(xs, confidence)
        return cls(float(statistics.median(xs)), float(q1), float(q3), float(low), float(high), len(xs))

    def relative_half_width(self) -> float:
        """Half the confidence interval's width as a fraction of the median (inf when unknown)."""
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.median <= 0:
            return math.inf
        return (self.high - self.low) / 2.0 / self.median

    def as_dict(self) -> dict:
        return {"median": self.median, "iqr": [self.q1, self.q3], "ci95": [self.low, self.high], "rounds": self.n}


@dataclass(frozen=True)
class Rounds:
    """Times (ms) of interleaved rounds: ``ms[i][r]`` is candidate ``i`` in round ``r``."""

    ms: tuple[tuple[float, ...], ...]
    stable: bool  # stopped because every tracked median was known within the tolerance
    seconds: float

    @property
    def rounds(self) -> int:
        return len(self.ms[0]) if self.ms else 0

    def ratios(self, i: int, base: int = 0) -> list[float]:
        """Per-round speed-up of candidate ``i`` over ``base``: base time / candidate time."""
        return [b / c if c > 0 else math.inf for b, c in zip(self.ms[base], self.ms[i])]

    def speedup(self, i: int, base: int = 0) -> Spread:
        return Spread.of(self.ratios(i, base))

    def times(self, i: int) -> Spread:
        return Spread.of(self.ms[i])

    def fastest(self, i: int) -> float:
        return min(self.ms[i])


def _stable(ms: list[list[float]], tolerance: float) -> bool:
    """Each candidate's ratio to the first (or the only candidate's time) known within ``tolerance``."""
    series = [ms[0]] if len(ms) == 1 else \
        [[b / c if c > 0 else math.inf for b, c in zip(ms[0], ms[i])] for i in range(1, len(ms))]
    for values in series:
        low, high = median_interval(values)
        median = statistics.median(values)
        if not (math.isfinite(low) and math.isfinite(high) and median > 0) or (high - low) / 2 > tolerance * median:
            return False
    return True


def _check_due(rounds: int) -> bool:
    """Test stability after every round at first, then every ~10 % more rounds (the test sorts them all)."""
    return rounds <= 50 or rounds % (rounds // 10) == 0


def interleave(runners: Sequence[Callable[[int], Any]], *, min_rounds: int = MIN_ROUNDS,
               max_rounds: int = 10_000, seconds: float = MAX_SECONDS, tolerance: float | None = TOLERANCE,
               min_seconds: float = 0.0,
               warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
               on_run: Callable[[], None] | None = None) -> Rounds:
    """Time ``runners`` (each called with the round number) in interleaved rounds; see the module docstring.

    ``warmup`` untimed calls of each runner come first. ``tolerance=None``: no stability test,
    rounds go on for ``seconds`` (at least ``min_rounds``, at most ``max_rounds``).
    """
    n = len(runners)
    for i in range(n):
        for w in range(warmup):
            runners[i](w)
            if on_run:
                on_run()
    ms: list[list[float]] = [[] for _ in range(n)]
    start = clock()
    stable = False
    rounds = 0
    while rounds < max_rounds:
        for k in range(n):
            i = (rounds + k) % n
            t0 = clock()
            runners[i](rounds)
            ms[i].append((clock() - t0) * 1000.0)
            if on_run:
                on_run()
        rounds += 1
        elapsed = clock() - start
        if rounds < min_rounds or elapsed < min(min_seconds, seconds):
            continue
        if tolerance is not None and _check_due(rounds) and _stable(ms, tolerance):
            stable = True
            break
        if elapsed >= seconds:
            break
    return Rounds(tuple(tuple(t) for t in ms), stable, clock() - start)
