"""Search-free allocation: weight-counted averages, rankings, three levels, budgets, errors."""

import logging

import pytest
import torch

from offline import allocation as alloc
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import LayerGeometry

# Ragged shapes, small blocks: blocks of several sizes, many of them.
SHAPES = {"a": (96, 200), "b": (37, 45), "c": (200, 96), "d": (8, 8)}


def problem(seed=0, group_size=16, block_rows=8):
    gen = torch.Generator().manual_seed(seed)
    geos = {n: LayerGeometry(o, i, group_size, block_rows) for n, (o, i) in SHAPES.items()}
    # heavy-tailed salience with salient rows and columns, like a real Fisher diagonal
    imp = {n: alloc.block_sums(torch.rand(o, i, generator=gen)
                               * torch.randn(o, 1, generator=gen).mul(2).exp()
                               * torch.randn(1, i, generator=gen).mul(2).exp(), geos[n])
           for n, (o, i) in SHAPES.items()}
    sizes = {n: alloc.block_sizes(g) for n, g in geos.items()}
    return imp, sizes, geos


def flat(d):
    return torch.cat([d[n].flatten() for n in sorted(d)])


def weighted_avg(bits, sizes):
    return float((flat(bits).double() * flat(sizes)).sum() / flat(sizes).sum())


def noise(bits, imp):
    return float((flat(imp) / (2.0 ** flat(bits).double() - 1) ** 2).sum())


def test_block_sums_match_loops_with_ragged_edges():
    m = torch.rand(37, 45, dtype=torch.float64)
    geo = LayerGeometry(37, 45, 16, 8)
    sums = alloc.block_sums(m, geo)
    for r in range(geo.n_block_rows):
        for g in range(geo.n_groups):
            assert torch.isclose(sums[r, g], m[8 * r:8 * r + 8, 16 * g:16 * g + 16].sum())
    assert alloc.block_sizes(geo)[-1, -1] == 5 * 13
    assert int(alloc.block_sizes(geo).sum()) == 37 * 45


@pytest.mark.parametrize("target", [2.1, 3.25, 3.5, 3.9])
def test_two_levels_hit_target_counting_weights(target):
    imp, sizes, _ = problem()
    choices = alloc.resolve_choices(target, 2, None)
    a = alloc.allocate(imp, sizes, target, choices)
    assert a.bit_choices == choices
    assert abs(a.avg_bits - target) <= 0.01
    assert a.avg_bits == pytest.approx(weighted_avg(a.block_bits, sizes))
    bits, importance = flat(a.block_bits), flat(imp)
    # one global ranking: every high-bit block is at least as important as every low-bit one
    assert importance[bits == choices[1]].min() >= importance[bits == choices[0]].max()


def test_integer_target_is_one_level():
    imp, sizes, _ = problem()
    a = alloc.allocate(imp, sizes, 4.0, alloc.resolve_choices(4.0, 2, None))
    assert a.bit_choices == (4,) and a.avg_bits == 4.0
    assert all(bool((b == 4).all()) for b in a.block_bits.values())


@pytest.mark.parametrize("target", [2.5, 3.0, 3.25, 3.75])
def test_three_levels_hit_target_and_beat_two_levels(target):
    imp, sizes, _ = problem(seed=1)
    a = alloc.allocate(imp, sizes, target, (2, 3, 4))
    assert abs(a.avg_bits - target) <= 0.01
    bits, importance = flat(a.block_bits), flat(imp)
    for lo, hi in ((2, 3), (3, 4)):  # bits never decrease with importance
        if (bits == lo).any() and (bits == hi).any():
            assert importance[bits == hi].min() >= importance[bits == lo].max()
    # every floor/ceil two-level allocation is one point of the sweep: never worse
    two = alloc.allocate(imp, sizes, target, alloc.resolve_choices(target, 2, None))
    assert noise(a.block_bits, imp) <= noise(two.block_bits, imp) * (1 + 1e-9)


def test_three_levels_use_all_levels_on_skewed_salience():
    imp, sizes, _ = problem(seed=2)
    a = alloc.allocate(imp, sizes, 3.0, (2, 3, 4))
    assert set(flat(a.block_bits).unique().tolist()) == {2, 3, 4}


