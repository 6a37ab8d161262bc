"""Perturbation policy (FGMP) and Fisher-weighted clipping: the ranking, its optimality on
small problems, the salience policy as its special case, and clipping never adding error."""

import itertools

import pytest
import torch

from offline import allocation as alloc
from offline.perturbation import block_errors
from offline.quantizers.blockwise import (fake_quantize, fisher_clipped_minmax, grouped,
                                          max_code, minmax_params, quantize_codes,
                                          weighted_clip_params)
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import LayerGeometry

GEO = LayerGeometry(16, 32, 16, 8)  # 2 x 2 blocks of 8 x 16


def test_a_block_that_rounds_exactly_yields_its_bits_to_one_that_does_not():
    """Block 0 has 10x the Fisher of block 1 but its weights sit on a 2-bit grid: salience
    gives it the high width, perturbation gives it to the block whose error it removes."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen)
    w[:8, :16] = torch.randint(0, 4, (8, 16), generator=gen).float() * 0.5  # exact at 2 bits
    w[:8, :16][:, 0] = torch.tensor([0.0, 1.5] * 4)  # every row spans the whole 2-bit range
    fisher = torch.ones(16, 32)
    fisher[:8, :16] = 10.0
    sizes = {"w": alloc.block_sizes(GEO)}
    target = 2.25  # one of four blocks at 3 bits
    salience = alloc.allocate({"w": alloc.block_sums(fisher, GEO)}, sizes, target, (2, 3))
    errors = block_errors(w, fisher, (2, 3), GEO)
    assert errors.errors[0, 0, 0] < 1e-9  # nothing to gain from more bits
    perturbation = alloc.allocate({"w": errors}, sizes, target, (2, 3))
    assert salience.block_bits["w"][0, 0] == 3
    assert perturbation.block_bits["w"][0, 0] == 2
    gain = errors.errors[0] - errors.errors[1]
    assert perturbation.block_bits["w"].flatten().argmax() == gain.flatten().argmax()


def test_equal_salience_the_block_with_the_larger_range_gets_the_high_width():
    """The issue's constructed case: two blocks, equal Fisher, one with 8x the range. Salience
    cannot tell them apart (a tie keeps model order); perturbation upgrades the wide block."""
    geo = LayerGeometry(8, 32, 16, 8)  # blocks (0, 0) and (0, 1)
    gen = torch.Generator().manual_seed(2)
    w = torch.rand(8, 32, generator=gen) - 0.5
    w[:, 16:] *= 8
    fisher = torch.ones(8, 32)
    sizes = {"w": alloc.block_sizes(geo)}
    salience = alloc.allocate({"w": alloc.block_sums(fisher, geo)}, sizes, 3.5, (3, 4))
    assert salience.block_bits["w"].tolist() == [[4, 3]]  # the tie: first in model order
    errors = block_errors(w, fisher, (3, 4), geo)
    perturbation = alloc.allocate({"w": errors}, sizes, 3.5, (3, 4))
    assert perturbation.block_bits["w"].tolist() == [[3, 4]]


def random_errors(seed: int, n_blocks: int, choices: tuple[int, ...]) -> torch.Tensor:
    """[C, n_blocks] errors decreasing in the width, some on a convex hull and some not."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(n_blocks, generator=gen, dtype=torch.float64).mul(6).exp()
    decay = torch.rand(len(choices), n_blocks, generator=gen, dtype=torch.float64) + 0.05
    return scale * decay.sort(0, descending=True).values.cumprod(0)


def brute_force(errors, size, choices, avg_limit):
    """Smallest total error among all assignments with an average of at most avg_limit."""
    width = torch.tensor(choices, dtype=torch.float64)
    best = float("inf")
    for levels in itertools.product(range(len(choices)), repeat=errors.shape[1]):
        lv = torch.tensor(levels)
        avg = float((width[lv] * size).sum() / size.sum())
        if avg <= avg_limit + 1e-12:
            best = min(best, float(errors[lv, torch.arange(len(levels))].sum()))
    return best


@pytest.mark.parametrize("choices,target", [((2, 3), 2.5), ((3, 4, 5), 4.0), ((2, 3, 4), 3.3)])
@pytest.mark.parametrize("seed", range(6))
def test_error_ranking_is_near_the_brute_force_optimum(choices, target, seed):
    n = 9 if len(choices) == 3 else 12
    errors = random_errors(seed, n, choices)
    size = torch.ones(n, dtype=torch.float64)
    bits = alloc._by_error(errors, size, target, choices)
    level = torch.tensor([choices.index(int(b)) for b in bits])
    avg = float(torch.tensor(choices, dtype=torch.float64)[level].mean())
    assert abs(avg - target) <= 1 / n  # within one block of the target
    ours = float(errors[level, torch.arange(n)].sum())
    optimum = brute_force(errors, size, choices, avg)
    assert ours == pytest.approx(optimum, rel=1e-12)


