"""AWQ with SFMP's block-wise mixed precision in the loop (pure math plus exact folding).

Lifecycle per decoder layer (driven by offline.sequential):
1. `prepare_layer`: for every smoothing mapping of the architecture (sfmp_serve/arch.py
   `smooth`), with the full-precision inputs X of the mapping's linears: search a per-input-
   channel scale s = mean|X|^r (normalised), r on a 20-point grid in [0, 1), that minimises the
   output error of the linears quantized *as SFMP will store them* (their permutations and block
   bit-widths, min-max per (row, group)). r = 0 is the identity, so scaling never loses on the
   calibration set. The best s is folded exactly: the linears' columns are multiplied by s, the
   preceding op (norm weight, or the previous linear's rows) divided by s. Mappings whose
   preceding op cannot absorb s exactly are skipped with a warning.
2. `quantize` (per linear, reordered): per-(row, group) clipping search, shrinking the group's
   [min, max] on a 20-point grid down to `max_shrink`, with the block's bit-width, minimising
   the group's contribution to the output error; then min-max codes from the clipped range.
Output errors are quadratic forms in the Gram matrix X^T X / T: exact over every calibration
token, and a candidate costs N x K x K instead of N x K x T.

The "module output" of a mapping is the concatenated output of its linears (not the whole
attention or MLP block): cheap, and the same objective for every architecture in the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from offline.quantizers.base import LinearContext, QuantizedCodes, row_group_bits
from offline.quantizers.blockwise import (LinearPlan, fake_quantize, grouped, max_code,
                                          minmax_params, quantize_codes, quantize_minmax)
from sfmp_serve.arch import ArchSpec, SmoothMapping
from sfmp_serve.format import LayerGeometry

log = logging.getLogger(__name__)


def gram(x: torch.Tensor) -> torch.Tensor:
    """G = X^T X / T (float32 [K, K]): mean squared output error of any dW is tr(dW G dW^T)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    return (x.t() @ x).div_(x.shape[0])


