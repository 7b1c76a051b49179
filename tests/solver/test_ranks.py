import itertools
import time

import numpy as np
import pytest

from onnx_lowrank.solver.ranks import (
    ConvShape,
    LayerCosts,
    RankSelectionError,
    candidate_ranks,
    log_energy,
    select_ranks,
    select_ranks_costed,
    speedup_to_budget,
    summarise,
)


def total_flops(layers, ranks, fixed=0.0):
    return fixed + sum(layer.flops_at(r) for layer, r in zip(layers, ranks))


def objective(spectra, ranks):
    return sum(log_energy(s, r) for s, r in zip(spectra, ranks))


def exhaustive(layers, spectra, budget, fixed=0.0, fixed_ranks=None):
    fixed_ranks = fixed_ranks or {}
    options = []
    for i, layer in enumerate(layers):
        if i in fixed_ranks:
            options.append([fixed_ranks[i]])
        else:
            options.append([None] + list(range(1, layer.break_even_rank() + 1)))
    best = None
    for ranks in itertools.product(*options):
        if total_flops(layers, ranks, fixed) <= budget:
            o = objective(spectra, ranks)
            if best is None or o > best[0]:
                best = (o, ranks)
    return best


def random_case(rng, n):
    layers = [
        ConvShape(
            int(rng.integers(1, 7)),
            int(rng.integers(1, 7)),
            int(rng.integers(1, 4)),
            int(rng.integers(1, 4)),
            int(rng.integers(1, 10)),
        )
        for _ in range(n)
    ]
    spectra = [np.sort(rng.exponential(size=layer.d) ** 2)[::-1] for layer in layers]
    return layers, spectra


# ---------------------------------------------------------------- cost model


def test_costs():
    s = ConvShape(c=64, d=128, kh=3, kw=3, positions=56 * 56)
    assert s.original_flops() == 2 * 128 * 64 * 9 * 3136
    assert s.factorised_flops(10) == 2 * (10 * 64 * 9 + 128 * 10) * 3136
    assert s.flops_at(None) == s.original_flops()
    be = s.break_even_rank()
    assert s.flops_at(be) == s.factorised_flops(be) < s.original_flops()
    assert s.flops_at(be + 1) == s.original_flops()
    assert s.flops_at(10_000) == s.original_flops()
    with pytest.raises(ValueError):
        s.flops_at(0)
    with pytest.raises(ValueError):
        ConvShape(0, 1, 1, 1, 1)


def test_break_even_brute_force():
    for c, d, kh, kw in itertools.product([1, 2, 3, 5, 16], [1, 2, 3, 7, 16, 33], [1, 2, 3], [1, 3, 5]):
        for positions in (1, 7):
            s = ConvShape(c, d, kh, kw, positions)
            brute = 0
            for r in range(0, d + 2):
                if s.factorised_flops(r) < s.original_flops():
                    brute = r
            assert s.break_even_rank() == brute, (c, d, kh, kw)
            # matches the spec formula d' < d c k^2 / (c k^2 + d)
            assert brute < d * c * kh * kw / (c * kh * kw + d) <= brute + 1
    assert ConvShape(3, 64, 3, 3, 0).break_even_rank() == 0
    # first layer with c = 3, d = 64, 3x3: 27 * 64 / 91 = 18.99, so break-even 18
    assert ConvShape(3, 64, 3, 3, 1).break_even_rank() == 18


def test_speedup_and_summarise():
    assert speedup_to_budget(1000, 4) == 250.0
    with pytest.raises(ValueError):
        speedup_to_budget(1000, 0)
    layers = [ConvShape(4, 8, 3, 3, 10), ConvShape(8, 8, 1, 1, 10)]
    before, after = summarise(layers, [2, None], fixed_flops=5)
    assert before == 5 + layers[0].original_flops() + layers[1].original_flops()
    assert after == 5 + layers[0].factorised_flops(2) + layers[1].original_flops()


# ---------------------------------------------------------------- selection


