"""Round-to-nearest: asymmetric min-max quantization per (row, input group), block bit-widths.

For each row and group with b bits: the range [min(w, 0), max(w, 0)] (zero is always inside,
so the zero point is an exact integer code in range, as in GPTQ's min-max quantizer),
s = (max - min) / (2^b - 1), z = round(-min / s) clamped to [0, 2^b - 1],
q = clamp(round(w / s) + z, 0, 2^b - 1). A group whose range is 0 gets s = 1 (all codes = z).
The arithmetic is offline.quantizers.blockwise's, shared with AWQ (which adds clipping) and
GPTQ (which adds error feedback).
"""

from __future__ import annotations

import torch

from offline.quantizers.base import LinearContext, QuantizedCodes, Quantizer, register
from offline.quantizers.blockwise import quantize_minmax
from sfmp_serve.format import LayerGeometry


@register
class RTNQuantizer(Quantizer):
    """The `rtn` method: no arguments, no calibration inputs."""

    name = "rtn"

    def quantize(self, weight: torch.Tensor, block_bits: torch.Tensor,
                 geometry: LayerGeometry, context: LinearContext) -> QuantizedCodes:
        return quantize_minmax(weight, block_bits, geometry)
