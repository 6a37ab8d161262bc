"""Shared block-wise math for the calibrated quantizers (AWQ, GPTQ): per-(row, group) asymmetric
min-max parameters with per-row bit-widths, a fake-quantizer of a whole reordered matrix, and
the plan (permutations + block bits) of one linear.

All functions are pure and vectorised over rows; groups are the SFMP groups of the *reordered*
matrix (LayerGeometry), so the last one may be ragged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offline.quantizers.base import QuantizedCodes, row_group_bits
from sfmp_serve.format import LayerGeometry


def max_code(bits: torch.Tensor) -> torch.Tensor:
    """2^b - 1 as float32 (the largest code of a b-bit group), same shape as `bits`."""
    return (2.0 ** bits.to(torch.float32)) - 1.0


def minmax_params(wmin: torch.Tensor, wmax: torch.Tensor,
                  maxq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, zero) of a range, the same convention as the RTN quantizer.

    The range is widened to contain 0 (so the zero point is an exact code in range, as in
    GPTQ's min-max quantizer): scale = (max - min) / maxq (1 for an all-zero range),
    zero = round(-min / scale) clamped to [0, maxq].
    """
    lo, hi = wmin.clamp(max=0), wmax.clamp(min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.minimum(torch.round(-lo / scale).clamp(min=0), maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   maxq: torch.Tensor) -> torch.Tensor:
    """Integer codes (float) of w given broadcastable scale/zero/maxq."""
    q = torch.round(w / scale).add_(zero).clamp_(min=0)
    return torch.minimum(q, maxq)


def group_slices(geometry: LayerGeometry) -> list[tuple[int, int]]:
    """(start, end) column range of every group of the reordered matrix."""
    ends = torch.cumsum(geometry.cols(), 0).tolist()
    return [(e - c, e) for e, c in zip(ends, geometry.cols().tolist())]


def grouped(w: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """[N, K] -> [N, n_groups, group_size]; a ragged group (the last of each tensor-parallel
    range) is padded by repeating its last column, which changes neither its min nor its max."""
    if geometry.col_ranges > 1:
        part = geometry.part()
        return torch.cat([grouped(c, part) for c in w.split(part.in_features, dim=1)], dim=1)
    n, k = w.shape
    pad = geometry.n_groups * geometry.group_size - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, geometry.n_groups, geometry.group_size)


def ungrouped(g: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """Inverse of `grouped`: [N, n_groups, group_size] -> [N, K], padding dropped."""
    if geometry.col_ranges > 1:
        part = geometry.part()
        return torch.cat([ungrouped(c, part) for c in g.split(part.n_groups, dim=1)], dim=1)
    return g.flatten(1)[:, :geometry.in_features]


# Clip ratios tried by the Fisher-weighted clipping: 1.0 (plain min-max) is always one of them,
# so the chosen range never has a larger weighted error than no clipping.
FISHER_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def weighted_clip_params(w: torch.Tensor, fisher: torch.Tensor, maxq: torch.Tensor,
                         grid: tuple[float, ...] = FISHER_CLIP_GRID,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, zero, error) of the clip ratio that minimises sum fisher * (w - q(w))^2.

    w, fisher: [..., C] (the last dimension is one group's inputs); maxq: [...]. Each ratio
    shrinks the group's [min, max] before the min-max parameters are taken (as AWQ's clipping
    does); the Fisher diagonal weighs each weight's squared error by how much it moves the
    loss, so an outlier that matters keeps its range and one that does not is clipped (FGMP's
    sensitivity-weighted clipping)."""
    wmin, wmax, m = w.amin(-1), w.amax(-1), maxq[..., None]
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for ratio in grid:
        scale, zero = minmax_params(wmin * ratio, wmax * ratio, maxq)
        deq = (quantize_codes(w, scale[..., None], zero[..., None], m) - zero[..., None])
        err = (fisher * (w - deq * scale[..., None]) ** 2).sum(-1)
        if best is None:
            best = (scale, zero, err)
        else:
            better = err < best[2]
            best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]),
                    torch.where(better, err, best[2]))
    return best


def grouped_fisher(fisher: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """A reordered Fisher diagonal [N, K] as [N, n_groups, group_size] (float32), like
    `grouped`, except that padding columns (which repeat a real one there) weigh nothing."""
    if geometry.col_ranges > 1:
        part = geometry.part()
        return torch.cat([grouped_fisher(c, part)
                          for c in fisher.split(part.in_features, dim=1)], dim=1)
    f = torch.zeros(fisher.shape[0], geometry.n_groups * geometry.group_size,
                    dtype=torch.float32, device=fisher.device)
    f[:, :geometry.in_features] = fisher.to(torch.float32)
    return f.view(fisher.shape[0], geometry.n_groups, geometry.group_size)


def fisher_clipped_minmax(weight: torch.Tensor, fisher: torch.Tensor, block_bits: torch.Tensor,
                          geometry: LayerGeometry,
                          grid: tuple[float, ...] = FISHER_CLIP_GRID) -> QuantizedCodes:
    """Round to nearest with each (row, group)'s range clipped by `weighted_clip_params`.
    weight, fisher: reordered [N, K]."""
    groups = grouped(weight.to(torch.float32), geometry)
    maxq = max_code(row_group_bits(block_bits, geometry)).to(groups.device)  # [N, n_groups]
    scale, zero, _ = weighted_clip_params(groups, grouped_fisher(fisher, geometry), maxq, grid)
    codes = quantize_codes(groups, scale[..., None], zero[..., None], maxq[..., None])
    return QuantizedCodes(codes=ungrouped(codes, geometry).to(torch.uint8), scale=scale,
                          zero=zero)


def quantize_minmax(weight: torch.Tensor, block_bits: torch.Tensor, geometry: LayerGeometry,
                    shrink: torch.Tensor | None = None) -> QuantizedCodes:
    """Min-max quantization of a reordered [N, K] weight with its block bits.

    `shrink` [N, n_groups] (optional, in (0, 1]) scales each group's min and max: AWQ's
    clipping. Without it this is plain round-to-nearest with the block bit-widths.
    """
    groups = grouped(weight.to(torch.float32), geometry)
    maxq = max_code(row_group_bits(block_bits, geometry)).to(groups.device)  # [N, n_groups]
    wmin, wmax = groups.amin(2), groups.amax(2)
    if shrink is not None:
        wmin, wmax = wmin * shrink, wmax * shrink
    scale, zero = minmax_params(wmin, wmax, maxq)
    codes = quantize_codes(groups, scale[..., None], zero[..., None], maxq[..., None])
    codes = ungrouped(codes, geometry).to(torch.uint8)
    return QuantizedCodes(codes=codes, scale=scale, zero=zero)


def dequantize_codes(q: QuantizedCodes, geometry: LayerGeometry) -> torch.Tensor:
    """The float32 reordered weight [N, K] that codes, scale and zero represent."""
    cols = geometry.cols().to(q.codes.device)
    scale = q.scale.repeat_interleave(cols, dim=1)
    zero = q.zero.repeat_interleave(cols, dim=1)
    return scale * (q.codes.to(torch.float32) - zero)


def fake_quantize(weight: torch.Tensor, block_bits: torch.Tensor,
                  geometry: LayerGeometry) -> torch.Tensor:
    """Round-trip a reordered weight through block-wise min-max quantization (float32)."""
    groups = grouped(weight.to(torch.float32), geometry)
    maxq = max_code(row_group_bits(block_bits, geometry)).to(groups.device)[..., None]
    scale, zero = minmax_params(groups.amin(2, keepdim=True), groups.amax(2, keepdim=True),
                                maxq)
    deq = quantize_codes(groups, scale, zero, maxq).sub_(zero).mul_(scale)
    return ungrouped(deq, geometry)


@dataclass(frozen=True)
class LinearPlan:
    """How one linear is quantized: its permutations (int64) and block bit table.

    Reordered weight = W[output_perm][:, input_perm]; reordered input = x[..., input_perm].
    """

    input_perm: torch.Tensor
    output_perm: torch.Tensor
    block_bits: torch.Tensor
    geometry: LayerGeometry

    def reorder(self, weight: torch.Tensor) -> torch.Tensor:
        return weight[self.output_perm.to(weight.device)][:, self.input_perm.to(weight.device)]

    def reorder_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.input_perm.to(x.device)]

    def restore(self, weight_r: torch.Tensor) -> torch.Tensor:
        """Inverse of `reorder`: the [N, K] matrix in the original row and column order."""
        out = torch.empty_like(weight_r)
        rows = self.output_perm.to(weight_r.device)[:, None]
        out[rows, self.input_perm.to(weight_r.device)[None, :]] = weight_r
        return out
