"""RTN: the codes reproduce per-(row, group) asymmetric min-max quantization at block bits."""

import torch

from offline.quantizers.base import LinearContext, row_group_bits
from offline.quantizers.rtn import RTNQuantizer
from sfmp_serve.format import LayerGeometry


def loop_minmax(w: torch.Tensor, bits: int):
    """One row-group, written out scalar by scalar."""
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    maxq = 2 ** bits - 1
    s = (hi - lo) / maxq if hi > lo else 1.0
    z = min(max(round(-lo / s), 0), maxq)
    q = [min(max(round(float(x) / s) + z, 0), maxq) for x in w]
    return q, s, z


def test_codes_match_minmax_loop_with_mixed_block_bits():
    n, k = 21, 45
    geo = LayerGeometry(n, k, group_size=16, block_rows=8)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen)
    weight[3, :16] += 2.0  # a group with min > 0: zero stays inside the range
    block_bits = torch.randint(1, 9, (geo.n_block_rows, geo.n_groups), generator=gen).to(
        torch.uint8)
    out = RTNQuantizer().quantize(weight, block_bits, geo, LinearContext())
    bits = row_group_bits(block_bits, geo)
    col0 = [0, 16, 32]
    for r in range(n):
        for g, c0 in enumerate(col0):
            cols = geo.cols()[g].item()
            q, s, z = loop_minmax(weight[r, c0:c0 + cols], int(bits[r, g]))
            assert out.codes[r, c0:c0 + cols].tolist() == q
            assert abs(out.scale[r, g].item() - s) <= 1e-6 * s
            assert out.zero[r, g].item() == z
    deq = out.scale.repeat_interleave(geo.cols(), 1) * (
        out.codes.float() - out.zero.repeat_interleave(geo.cols(), 1))
    bound = out.scale.repeat_interleave(geo.cols(), 1) / 2
    assert ((deq - weight).abs() <= bound + 1e-6).all()  # round to nearest


def test_constant_zero_group_is_exact():
    geo = LayerGeometry(2, 8, 8, 2)
    out = RTNQuantizer().quantize(torch.zeros(2, 8), torch.full((1, 1), 3, dtype=torch.uint8),
                                  geo, LinearContext())
    assert (out.scale == 1).all() and (out.codes == out.zero[:, :1].to(torch.uint8)).all()