def quadratic_error(delta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared output error of a weight error [N, K]: diag(dW G dW^T)."""
    return ((delta @ g) * delta).sum(1)


def candidate_scales(x_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """AWQ's s = mean|x|^ratio, normalised so that max(s) * min(s) = 1."""
    s = x_mean.pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_output_error(g: torch.Tensor, weights: Sequence[torch.Tensor],
                        plans: Sequence[LinearPlan], scales: torch.Tensor) -> float:
    """Mean squared output error of the linears when W*s is block-quantized and divided by s
    (inputs summarised by their Gram matrix g; everything in the original order)."""
    return _reordered_error(*_reordered(g, weights, plans), scales)


def _reordered(g: torch.Tensor, weights: Sequence[torch.Tensor], plans: Sequence[LinearPlan],
               ) -> tuple[list[tuple[torch.Tensor, LinearPlan]], dict[int, torch.Tensor]]:
    """Weights and Grams in each linear's reordered order (one Gram per input order)."""
    linears = [(p.reorder(w.to(torch.float32)), p) for w, p in zip(weights, plans)]
    grams = {}
    for p in plans:
        if id(p.input_perm) not in grams:
            perm = p.input_perm.to(g.device)
            grams[id(p.input_perm)] = g[perm][:, perm]
    return linears, grams


def _reordered_error(linears: Sequence[tuple[torch.Tensor, LinearPlan]],
                     grams: Mapping[int, torch.Tensor], scales: torch.Tensor) -> float:
    """scaled_output_error on reordered weights and Grams (row order does not change the
    error), so a candidate needs no gather or scatter of the weights."""
    total, count = 0.0, 0
    for w_r, plan in linears:
        s_r = scales[plan.input_perm.to(scales.device)]
        wq = fake_quantize(w_r * s_r, plan.block_bits, plan.geometry) / s_r
        total += float(quadratic_error(w_r - wq, grams[id(plan.input_perm)]).sum())
        count += w_r.shape[0]
    return total / count


def search_scales(x: torch.Tensor, weights: Sequence[torch.Tensor],
                  plans: Sequence[LinearPlan], grid: int = 20) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale [K] for linears reading x [T, K]; returns (s, ratio)."""
    x = x.to(torch.float32)
    # Every candidate is scored on all tokens through the Gram matrix, at the cost of K x K.
    linears, grams = _reordered(gram(x), weights, plans)
    x_mean = x.abs().mean(0)
    best_err, best_ratio = float("inf"), 0.0
    for i in range(grid):
        ratio = i / grid
        err = _reordered_error(linears, grams, candidate_scales(x_mean, ratio))
        if err < best_err:
            best_err, best_ratio = err, ratio
    return candidate_scales(x_mean, best_ratio), best_ratio


def fold_problem(layer: nn.Module, mapping: SmoothMapping, in_features: int) -> str | None:
    """Why `mapping.prev` cannot absorb a [in_features] scale exactly, or None if it can."""
    try:
        prev = layer.get_submodule(mapping.prev)
    except AttributeError:
        return f"no module {mapping.prev}"
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"{mapping.prev} has no weight to absorb the scale"
    bias = getattr(prev, "bias", None)
    if mapping.kind == "norm":
        if tuple(weight.shape) != (in_features,):
            return f"norm {mapping.prev} weight has shape {tuple(weight.shape)}, " \
                   f"expected ({in_features},)"
    elif mapping.kind == "linear":
        if weight.dim() != 2 or weight.shape[0] != in_features:
            return f"{mapping.prev} has {weight.shape[0]} outputs but " \
                   f"{', '.join(mapping.linears)} read {in_features} inputs"
    else:
        return f"unknown smoothing kind {mapping.kind!r}"
    if bias is not None and tuple(bias.shape) != (in_features,):
        return f"{mapping.prev} bias has shape {tuple(bias.shape)}"
    return None


@torch.no_grad()
def fold_scales(layer: nn.Module, mapping: SmoothMapping, scales: torch.Tensor) -> list[str]:
    """prev /= s (norm weight, or previous linear's rows), linears' columns *= s. Exact.

    Returns the names (relative to `layer`) of every parameter that changed.
    """
    prev = layer.get_submodule(mapping.prev)
    changed = []
    for pname in ("weight", "bias"):
        p = getattr(prev, pname, None)
        if p is None:
            continue
        s = scales.to(device=p.device, dtype=torch.float32)
        s = s if p.dim() == 1 else s[:, None]
        p.copy_((p.to(torch.float32) / s).to(p.dtype))
        changed.append(f"{mapping.prev}.{pname}")
    for name in mapping.linears:
        w = layer.get_submodule(name).weight
        w.copy_((w.to(torch.float32) * scales.to(w.device)[None, :]).to(w.dtype))
        changed.append(f"{name}.weight")
    return changed


def clip_shrink_grid(grid: int, max_shrink: float) -> list[float]:
    """Shrink factors 1.0 (no clipping) down towards max_shrink, `grid` points."""
    return [1.0 - i * (1.0 - max_shrink) / grid for i in range(grid)]


def group_grams(x: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """Gram matrix of every input group, [n_groups, group_size, group_size] (the diagonal
    blocks of gram(x)); a ragged last group is zero-padded, so padding never adds error."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    t, k = x.shape
    pad = geometry.n_groups * geometry.group_size - k
    if pad:
        x = torch.cat([x, x.new_zeros(t, pad)], dim=1)
    xg = x.view(t, geometry.n_groups, geometry.group_size).transpose(0, 1)  # [G, T, gs]
    return (xg.transpose(1, 2) @ xg).div_(t)


def search_clip(weight_r: torch.Tensor, block_bits: torch.Tensor, geometry: LayerGeometry,
                grams: torch.Tensor, grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per-(row, group) shrink of the [min, max] range minimising the group's output error
    ||(W_g - Q_g) x_g||^2 (from the group Grams of `group_grams`). Returns [N, n_groups]."""
    groups = grouped(weight_r.to(torch.float32), geometry)  # [N, G, gs]
    grams = grams.to(groups.device)
    maxq = max_code(row_group_bits(block_bits, geometry)).to(groups.device)[..., None]
    wmin, wmax = groups.amin(2, keepdim=True), groups.amax(2, keepdim=True)
    best = torch.full(maxq.shape[:2], float("inf"), device=groups.device)
    shrink = torch.ones_like(best)
    for ratio in clip_shrink_grid(grid, max_shrink):
        s, z = minmax_params(wmin * ratio, wmax * ratio, maxq)
        delta = groups - (quantize_codes(groups, s, z, maxq) - z) * s
        err = ((delta.transpose(0, 1) @ grams).transpose(0, 1) * delta).sum(2)  # [N, G]
        better = err < best
        best = torch.where(better, err, best)
        shrink = torch.where(better, torch.full_like(shrink, ratio), shrink)
    return shrink


@dataclass
class AWQQuantizer:
    """The `awq` method: scale search + exact fold per layer, clipping search per linear.

    Both searches score candidates on every calibration token through Gram matrices, so the
    cost of a candidate does not grow with the calibration set.
    """

    grid: int = 20
    clip_grid: int = 20
    max_shrink: float = 0.5
    name: str = "awq"
    needs_inputs: bool = True
    _warned: set[tuple[str, ...]] = field(default_factory=set, repr=False)
    # Linears of one input group share one input tensor: its group Grams are computed once.
    _cache: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def method_args(self) -> dict[str, Any]:
        return {"grid": self.grid, "clip_grid": self.clip_grid, "max_shrink": self.max_shrink}

    @torch.no_grad()
    def prepare_layer(self, layer: nn.Module, spec: ArchSpec, plans: Mapping[str, LinearPlan],
                      inputs: Mapping[str, torch.Tensor], layer_name: str = "") -> list[str]:
        """Search and fold the scales of every smoothing mapping of one decoder layer.

        plans and inputs are keyed by linear name relative to the layer; inputs are the
        full-precision inputs [T, K] in the original column order. Returns changed parameters.
        """
        changed: list[str] = []
        for mapping in spec.smooth:
            if not all(name in plans and name in inputs for name in mapping.linears):
                log.debug("AWQ %s: %s not all quantized; no scaling", layer_name, mapping.linears)
                continue
            x = inputs[mapping.linears[0]]
            reason = fold_problem(layer, mapping, x.shape[-1])
            if reason is not None:
                self._warn_skip(layer_name, mapping, reason)
                continue
            weights = [layer.get_submodule(n).weight for n in mapping.linears]
            scales, ratio = search_scales(x, weights, [plans[n] for n in mapping.linears],
                                          self.grid)
            log.debug("AWQ %s: %s <- %s ratio %.2f", layer_name, mapping.linears,
                      mapping.prev, ratio)
            changed += fold_scales(layer, mapping, scales)
        return changed

    def _warn_skip(self, layer_name: str, mapping: SmoothMapping, reason: str) -> None:
        # Same reason in every layer of a model: warn once per mapping, then only debug.
        log_fn = log.debug if mapping.linears in self._warned else log.warning
        self._warned.add(mapping.linears)
        log_fn("AWQ %s: cannot fold a scale for %s into %s exactly (%s); skipping scaling for "
               "this group", layer_name or "layer", ", ".join(mapping.linears), mapping.prev,
               reason)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, block_bits: torch.Tensor,
                 geometry: LayerGeometry, context: LinearContext) -> QuantizedCodes:
        context.require_inputs("awq")
        if self._cache is None or self._cache[0] is not context.inputs:
            x = context.inputs.reshape(-1, context.inputs.shape[-1])
            self._cache = (context.inputs, group_grams(x, geometry))
        shrink = search_clip(weight, block_bits, geometry, self._cache[1], self.clip_grid,
                             self.max_shrink)
        return quantize_minmax(weight, block_bits, geometry, shrink)