def test_budget_already_met_leaves_everything():
    layers = [ConvShape(4, 8, 3, 3, 10)] * 3
    spectra = [np.arange(8, 0, -1.0)] * 3
    before, _ = summarise(layers, [None] * 3)
    assert select_ranks(layers, spectra, before) == [None] * 3


def test_single_layer_exact():
    rng = np.random.default_rng(3)
    for _ in range(50):
        (layer,), (spec,) = random_case(rng, 1)
        be = layer.break_even_rank()
        if be < 1:
            continue
        for budget in np.linspace(layer.factorised_flops(1), layer.original_flops(), 7):
            (r,) = select_ranks([layer], [spec], budget)
            assert layer.flops_at(r) <= budget
            # optimum: the largest feasible rank (None counts as full)
            feasible = [x for x in [None] + list(range(be, 0, -1)) if layer.flops_at(x) <= budget]
            assert r == feasible[0]


def test_matches_exhaustive_on_tiny_cases():
    rng = np.random.default_rng(1)
    gaps = []
    for _ in range(150):
        layers, spectra = random_case(rng, int(rng.integers(2, 4)))
        before = sum(layer.original_flops() for layer in layers)
        least = sum(layer.flops_at(1) for layer in layers)
        budget = float(rng.uniform(least, before))
        ranks = select_ranks(layers, spectra, budget)
        assert total_flops(layers, ranks) <= budget
        for layer, r in zip(layers, ranks):
            assert r is None or 1 <= r <= layer.break_even_rank()
        best, _ = exhaustive(layers, spectra, budget)
        gap = best - objective(spectra, ranks)
        assert gap >= -1e-9  # exhaustive really is the optimum
        gaps.append(gap)
    gaps = np.array(gaps)
    assert (gaps < 1e-9).mean() >= 0.9  # greedy is usually exactly optimal
    assert np.median(gaps) < 1e-9
    assert gaps.max() < 0.5  # kept energy product never below ~60% of the optimum's


def test_textbook_greedy_meets_budget_too():
    rng = np.random.default_rng(5)
    for _ in range(50):
        layers, spectra = random_case(rng, 3)
        before = sum(layer.original_flops() for layer in layers)
        least = sum(layer.flops_at(1) for layer in layers)
        budget = float(rng.uniform(least, before))
        ranks = select_ranks(layers, spectra, budget, refine=False, lookahead=False)
        assert total_flops(layers, ranks) <= budget
        best, _ = exhaustive(layers, spectra, budget)
        assert objective(spectra, ranks) <= best + 1e-9


def test_greedy_optimal_for_identical_convex_layers():
    # Identical layers, same spectrum: equal step costs and increasing losses -> the
    # greedy spreads the cut evenly, which is optimal.
    layer = ConvShape(16, 8, 3, 3, 4)  # break-even 7
    spec = np.array([8, 7, 6, 5, 4, 3, 2, 1.0])
    layers, spectra = [layer] * 3, [spec] * 3
    budget = 3 * layer.factorised_flops(4) + layer.factorised_flops(1)  # total rank 13
    ranks = select_ranks(layers, spectra, budget)
    assert sorted(ranks) == [4, 4, 5]
    best, _ = exhaustive(layers, spectra, budget)
    assert objective(spectra, ranks) == pytest.approx(best)


def test_never_above_break_even_and_unchanged_when_no_saving():
    # c = 1, d = 1: nothing can save; 3x3 first layer: break-even 18.
    layers = [ConvShape(1, 1, 1, 1, 100), ConvShape(3, 64, 3, 3, 100), ConvShape(64, 64, 3, 3, 100)]
    rng = np.random.default_rng(0)
    spectra = [np.sort(rng.random(layer.d))[::-1] for layer in layers]
    before, _ = summarise(layers, [None] * 3)
    for s in (1.05, 1.5, 2, 4, 8):
        ranks = select_ranks(layers, spectra, before / s)
        assert ranks[0] is None
        for layer, r in zip(layers, ranks):
            assert r is None or 1 <= r <= layer.break_even_rank()
        assert total_flops(layers, ranks) <= before / s


