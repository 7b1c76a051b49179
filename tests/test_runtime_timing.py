"""Interleaved timing statistics (onnx_lowrank.runtime.timing), checked with a fake clock: runners
of known durations, with seeded noise, so every expected value is known before the code runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from onnx_lowrank.runtime.timing import Spread, interleave, median_interval


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.calls: list[int] = []

    def __call__(self) -> float:
        return self.now

    def runner(self, index: int, seconds_of_round):
        """A runner that takes ``seconds_of_round(r)`` of fake time and records that it ran."""
        def run(r: int) -> None:
            self.calls.append(index)
            self.now += seconds_of_round(r)
        return run


def test_exact_durations_give_exact_ratio_after_min_rounds():
    clock = FakeClock()
    runners = [clock.runner(0, lambda r: 0.010), clock.runner(1, lambda r: 0.004)]
    res = interleave(runners, min_rounds=12, warmup=0, clock=clock)
    assert res.rounds == 12 and res.stable
    s = res.speedup(1)
    assert s.median == pytest.approx(2.5) and (s.q1, s.q3) == pytest.approx((2.5, 2.5))
    assert res.ms[0] == pytest.approx((10.0,) * 12) and res.ms[1] == pytest.approx((4.0,) * 12)


def test_order_alternates_and_warmup_is_untimed():
    clock = FakeClock()
    runners = [clock.runner(i, lambda r: 0.001) for i in range(2)]
    interleave(runners, min_rounds=4, max_rounds=4, tolerance=None, warmup=2, clock=clock)
    assert clock.calls == [0, 0, 1, 1] + [0, 1, 1, 0, 0, 1, 1, 0]
    clock = FakeClock()
    runners = [clock.runner(i, lambda r: 0.001) for i in range(3)]
    res = interleave(runners, min_rounds=3, max_rounds=3, tolerance=None, warmup=0, clock=clock)
    assert clock.calls == [0, 1, 2, 1, 2, 0, 2, 0, 1] and res.rounds == 3


def test_per_round_ratio_cancels_load_that_drifts_between_rounds():
    # The machine gets up to 4x slower from round to round; both candidates of a round share the load.
    load = [1.0 + 3.0 * ((7 * r) % 10) / 10 for r in range(1000)]
    clock = FakeClock()
    runners = [clock.runner(0, lambda r: 0.030 * load[r]), clock.runner(1, lambda r: 0.010 * load[r])]
    res = interleave(runners, min_rounds=10, warmup=0, clock=clock)
    assert res.speedup(1).median == pytest.approx(3.0) and res.stable and res.rounds == 10
    assert res.times(0).q3 / res.times(0).q1 > 1.5  # while the raw times spread widely: not stable alone
    alone = interleave([clock.runner(0, lambda r: 0.030 * load[r])], min_rounds=10, seconds=1.0, warmup=0,
                       clock=clock)
    assert not alone.stable


def test_alternating_ratios_median_and_quartiles_by_hand():
    # B alternates 4 ms / 5 ms against A's 10 ms: ratios 2.5, 2.0, 2.5, 2.0, ...
    clock = FakeClock()
    runners = [clock.runner(0, lambda r: 0.010), clock.runner(1, lambda r: 0.004 if r % 2 == 0 else 0.005)]
    res = interleave(runners, min_rounds=8, max_rounds=8, tolerance=None, warmup=0, clock=clock)
    s = res.speedup(1)
    assert s.median == pytest.approx(2.25) and (s.q1, s.q3) == pytest.approx((2.0, 2.5)) and s.n == 8


@pytest.mark.parametrize("sigma", [0.05, 0.15])
def test_noisy_ratio_lands_within_tolerance_of_the_truth(sigma):
    rng = np.random.default_rng(1)
    noise = np.exp(rng.normal(0.0, sigma, size=(2, 5000)))
    spikes = np.where(rng.random((2, 5000)) < 0.1, 10.0, 1.0)  # one run in ten hit by another job
    clock = FakeClock()
    runners = [clock.runner(0, lambda r: 0.5 * noise[0, r] * spikes[0, r]),
               clock.runner(1, lambda r: 0.125 * noise[1, r] * spikes[1, r])]
    res = interleave(runners, min_rounds=20, seconds=1e9, tolerance=0.02, warmup=0, clock=clock)
    assert res.stable
    s = res.speedup(1)
    assert s.median == pytest.approx(4.0, rel=0.03)
    assert s.low <= 4.0 * 1.01 and s.high >= 4.0 * 0.99
    assert (s.high - s.low) / 2 <= 0.02 * s.median * 1.0001


def test_more_noise_needs_more_rounds():
    def rounds_for(sigma):
        rng = np.random.default_rng(2)
        noise = np.exp(rng.normal(0.0, sigma, size=(2, 5000)))
        clock = FakeClock()
        runners = [clock.runner(i, lambda r, i=i: 0.01 * noise[i, r]) for i in range(2)]
        return interleave(runners, min_rounds=10, seconds=1e9, warmup=0, clock=clock).rounds
    assert rounds_for(0.01) < rounds_for(0.05) < rounds_for(0.2)


def test_time_cap_stops_an_unstable_measurement_but_not_before_min_rounds():
    rng = np.random.default_rng(3)
    noise = np.exp(rng.normal(0.0, 1.0, size=(2, 10000)))  # hopeless
    clock = FakeClock()
    runners = [clock.runner(i, lambda r, i=i: 0.01 * noise[i, r]) for i in range(2)]
    res = interleave(runners, min_rounds=10, seconds=5.0, warmup=0, clock=clock)
    assert not res.stable and res.rounds > 10 and 5.0 <= res.seconds < 5.0 + 2 * 0.01 * noise.max()
    # a slow model: the cap is long past after one round, min_rounds still run
    clock = FakeClock()
    runners = [clock.runner(i, lambda r, i=i: 2.0 * noise[i, r]) for i in range(2)]
    res = interleave(runners, min_rounds=10, seconds=1.0, warmup=0, clock=clock)
    assert res.rounds == 10 and not res.stable


def test_single_candidate_stops_when_its_time_is_stable():
    clock = FakeClock()
    res = interleave([clock.runner(0, lambda r: 0.002)], min_rounds=10, warmup=0, clock=clock)
    assert res.rounds == 10 and res.stable and res.fastest(0) == pytest.approx(2.0)


def test_median_interval_by_hand():
    xs = list(range(10, 0, -1))  # unsorted on purpose
    assert median_interval(xs) == (2, 9)  # P(Bin(10, 1/2) <= 1) = 11/1024 <= 2.5 % < P(<= 2)
    assert median_interval(range(6)) == (0, 5)  # 2 / 64 = 3.1 % <= 5 %
    assert median_interval(range(5)) == (-math.inf, math.inf)  # 2 / 32 = 6.25 % > 5 %
    assert Spread.of([1.0, 2.0, 3.0, 4.0, 5.0]).relative_half_width() == math.inf


@settings(max_examples=60, deadline=None)
@given(n=st.integers(6, 5000), confidence=st.sampled_from([0.9, 0.95, 0.99]))
def test_median_interval_ranks_match_the_binomial(n, confidence):
    """The ranks are the widest-inside ones with two binomial tails within 1 - confidence (scipy's binom)."""
    low, high = median_interval(list(range(1, n + 1)), confidence)
    alpha = 1 - confidence
    if math.isinf(low):
        assert 2 * binom.cdf(0, n, 0.5) > alpha
        return
    j = int(low)
    assert high == n + 1 - j
    assert 2 * binom.cdf(j - 1, n, 0.5) <= alpha + 1e-12
    assert j == n // 2 or 2 * binom.cdf(j, n, 0.5) > alpha - 1e-12


def test_median_interval_covers_the_true_median_at_its_confidence():
    rng = np.random.default_rng(4)
    hits = 0
    trials = 2000
    for _ in range(trials):
        low, high = median_interval(rng.exponential(1.0, size=25).tolist())
        hits += low <= math.log(2) <= high
    assert hits / trials >= 0.94
