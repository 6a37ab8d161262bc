"""The quantizer contract every method (RTN, AWQ, GPTQ) implements.

A quantizer sees one linear in its *reordered* order (rows by descending salience, columns in
the shared input order) and the bit-width of every block; it returns integer codes and one
asymmetric (scale, zero) pair per row and input group. Packing into bit planes happens after,
in sfmp_serve.bitplanes, so no quantizer knows the storage format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sfmp_serve.errors import SFMPError
from sfmp_serve.format import LayerGeometry


@dataclass
class QuantizedCodes:
    codes: torch.Tensor  # uint8 [N, K], each in [0, 2^b - 1] for its block's b
    scale: torch.Tensor  # float32 [N, n_groups], > 0
    zero: torch.Tensor  # float32 [N, n_groups], integer-valued, in [0, 2^b - 1]


@dataclass
class LinearContext:
    """What a quantizer may use besides the weight (None where the method needs nothing)."""

    inputs: torch.Tensor | None = None  # calibration inputs [T, K], reordered columns

    def require_inputs(self, method: str) -> torch.Tensor:
        """The calibration inputs, for methods that cannot work without them."""
        if self.inputs is None:
            raise SFMPError(f"method {method} needs calibration inputs (run it through "
                            "offline.sequential)")
        return self.inputs


class Quantizer(Protocol):
    name: str

    def quantize(self, weight: torch.Tensor, block_bits: torch.Tensor,
                 geometry: LayerGeometry, context: LinearContext) -> QuantizedCodes:
        """weight: float32 [N, K] reordered; block_bits: uint8 [n_block_rows, n_groups]."""
        ...


def row_group_bits(block_bits: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """Bit-width of every (row, group), [N, n_groups] int64."""
    return block_bits.to(torch.int64).repeat_interleave(geometry.rows(), dim=0)
