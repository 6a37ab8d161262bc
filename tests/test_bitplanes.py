"""Bit-plane packing: bit-exact round trips for every bit-width, odd shapes and ragged blocks."""

import pytest
import torch

from sfmp_serve.bitplanes import (bcq_scales, iter_blocks, pack_block, pack_linear,
                                  unpack_block_bits, unpack_codes)
from sfmp_serve.format import LayerGeometry

SHAPES = [(1, 1), (3, 31), (5, 32), (7, 33), (16, 100), (2, 129)]


def random_codes(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, (rows, cols), generator=gen).to(torch.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_block_round_trip(bits, shape):
    codes = random_codes(*shape, bits)
    words = pack_block(codes, bits)
    assert words.dtype == torch.int32
    assert tuple(words.shape) == (bits, -(-shape[1] // 32), shape[0])
    planes = unpack_block_bits(words, shape[1])
    rebuilt = sum(planes[i].to(torch.int64) << i for i in range(bits))
    assert torch.equal(rebuilt.to(torch.uint8), codes)


def test_padding_bits_are_zero_and_bit31_is_the_sign():
    codes = torch.full((1, 33), 1, dtype=torch.uint8)  # 33 inputs: one word + 1 bit
    words = pack_block(codes, 1)
    assert words[0, 0, 0] == -1  # all 32 bits set: two's complement -1
    assert words[0, 1, 0] == 1  # only input 32 set, the 31 padding bits are zero


@pytest.mark.parametrize("bits", range(1, 9))
def test_bcq_scales_reproduce_asymmetric_dequantization(bits):
    q = torch.arange(2 ** bits, dtype=torch.int64)
    scale = torch.full_like(q, 0.37, dtype=torch.float64)
    zero = torch.full_like(q, (2 ** bits - 1) // 3, dtype=torch.float64)
    alpha, beta = bcq_scales(scale, zero, torch.full_like(q, bits))
    signs = torch.stack([((q >> i) & 1) * 2 - 1 for i in range(bits)]).to(torch.float64)
    bcq = (alpha * (signs * (2.0 ** torch.arange(bits))[:, None]).sum(0)) + beta
    assert torch.allclose(bcq, scale * (q - zero), atol=1e-12)


@pytest.mark.parametrize("shape", [(37, 45), (8, 16), (1, 7), (50, 129)])
def test_pack_linear_round_trip_with_mixed_block_bits(shape):
    n, k = shape
    geo = LayerGeometry(n, k, group_size=16, block_rows=8)
    gen = torch.Generator().manual_seed(1)
    block_bits = torch.randint(1, 9, (geo.n_block_rows, geo.n_groups), generator=gen).to(
        torch.uint8)
    maxq = (2 ** block_bits.to(torch.int64).repeat_interleave(geo.rows(), 0)
            .repeat_interleave(geo.cols(), 1)) - 1
    codes = (torch.rand(n, k, generator=gen) * (maxq + 1)).floor().clamp(max=maxq).to(
        torch.uint8)
    qweight, offsets = pack_linear(codes, block_bits, geo)
    expected_offsets, total = geo.offsets(block_bits)
    assert qweight.numel() == total and torch.equal(offsets.to(torch.int64), expected_offsets)
    assert torch.equal(unpack_codes(qweight, block_bits, offsets, geo), codes)
    seen = sum(nr * nc for _, nr, _, nc, _, _ in iter_blocks(qweight, block_bits, offsets, geo))
    assert seen == n * k  # the ragged blocks tile the matrix exactly