def test_impossible_budget_raises_with_max_speedup():
    layers = [ConvShape(16, 32, 3, 3, 100), ConvShape(32, 32, 1, 1, 100)]
    spectra = [np.ones(32), np.ones(32)]
    fixed = 1000.0
    before = fixed + sum(layer.original_flops() for layer in layers)
    least = fixed + layers[0].factorised_flops(1) + layers[1].factorised_flops(1)
    max_speedup = before / least
    with pytest.raises(RankSelectionError) as info:
        select_ranks(layers, spectra, least - 1, fixed_flops=fixed)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.min_flops == least
    assert err.max_speedup == pytest.approx(max_speedup)
    assert f"{max_speedup:.3g}x" in str(err)
    # exactly the minimum is feasible: everything at rank 1
    assert select_ranks(layers, spectra, least, fixed_flops=fixed) == [1, 1]
    with pytest.raises(RankSelectionError):
        select_ranks(layers, spectra, speedup_to_budget(before, 1000), fixed_flops=fixed)


def test_fixed_ranks_respected():
    rng = np.random.default_rng(7)
    for _ in range(40):
        layers, spectra = random_case(rng, 3)
        fixed_ranks = {0: None}
        be1 = layers[1].break_even_rank()
        if be1 >= 1:
            fixed_ranks[1] = int(rng.integers(1, be1 + 1))
        fixed = float(rng.integers(0, 50))
        floor = fixed + total_flops(layers, [fixed_ranks.get(0), fixed_ranks.get(1), 1])
        top = fixed + total_flops(layers, [fixed_ranks.get(0), fixed_ranks.get(1), None])
        budget = float(rng.uniform(floor, top))
        ranks = select_ranks(layers, spectra, budget, fixed_flops=fixed, fixed_ranks=fixed_ranks)
        assert ranks[0] is None
        assert ranks[1] == fixed_ranks.get(1)
        assert total_flops(layers, ranks, fixed) <= budget
        best, _ = exhaustive(layers, spectra, budget, fixed, fixed_ranks)
        assert objective(spectra, ranks) == pytest.approx(best)  # one free layer: exact
        if floor > 0:
            with pytest.raises(RankSelectionError):
                select_ranks(layers, spectra, floor * 0.999 - 1, fixed_flops=fixed, fixed_ranks=fixed_ranks)


def test_fixed_rank_above_break_even_reported_unchanged():
    layers = [ConvShape(3, 64, 3, 3, 10), ConvShape(64, 64, 3, 3, 10)]
    spectra = [np.ones(64), np.ones(64)]
    before, _ = summarise(layers, [None, None])
    ranks = select_ranks(layers, spectra, before * 0.9, fixed_ranks={0: 40})
    assert ranks[0] is None
    with pytest.raises(ValueError):
        select_ranks(layers, spectra, before, fixed_ranks={5: None})


def test_zero_energy_tails_are_free_and_deterministic():
    layer = ConvShape(32, 16, 3, 3, 10)  # break-even 15
    spec_a = np.array([5.0, 3.0, 1.0] + [0.0] * 13)  # effective rank 3
    spec_b = np.linspace(16, 1, 16)
    layers, spectra = [layer, layer], [spec_a, spec_b]
    before, _ = summarise(layers, [None, None])
    budget = before - (layer.original_flops() - layer.factorised_flops(3))
    ranks = select_ranks(layers, spectra, budget)
    # Cutting layer 0 to rank 3 loses nothing: the optimum keeps layer 1 whole.
    assert objective(spectra, ranks) == pytest.approx(log_energy(spec_a, None) + log_energy(spec_b, None))
    assert ranks[1] is None
    assert ranks[0] is not None and ranks[0] >= 3
    assert select_ranks(layers, spectra, budget) == ranks
    # an all-zero layer is compressed first, for free
    zero = [np.zeros(16), spec_b]
    r = select_ranks(layers, zero, before - (layer.original_flops() - layer.factorised_flops(1)))
    assert r == [1, None]
    # ties broken by layer index: two identical layers, budget for exactly one jump
    r = select_ranks(layers, [spec_b, spec_b], before - (layer.original_flops() - layer.factorised_flops(15)))
    assert r == [15, None]