def test_three_levels_generalise_to_other_choices():
    imp, sizes, _ = problem(seed=3)
    a = alloc.allocate(imp, sizes, 4.4, (2, 4, 8))
    assert abs(a.avg_bits - 4.4) <= 0.01
    assert set(flat(a.block_bits).unique().tolist()) <= {2, 4, 8}


def test_coarse_blocks_warn_with_the_achieved_value(caplog):
    geo = LayerGeometry(8, 16, 16, 8)  # a single block
    imp = {"x": torch.ones(1, 1)}
    with caplog.at_level(logging.WARNING):
        a = alloc.allocate(imp, {"x": alloc.block_sizes(geo)}, 3.5, (3, 4))
    assert a.avg_bits in (3.0, 4.0)
    assert "achieved average" in caplog.text


def test_budget_picks_the_largest_fitting_target():
    imp, sizes, _ = problem()

    def at(t):
        return alloc.allocate(imp, sizes, t, alloc.resolve_choices(t, 2, None), warn=False)

    def size_of(a):  # bytes: bits of codes + a fixed overhead
        return 1000 + int((flat(a.block_bits).double() * flat(sizes)).sum()) // 8

    budget = size_of(at(3.4))
    best = alloc.fit_budget(budget, at, size_of, 2, 8)
    assert size_of(best) <= budget
    assert abs(best.avg_bits - 3.4) <= 0.01
    assert size_of(at(best.target_bits + 0.02)) > budget
    assert alloc.fit_budget(10 ** 9, at, size_of, 2, 8).avg_bits == 8
    with pytest.raises(SFMPError, match=r"too small.*needs \S+ GB \(\d+ bytes\)"):
        alloc.fit_budget(size_of(at(2)) - 1, at, size_of, 2, 8)


@pytest.mark.parametrize("call,match", [
    (lambda: alloc.resolve_choices(5.0, 3, (2, 3, 4)), r"outside the bit choices \[2, 4\]"),
    (lambda: alloc.resolve_choices(1.5, 2, (2, 3)), "outside"),
    (lambda: alloc.resolve_choices(9.0, 2, None), "1..8"),
    (lambda: alloc.resolve_choices(3.0, 3, (2, 4)), "2 choices, but --levels=3"),
    (lambda: alloc.resolve_choices(3.0, 4, None), "--levels=4"),
    (lambda: alloc.parse_bit_choices("2,x"), "integers"),
    (lambda: alloc.parse_bit_choices("0,3"), "1..8"),
    (lambda: alloc.check_block_shape(0, 8), "--group-size=0: must be a positive"),
    (lambda: alloc.check_block_shape(-8, 8), "--group-size=-8"),
    (lambda: alloc.check_block_shape(12, 8), "multiple of 8"),
    (lambda: alloc.check_block_shape(16, 0), "--block-rows=0"),
])
def test_bad_inputs(call, match):
    with pytest.raises(SFMPError, match=match):
        call()


def test_default_choices():
    assert alloc.default_choices(3.25, 2) == (3, 4)
    assert alloc.default_choices(3.25, 3) == (2, 3, 4)
    assert alloc.default_choices(8.0, 3) == (6, 7, 8)
    assert alloc.parse_bit_choices("4,2,3") == (2, 3, 4)


@pytest.mark.parametrize("target", [2.5, 3.25])
def test_three_level_sweep_is_near_the_brute_force_optimum(target):
    """All (top cut, bottom cut) pairs using no more bits than the sweep's answer."""
    imp, sizes, _ = problem(seed=4)
    a = alloc.allocate(imp, sizes, target, (2, 3, 4))
    order = torch.sort(flat(imp), descending=True, stable=True).indices
    i, s = flat(imp)[order], flat(sizes)[order].double()
    n, total = i.numel(), float(s.sum())
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), s.cumsum(0)])
    pre = torch.cat([torch.zeros(1, dtype=torch.float64), i.cumsum(0)])
    k3, k1 = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    valid = k3 + k1 <= n
    w3, w1 = cum[k3], total - cum[n - k1]
    avg = (4 * w3 + 3 * (total - w3 - w1) + 2 * w1) / total
    cost = pre[k3] / 225 + (pre[n - k1] - pre[k3]) / 49 + (pre[n] - pre[n - k1]) / 9
    ok = valid & (avg <= a.avg_bits + 1e-12) & (avg >= target - 0.01)
    assert noise(a.block_bits, imp) <= float(cost[ok].min()) * 1.01