@pytest.mark.parametrize("target", [2.5, 3.25])
def test_salience_objective_is_the_special_case(target):
    """With errors = importance / (2^b - 1)^2 the perturbation ranking does at least as well
    on that objective as the salience policy's closed form (same average)."""
    gen = torch.Generator().manual_seed(3)
    geos = {"a": LayerGeometry(96, 200, 16, 8), "b": LayerGeometry(37, 45, 16, 8)}
    imp = {n: alloc.block_sums(torch.rand(g.out_features, g.in_features, generator=gen)
                               * torch.randn(g.out_features, 1, generator=gen).mul(2).exp(), g)
           for n, g in geos.items()}
    sizes = {n: alloc.block_sizes(g) for n, g in geos.items()}
    choices = (2, 3, 4)
    errors = {n: alloc.BlockErrors(choices, torch.stack([i.double() / (2 ** b - 1) ** 2
                                                         for b in choices]))
              for n, i in imp.items()}
    by_error = alloc.allocate(errors, sizes, target, choices)
    by_salience = alloc.allocate(imp, sizes, target, choices)

    def noise(a):
        return sum(float((imp[n].double() / (2.0 ** a.block_bits[n].double() - 1) ** 2).sum())
                   for n in imp)

    assert abs(by_error.avg_bits - target) <= 0.01
    assert by_error.avg_bits <= by_salience.avg_bits + 0.005
    assert noise(by_error) <= noise(by_salience) * 1.001


def test_errors_must_cover_the_choices():
    errors = alloc.BlockErrors((2, 3), torch.zeros(2, 1, 1, dtype=torch.float64))
    with pytest.raises(SFMPError, match=r"no errors measured at \[4\] bits"):
        alloc.allocate({"w": errors}, {"w": torch.ones(1, 1)}, 3.5, (3, 4))


def test_block_errors_are_fisher_weighted_rounding_errors():
    gen = torch.Generator().manual_seed(1)
    geo = LayerGeometry(20, 40, 16, 8)  # ragged in both directions
    w, fisher = torch.randn(20, 40, generator=gen), torch.rand(20, 40, generator=gen)
    errors = block_errors(w, fisher, (2, 4), geo)
    for i, bits in enumerate((2, 4)):
        table = torch.full((geo.n_block_rows, geo.n_groups), bits, dtype=torch.uint8)
        delta = w - fake_quantize(w, table, geo)
        torch.testing.assert_close(errors.errors[i], alloc.block_sums(fisher * delta ** 2, geo))
    assert (errors.errors[0] > errors.errors[1]).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fisher_clipping_never_adds_weighted_error(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 4, 32, generator=gen) * torch.randn(64, 4, 1, generator=gen).exp()
    w[:, :, 0] *= 8  # outliers: clipping pays off where their Fisher is small
    fisher = torch.rand(64, 4, 32, generator=gen) ** 4
    maxq = max_code(torch.full((64, 4), bits))
    scale, zero, err = weighted_clip_params(w, fisher, maxq)
    s0, z0 = minmax_params(w.amin(-1), w.amax(-1), maxq)
    q0 = (quantize_codes(w, s0[..., None], z0[..., None], maxq[..., None]) - z0[..., None])
    plain = (fisher * (w - q0 * s0[..., None]) ** 2).sum(-1)
    assert (err <= plain + 1e-6 * plain.abs()).all()
    assert (err < plain * 0.99).float().mean() > 0.2  # and clipping helps somewhere
    q = (quantize_codes(w, scale[..., None], zero[..., None], maxq[..., None]) - zero[..., None])
    torch.testing.assert_close((fisher * (w - q * scale[..., None]) ** 2).sum(-1), err)


def test_fisher_clipped_rtn_keeps_heavy_weights_and_ignores_padding():
    gen = torch.Generator().manual_seed(5)
    geo = LayerGeometry(16, 40, 16, 8)  # last group has 8 real columns and 8 padding
    w = torch.randn(16, 40, generator=gen)
    table = torch.full((geo.n_block_rows, geo.n_groups), 3, dtype=torch.uint8)
    fisher = torch.zeros(16, 40)
    fisher[:, :3] = 1.0  # only three columns matter: the range must serve them
    codes = fisher_clipped_minmax(w, fisher, table, geo)
    groups = grouped(w, geo)
    deq = (codes.codes.float().view(16, -1)[:, :16] - codes.zero[:, :1]) * codes.scale[:, :1]
    plain = fake_quantize(w, table, geo)[:, :16]
    err = ((deq - groups[:, 0]) ** 2 * fisher[:, :16]).sum()
    assert err <= ((plain - w[:, :16]) ** 2 * fisher[:, :16]).sum() + 1e-6
    assert codes.codes.shape == (16, 40)
    assert int(codes.codes.max()) <= 7
