"""Random packed linears built from first principles (codes, scale, zero), for format and op tests."""

from __future__ import annotations

import torch

from sfmp_serve.bitplanes import bcq_scales, pack_linear
from sfmp_serve.format import LayerGeometry, PackedLinear, SFMPConfig


def make_config(group_size: int = 16, block_rows: int = 8,
                bit_choices: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8),
                act_dtype: str = "float32", modules: tuple[str, ...] = ("lin",)) -> SFMPConfig:
    return SFMPConfig(group_size=group_size, block_rows=block_rows, bit_choices=bit_choices,
                      avg_bits=4.0, bits_per_weight=5.0, act_dtype=act_dtype,
                      quantized_modules=modules, input_groups=(("lin",),))


def confined_perm(length: int, ranges: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation that keeps every entry inside its range (tensor-parallel ranges)."""
    size = length // ranges
    return torch.cat([torch.randperm(size, generator=gen) + i * size
                      for i in range(ranges)]).to(torch.int32)


def random_packed(n: int, k: int, config: SFMPConfig, seed: int = 0,
                  bias: bool = False, ranges: tuple[int, int] = (1, 1),
                  ) -> tuple[PackedLinear, torch.Tensor]:
    """A PackedLinear with random block bits, codes, scales and permutations (inside their
    tensor-parallel `ranges`), plus the reordered weight it represents (float64:
    scale * (code - zero))."""
    gen = torch.Generator().manual_seed(seed)
    geo = LayerGeometry(n, k, config.group_size, config.block_rows, *ranges)
    choices = torch.tensor(config.bit_choices)
    block_bits = choices[torch.randint(0, len(choices), (geo.n_block_rows, geo.n_groups),
                                       generator=gen)].to(torch.uint8)
    bits = block_bits.to(torch.int64).repeat_interleave(geo.rows(), 0)  # [n, groups]
    col_bits = bits.repeat_interleave(geo.cols(), 1)  # [n, k]
    maxq = 2 ** col_bits - 1
    codes = (torch.rand(n, k, generator=gen, dtype=torch.float64) * (maxq + 1)).floor()
    codes = codes.clamp(max=maxq).to(torch.uint8)
    scale = torch.rand(n, geo.n_groups, generator=gen, dtype=torch.float64) * 0.1 + 0.01
    zero = (torch.rand(n, geo.n_groups, generator=gen, dtype=torch.float64)
            * (2 ** bits - 1)).round()
    qweight, offsets = pack_linear(codes, block_bits, geo)
    alpha, beta = bcq_scales(scale, zero, bits)
    dtype = config.torch_act_dtype
    packed = PackedLinear(
        qweight=qweight, alpha=alpha.to(dtype), beta=beta.to(dtype), block_bits=block_bits,
        block_offsets=offsets, input_perm=confined_perm(k, ranges[1], gen),
        output_perm=confined_perm(n, ranges[0], gen),
        bias=torch.randn(n, generator=gen).to(dtype) if bias else None, ranges=ranges)
    weight = scale.repeat_interleave(geo.cols(), 1) * (
        codes.to(torch.float64) - zero.repeat_interleave(geo.cols(), 1))
    return packed, weight