def test_spectrum_cleaning():
    layer = ConvShape(32, 4, 3, 3, 10)
    before = layer.original_flops()
    # unsorted, tiny negative round-off, short spectrum: all accepted
    for spec in ([1.0, 3.0, -1e-12, 2.0], [3.0, 2.0]):
        (r,) = select_ranks([layer], [np.array(spec)], before - 1)
        assert r is not None
    with pytest.raises(ValueError):
        select_ranks([layer], [np.ones(5)], before - 1)
    with pytest.raises(ValueError):
        select_ranks([layer], [np.array([1.0, np.nan, 0, 0])], before - 1)
    with pytest.raises(ValueError):
        select_ranks([layer], [], before)


def test_fast_on_large_model():
    rng = np.random.default_rng(0)
    layers, spectra = [], []
    for _ in range(100):
        d = int(rng.choice([256, 512, 1024, 2048]))
        c = int(rng.choice([256, 512, 1024, 2048]))
        k = int(rng.choice([1, 3]))
        layers.append(ConvShape(c, d, k, k, int(rng.choice([49, 196, 784]))))
        spectra.append(np.sort(rng.exponential(size=d) ** 3)[::-1])
    before, _ = summarise(layers, [None] * 100)
    t0 = time.perf_counter()
    for s in (2, 4, 8, 16):
        ranks = select_ranks(layers, spectra, before / s)
        assert total_flops(layers, ranks) <= before / s
        assert total_flops(layers, ranks) >= 0.99 * before / s
    assert time.perf_counter() - t0 < 4.0
    # greedy steps: the 16x run walks tens of thousands of ranks
    assert sum(layer.break_even_rank() for layer in layers) > 40_000


def test_error_is_user_facing_and_spectra_optional_for_fixed():
    from onnx_lowrank.errors import LowRankError

    layers = [ConvShape(1, 1, 1, 1, 5), ConvShape(16, 16, 3, 3, 5), ConvShape(16, 16, 3, 3, 5)]
    before, _ = summarise(layers, [None] * 3)
    with pytest.raises(LowRankError):
        select_ranks(layers, [None, None, np.ones(16)], 1.0, fixed_ranks={1: 2})
    ranks = select_ranks(layers, [None, None, np.ones(16)], before * 0.8, fixed_ranks={1: 2})
    assert ranks[1] == 2 and ranks[0] is None
    with pytest.raises(ValueError, match="no spectrum"):
        select_ranks(layers, [None, None, None], before * 0.5)


# ---------------------------------------------------------------- rank multiples and cost tables


def test_candidate_ranks_by_hand():
    assert candidate_ranks(50, 16) == [16, 32, 48]
    assert candidate_ranks(48, 16) == [16, 32, 48]
    assert candidate_ranks(15, 16) == []
    assert candidate_ranks(4, 1) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        candidate_ranks(10, 0)


def test_cost_table_keeps_only_ranks_that_pay():
    # rank 3 costs more than rank 4 (a block-size effect): never worth it; rank 5 is no cheaper than the original.
    c = LayerCosts.from_table(6, 10.0, {1: 2.0, 2: 4.0, 3: 7.0, 4: 6.0, 5: 10.0})
    assert c.ranks == (1, 2, 4)
    assert c.costs == (2.0, 4.0, 6.0)
    assert LayerCosts.from_table(6, 1.0, {1: 1.0, 2: 3.0}).ranks == ()


def _exhaustive_costed(tables, originals, spectra, budget, fixed=0.0):
    best = None
    for choice in itertools.product(*[[None] + sorted(t) for t in tables]):
        cost = fixed + sum(o if r is None else t[r] for r, t, o in zip(choice, tables, originals))
        if cost <= budget:
            o = objective(spectra, choice)
            if best is None or o > best[0]:
                best = (o, choice)
    return best


