"""Exchange proposals (solver/exchange.py) against a brute-force enumeration of the same moves."""

import itertools

import numpy as np
import pytest

from onnx_lowrank.solver.exchange import MAX_DOWN, Ladder, Move, apply, moves, total_cost


def _ladders(rng, n):
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 6))
        costs = np.cumsum(rng.uniform(0.5, 5.0, size=k + 1)) - 100.0  # rising costs, whole the dearest
        out.append(Ladder(tuple(range(1, k + 1)) + (None,), tuple(float(c) for c in costs)))
    return out


def _brute(ladders, at, budget, gain, loss):
    """Every state one move away, built from the definition: a single down where it lowers the damage, a
    single up within the budget, an up paid by the fewest down steps (<= MAX_DOWN) of another layer."""
    found = {}
    for b in range(len(ladders)):
        if at[b] > 0 and loss[b] is not None and loss[b] < 0:
            found[(None, b)] = (1, -loss[b])
    for a, b in itertools.product(range(len(ladders)), [None, *range(len(ladders))]):
        if a == b or at[a] + 1 >= len(ladders[a].options) or gain[a] is None:
            continue
        for k in ([0] if b is None else range(1, MAX_DOWN + 1)):
            if b is not None and (k > at[b] or loss[b] is None):
                break
            state = list(at)
            state[a] += 1
            if b is not None:
                state[b] -= k
            if total_cost(ladders, state) <= budget + 1e-9:
                found[(a, b)] = (k, gain[a] - (k * loss[b] if b is not None else 0.0))
                break
    return found


@pytest.mark.parametrize("seed", range(30))
def test_moves_are_the_brute_force_set_within_budget_best_first(seed):
    rng = np.random.default_rng(seed)
    ladders = _ladders(rng, int(rng.integers(2, 6)))
    at = [int(rng.integers(0, len(lad.options))) for lad in ladders]
    budget = total_cost(ladders, at) + float(rng.uniform(-1.0, 3.0))
    gain = [None if rng.random() < 0.2 else float(rng.normal()) for _ in ladders]
    loss = [None if rng.random() < 0.2 else float(rng.normal()) for _ in ladders]
    got = moves(ladders, at, budget, gain, loss)
    assert {(m.up, m.down): (m.steps, m.predicted) for m in got} == pytest.approx(_brute(ladders, at, budget, gain,
                                                                                          loss))
    for m in got:
        new = apply(at, m)
        assert all(0 <= k < len(lad.options) for k, lad in zip(new, ladders))
        if m.up is not None:  # a move that spends cost stays within the budget
            assert total_cost(ladders, new) <= budget + 1e-9
        else:
            assert total_cost(ladders, new) < total_cost(ladders, at)
    assert [m.predicted for m in got] == sorted((m.predicted for m in got), reverse=True)


def test_pair_pays_with_the_fewest_steps():
    small = Ladder((8, 16, None), (-10.0, -8.0, 0.0))    # up from 16 to whole adds 8
    big = Ladder((16, 32, 48, 64, None), (-40.0, -35.0, -30.0, -25.0, 0.0))  # each step down saves 5
    (m,) = [m for m in moves([small, big], [1, 3], -33.0, [1.0, None], [None, 0.1]) if m.up == 0]
    assert (m.down, m.steps) == (1, 2) and m.predicted == pytest.approx(0.8)


def test_describe_names_the_layers():
    assert Move(0, 1, 2, 0.5).describe(["a", "b"]) == "a up, b down 2"
    assert Move(None, 1, 1, 0.5).describe(["a", "b"]) == "b down 1"
