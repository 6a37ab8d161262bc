"""Random, valid SFMP tensors for tests of the serving path (no offline pipeline needed)."""

from __future__ import annotations

import torch

from sfmp_serve.bitplanes import bcq_scales, pack_linear
from sfmp_serve.format import LayerGeometry, PackedLinear, SFMPConfig


def sfmp_config(modules: tuple[str, ...] = ("layer",), group_size: int = 32, block_rows: int = 16,
                bit_choices: tuple[int, ...] = (2, 3, 4), act_dtype: str = "float32",
                input_groups: tuple[tuple[str, ...], ...] = ()) -> SFMPConfig:
    return SFMPConfig(group_size=group_size, block_rows=block_rows, bit_choices=bit_choices,
                      avg_bits=3.0, bits_per_weight=3.5, act_dtype=act_dtype,
                      quantized_modules=modules, input_groups=input_groups)


def random_packed(out_features: int, in_features: int, config: SFMPConfig,
                  generator: torch.Generator, input_perm: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None) -> PackedLinear:
    """Random block bits from config.bit_choices, random codes, scales and permutations.

    With `weight` [out, in], codes are min-max quantized from it instead (RTN, no reordering
    beyond the given permutations), so a model built from them still behaves like the original.
    """
    geo = LayerGeometry(out_features, in_features, config.group_size, config.block_rows)
    choices = torch.tensor(config.bit_choices, dtype=torch.uint8)
    block_bits = choices[torch.randint(len(choices), (geo.n_block_rows, geo.n_groups),
                                       generator=generator)]
    row_bits = block_bits.to(torch.int64).repeat_interleave(geo.rows(), 0)  # [N, G]
    col_group = torch.arange(geo.n_groups).repeat_interleave(geo.cols())  # [K]
    levels = (2 ** row_bits - 1)[:, col_group]  # [N, K]
    perm_in = input_perm if input_perm is not None else torch.randperm(in_features,
                                                                        generator=generator)
    perm_out = torch.randperm(out_features, generator=generator)
    if weight is None:
        codes = (torch.rand(out_features, in_features, generator=generator)
                 * (levels + 1)).floor().clamp(max=levels)
        scale = torch.rand(out_features, geo.n_groups, generator=generator) * 0.02 + 0.005
        zero = (torch.rand(out_features, geo.n_groups, generator=generator)
                * (2 ** row_bits - 1)).round()
    else:
        w = weight.to(torch.float64)[perm_out.long()][:, perm_in.long()]
        grouped = torch.split(w, geo.cols().tolist(), dim=1)
        lo = torch.stack([g.min(1).values for g in grouped], 1).clamp(max=0)
        hi = torch.stack([g.max(1).values for g in grouped], 1).clamp(min=0)
        scale = ((hi - lo) / (2 ** row_bits - 1)).clamp(min=1e-8)
        zero = (-lo / scale).round()
        codes = (w / scale[:, col_group] + zero[:, col_group]).round().clamp(min=0).minimum(levels)
    qweight, offsets = pack_linear(codes.to(torch.uint8), block_bits, geo)
    alpha, beta = bcq_scales(scale, zero, row_bits)
    dtype = config.torch_act_dtype
    return PackedLinear(qweight, alpha.to(dtype), beta.to(dtype), block_bits, offsets,
                        perm_in.to(torch.int32), perm_out.to(torch.int32))
