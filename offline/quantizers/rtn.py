"""Round-to-nearest: asymmetric min-max quantization per (row, input group), block bit-widths.

For each row and group with b bits: the range [min(w, 0), max(w, 0)] (zero is always inside,
so the zero point is an exact integer code in range, as in GPTQ's min-max quantizer),
s = (max - min) / (2^b - 1), z = round(-min / s) clamped to [0, 2^b - 1],
q = clamp(round(w / s) + z, 0, 2^b - 1). A group whose range is 0 gets s = 1 (all codes = z).
The arithmetic is offline.quantizers.blockwise's, shared with AWQ (which adds clipping) and
GPTQ (which adds error feedback).

`clip="fisher"`: each (row, group)'s range is shrunk by the ratio (from a small grid, 1 included)
that minimises the Fisher-weighted squared error, sum F (w - q(w))^2, instead of taken whole.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from offline.quantizers.base import (LinearContext, QuantizedCodes, Quantizer, check_clip,
                                     register)
from offline.quantizers.blockwise import fisher_clipped_minmax, quantize_minmax
from sfmp_serve.format import LayerGeometry


@dataclass(frozen=True)
class RTNConfig:
    clip: str = "minmax"  # or "fisher": Fisher-weighted clipping of each group's range

    def __post_init__(self) -> None:
        check_clip(self)


@register
class RTNQuantizer(Quantizer):
    """The `rtn` method: no calibration inputs (the Fisher diagonal with clip=fisher)."""

    name = "rtn"
    Config = RTNConfig

    def quantize(self, weight: torch.Tensor, block_bits: torch.Tensor,
                 geometry: LayerGeometry, context: LinearContext) -> QuantizedCodes:
        if self.needs_fisher:
            return fisher_clipped_minmax(weight, self.target_fisher(context), block_bits,
                                         geometry)
        return quantize_minmax(weight, block_bits, geometry)