def _random_tables(rng, n):
    """Noisy, non-monotone cost tables (measured latencies look like this), some ranks not paying at all."""
    tables, originals, spectra = [], [], []
    for _ in range(n):
        d = int(rng.integers(2, 8))
        original = float(rng.uniform(1, 3))
        ranks = range(1, d)
        tables.append({r: float(original * (r / d + rng.uniform(-0.3, 0.4))) for r in ranks})
        originals.append(original)
        spectra.append(np.sort(rng.exponential(size=d) ** 2)[::-1])
    return tables, originals, spectra


def test_costed_greedy_bounded_by_brute_force():
    rng = np.random.default_rng(3)
    gaps = []
    for _ in range(150):
        tables, originals, spectra = _random_tables(rng, int(rng.integers(2, 4)))
        options = [LayerCosts.from_table(len(s), o, t) for t, o, s in zip(tables, originals, spectra)]
        fixed = float(rng.uniform(0, 2))
        least = fixed + sum(min([o] + list(t.values())) for t, o in zip(tables, originals))
        before = fixed + sum(originals)
        budget = float(rng.uniform(least, before))
        ranks = select_ranks_costed(options, spectra, budget, fixed, unit="ms")
        cost = fixed + sum(o if r is None else t[r] for r, t, o in zip(ranks, tables, originals))
        assert cost <= budget + 1e-12
        for r, t, o in zip(ranks, tables, originals):
            assert r is None or t[r] < o  # never a rank that does not pay
        best, _ = _exhaustive_costed(tables, originals, spectra, budget, fixed)
        gap = best - objective(spectra, ranks)
        assert gap >= -1e-9
        gaps.append(gap)
    gaps = np.array(gaps)
    assert (gaps < 1e-9).mean() >= 0.8
    assert gaps.max() < 1.0


def test_layer_kept_whole_when_no_rank_pays():
    spectra = [np.array([4.0, 2.0, 1.0, 0.5]), np.array([4.0, 2.0, 1.0, 0.5])]
    slow = LayerCosts.from_table(4, 1.0, {1: 1.2, 2: 1.5, 3: 2.0})
    fast = LayerCosts.from_table(4, 1.0, {1: 0.2, 2: 0.5, 3: 0.8})
    ranks = select_ranks_costed([slow, fast], spectra, 1.5, unit="ms")
    assert ranks[0] is None and ranks[1] in (1, 2)
    with pytest.raises(RankSelectionError) as info:
        select_ranks_costed([slow, fast], spectra, 1.1, unit="ms")
    assert info.value.max_speedup == pytest.approx(2.0 / 1.2)
    assert "ms" in str(info.value)


def test_rank_multiple_respected_and_bounded_by_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(60):
        layers = [ConvShape(int(rng.integers(4, 13)), int(rng.integers(4, 13)), 3, 3, int(rng.integers(1, 10)))
                  for _ in range(int(rng.integers(2, 4)))]
        spectra = [np.sort(rng.exponential(size=layer.d) ** 2)[::-1] for layer in layers]
        m = int(rng.integers(2, 5))
        options = [[None] + candidate_ranks(layer.break_even_rank(), m) for layer in layers]
        before = sum(layer.original_flops() for layer in layers)
        least = sum(layer.flops_at(o[1] if len(o) > 1 else None) for layer, o in zip(layers, options))
        budget = float(rng.uniform(least, before))
        ranks = select_ranks(layers, spectra, budget, multiple=m)
        assert total_flops(layers, ranks) <= budget
        for layer, r in zip(layers, ranks):
            assert r is None or (r % m == 0 and m <= r <= layer.break_even_rank())
        best = max(objective(spectra, c) for c in itertools.product(*options)
                   if total_flops(layers, c) <= budget)
        assert objective(spectra, ranks) <= best + 1e-9
        assert best - objective(spectra, ranks) < 1.0
