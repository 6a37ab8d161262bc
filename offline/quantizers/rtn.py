"""Round-to-nearest: asymmetric min-max quantization per (row, input group), block bit-widths.

For each row and group with b bits: the range [min(w, 0), max(w, 0)] (zero is always inside,
so the zero point is an exact integer code in range, as in GPTQ's min-max quantizer),
s = (max - min) / (2^b - 1), z = round(-min / s) clamped to [0, 2^b - 1],
q = clamp(round(w / s) + z, 0, 2^b - 1). A group whose range is 0 gets s = 1 (all codes = z).
"""

from __future__ import annotations

import torch

from offline.quantizers.base import LinearContext, QuantizedCodes, row_group_bits
from sfmp_serve.format import LayerGeometry


def minmax_quantize(w: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """w float32 [N, C] (one group), bits int64 [N] -> codes, scale [N], zero [N]."""
    maxq = (2.0 ** bits.to(torch.float32) - 1)
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.minimum(torch.round(-lo / scale).clamp(min=0), maxq)
    codes = torch.minimum((torch.round(w / scale[:, None]) + zero[:, None]).clamp(min=0),
                          maxq[:, None])
    return codes.to(torch.uint8), scale, zero


class RTNQuantizer:
    """Quantizer protocol: no calibration inputs needed."""

    name = "rtn"

    def quantize(self, weight: torch.Tensor, block_bits: torch.Tensor,
                 geometry: LayerGeometry, context: LinearContext) -> QuantizedCodes:
        weight = weight.to(torch.float32)
        bits = row_group_bits(block_bits, geometry)  # [N, n_groups]
        n, k = weight.shape
        codes = torch.empty(n, k, dtype=torch.uint8)
        scale = torch.empty(n, geometry.n_groups, dtype=torch.float32)
        zero = torch.empty_like(scale)
        c0 = 0
        for g, cols in enumerate(geometry.cols().tolist()):
            codes[:, c0:c0 + cols], scale[:, g], zero[:, g] = minmax_quantize(
                weight[:, c0:c0 + cols], bits[:, g])
            c0 += cols
        return QuantizedCodes(codes, scale, zero)
