"""The multiple-choice knapsack allocators against brute force on small random instances."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.solver.allocation import (AllocationError, allocate, allocate_dp, allocate_lagrangian,
                                            total)


def brute_force(layers, budget):
    best = None
    for choice in itertools.product(*[range(len(o)) for o in layers]):
        c, d = total(layers, choice)
        if c <= budget + 1e-9 * max(1.0, abs(budget)) and (best is None or d < best):
            best = d
    return best


int_option = st.tuples(st.integers(0, 12), st.floats(0, 10, allow_nan=False, allow_infinity=False))
# Costs on a grid of 0.01 (FLOPs and milliseconds have limited precision); damages any float.
float_option = st.tuples(st.integers(0, 500).map(lambda v: v / 100),
                         st.floats(0, 10, allow_nan=False, allow_infinity=False))


def instance(option):
    return st.lists(st.lists(option, min_size=1, max_size=4), min_size=1, max_size=4).flatmap(
        lambda layers: st.tuples(st.just(layers), st.integers(
            round(100 * sum(min(c for c, _ in o) for o in layers)),
            round(100 * sum(max(c for c, _ in o) for o in layers)) + 100).map(lambda v: v / 100)))


@settings(max_examples=300, deadline=None)
@given(instance(int_option))
def test_dp_is_exact_on_integer_costs(case):
    layers, budget = case
    choice = allocate_dp(layers, budget, unit=1.0)
    cost, damage = total(layers, choice)
    assert cost <= budget + 1e-9
    assert damage == pytest.approx(brute_force(layers, budget), abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(instance(float_option), st.integers(5, 200))
def test_dp_fits_and_beats_the_optimum_of_a_slightly_smaller_budget(case, resolution):
    layers, budget = case
    choice = allocate_dp(layers, budget, resolution=resolution)
    cost, damage = total(layers, choice)
    assert cost <= budget + 1e-9
    assert damage >= brute_force(layers, budget) - 1e-9
    slack = budget - sum(min(c for c, _ in o) for o in layers)
    smaller = budget - len(layers) * slack / resolution
    reference = brute_force(layers, smaller)
    if reference is not None:
        assert damage <= reference + 1e-9


@settings(max_examples=300, deadline=None)
@given(instance(float_option))
def test_lagrangian_fits_and_is_never_better_than_optimal(case):
    layers, budget = case
    choice = allocate_lagrangian(layers, budget)
    cost, damage = total(layers, choice)
    assert cost <= budget + 1e-9
    assert damage >= brute_force(layers, budget) - 1e-9


def test_lagrangian_is_optimal_at_a_hull_budget():
    # Hand-derived: the cheapest damage per cost saved is layer 1 (1 per unit), then layer 0 (2 per unit).
    layers = [[(10, 0.0), (8, 4.0), (6, 9.0)], [(10, 0.0), (5, 5.0)]]
    assert allocate_lagrangian(layers, 15) == [0, 1]
    assert allocate_lagrangian(layers, 13) == [1, 1]
    assert allocate(layers, 13) == [1, 1]


def test_dp_prefers_the_cheaper_option_on_a_tie():
    layers = [[(10, 1.0), (5, 1.0)]]
    assert allocate_dp(layers, 10, unit=1.0) == [1]


def test_impossible_budget():
    with pytest.raises(AllocationError) as err:
        allocate([[(3, 0.0), (2, 1.0)], [(4, 0.0)]], 5.5)
    assert err.value.min_cost == 6

