"""Perturbation policy (FGMP): how much each block's rounding error would cost, at each width.

The error of a block at width b is sum F_ij (w_ij - q_b(w)_ij)^2 over its weights, in the
reordered order, with q_b the quantizer's own rounding (min-max, or Fisher-weighted clipping
when the method clips that way). offline.allocation ranks the reductions these errors allow;
the salience policy's importance / (2^b - 1)^2 is the special case where the error of every
block shrinks with the width alike.
"""

from __future__ import annotations

import torch

from offline.allocation import BlockErrors, block_sums
from offline.quantizers.blockwise import (fake_quantize, grouped, grouped_fisher, max_code,
                                          weighted_clip_params)
from sfmp_serve.format import LayerGeometry


def block_errors(weight: torch.Tensor, fisher: torch.Tensor, widths: tuple[int, ...],
                 geometry: LayerGeometry, fisher_clip: bool = False) -> BlockErrors:
    """Errors of every block of one linear at each width; weight and fisher reordered [N, K]."""
    weight, fisher = weight.to(torch.float32), fisher.to(torch.float32)
    rows = geometry.row_block_index()
    if fisher_clip:  # the same groups at every width
        w_groups, f_groups = grouped(weight, geometry), grouped_fisher(fisher, geometry)
    out = []
    for bits in widths:
        if fisher_clip:
            maxq = max_code(torch.full(w_groups.shape[:2], bits))
            _, _, err = weighted_clip_params(w_groups, f_groups, maxq)
            out.append(torch.zeros(geometry.n_block_rows, geometry.n_groups,
                                   dtype=torch.float64).index_add_(0, rows, err.double()))
        else:
            table = torch.full((geometry.n_block_rows, geometry.n_groups), bits,
                               dtype=torch.uint8)
            delta = weight - fake_quantize(weight, table, geometry)
            out.append(block_sums(fisher * delta * delta, geometry))
    return BlockErrors(tuple(widths), torch.stack(out))
