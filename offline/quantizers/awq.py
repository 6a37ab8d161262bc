"""AWQ with SFMP's block-wise mixed precision in the loop (pure math plus exact folding).

Lifecycle per decoder layer (driven by offline.sequential):
1. `prepare_layer`: for every smoothing mapping of the architecture (sfmp_serve/arch.py
   `smooth`), with the full-precision inputs X of the mapping's linears: search a per-input-
   channel scale s = mean|X|^r (normalised), r on a 20-point grid in [0, 1), that minimises the
   output error of the linears quantized *as SFMP will store them* (their permutations and block
   bit-widths, min-max per (row, group)). r = 0 is the identity, so scaling never loses on the
   calibration set. The best s is folded exactly: the linears' columns are multiplied by s, the
   preceding op's output divided by s (a norm weight w / s, a (1 + w) norm's (1 + w) / s - 1,
   or the previous linear's rows, one chunk of them for a fused linear). Mappings whose
   preceding op cannot absorb s exactly are skipped with a warning.
2. `quantize` (per linear, reordered): per-(row, group) clipping search, shrinking the group's
   [min, max] on a 20-point grid down to `max_shrink`, with the block's bit-width, minimising
   the group's contribution to the output error; then min-max codes from the clipped range.
Output errors are quadratic forms in the Gram matrix X^T X / T: exact over every calibration
token, and a candidate costs N x K x K instead of N x K x T.

The "module output" of a mapping is the concatenated output of its linears (not the whole
attention or MLP block): cheap, and the same objective for every architecture in the table.

Mixture-of-experts layers: the norm before the sparse block absorbs one scale for every
expert's gate and up projection (a `routed` mapping: each expert is scored on the tokens routed
to it, and an expert with too few of them is scaled but not scored) and the router's weight
columns are multiplied by the same scale, so routing is unchanged; each expert's up rows absorb
its own down projection's scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from offline.quantizers.base import (LinearContext, QuantizedCodes, Quantizer,
                                     check_positive, register, row_group_bits)
from offline.quantizers.blockwise import (LinearPlan, fake_quantize, grouped, max_code,
                                          minmax_params, quantize_codes, quantize_minmax)
from sfmp_serve.arch import LINEAR, NORM, OFFSET_NORM, ArchSpec, SmoothMapping
from sfmp_serve.errors import SFMPError
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


def _reordered(g: torch.Tensor | Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
               plans: Sequence[LinearPlan],
               ) -> tuple[list[tuple[torch.Tensor, LinearPlan]], dict[int, torch.Tensor]]:
    """Weights and Grams in each linear's reordered order (one Gram per input order; `g` is
    every linear's Gram, or one per linear when they read different tokens)."""
    linears = [(p.reorder(w.to(torch.float32)), p) for w, p in zip(weights, plans)]
    per_linear = [g] * len(plans) if isinstance(g, torch.Tensor) else list(g)
    grams = {}
    for gi, p in zip(per_linear, plans):
        if id(p.input_perm) not in grams:
            perm = p.input_perm.to(gi.device)
            grams[id(p.input_perm)] = gi[perm][:, perm]
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


def search_scales(x: torch.Tensor | Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                  plans: Sequence[LinearPlan], grid: int = 20) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale [K] for linears reading x [T, K]; returns (s, ratio).
    `x` may be one input per linear (routed experts: each its own tokens); the candidate scales
    then come from all of them, each linear is scored on its own."""
    xs = [x] * len(weights) if isinstance(x, torch.Tensor) else list(x)
    first: dict[int, torch.Tensor] = {}  # linears of one input group read one tensor
    xs = [first.setdefault(id(p.input_perm), xi) for xi, p in zip(xs, plans)]
    as_f32: dict[int, torch.Tensor] = {}
    grams: dict[int, torch.Tensor] = {}
    for xi in xs:
        if id(xi) not in as_f32:
            as_f32[id(xi)] = xi.to(torch.float32)
            # Every candidate is scored on all tokens through the Gram matrix, at K x K.
            grams[id(xi)] = gram(as_f32[id(xi)])
    linears, grams = _reordered([grams[id(xi)] for xi in xs], weights, plans)
    distinct = list(as_f32.values())
    x_mean = (distinct[0] if len(distinct) == 1 else torch.cat(distinct)).abs().mean(0)
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
    for name in mapping.also:
        other = getattr(_submodule(layer, name), "weight", None)
        if not isinstance(other, torch.Tensor) or other.shape[-1] != in_features:
            return f"{name} has no weight of {in_features} input columns to take the scale"
    if mapping.kind in (NORM, OFFSET_NORM):
        if tuple(weight.shape) != (in_features,):
            return f"norm {mapping.prev} weight has shape {tuple(weight.shape)}, " \
                   f"expected ({in_features},)"
    elif mapping.kind == LINEAR:
        index, count = mapping.chunk
        if weight.dim() != 2 or weight.shape[0] % count:
            return f"{mapping.prev} weight {tuple(weight.shape)} does not split into {count} " \
                   "equal chunks of outputs"
        rows = weight.shape[0] // count
        if rows != in_features:
            part = f" (chunk {index} of {count})" if count > 1 else ""
            return f"{mapping.prev}{part} has {rows} outputs but " \
                   f"{', '.join(mapping.linears)} read {in_features} inputs"
    else:
        return f"unknown smoothing kind {mapping.kind!r}"
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return f"{mapping.prev} bias has shape {tuple(bias.shape)}"
    return None


def _absorb(p: torch.Tensor, kind: str, s: torch.Tensor, chunk: tuple[int, int]) -> None:
    """p (a weight or bias of the previous op) becomes what makes its output divided by s."""
    if kind == LINEAR:
        index, count = chunk
        rows = p.shape[0] // count
        part = p[index * rows:(index + 1) * rows]
        s = s if p.dim() == 1 else s[:, None]
        part.copy_((part.to(torch.float32) / s).to(p.dtype))
    elif kind == OFFSET_NORM:
        p.copy_(((1.0 + p.to(torch.float32)) / s - 1.0).to(p.dtype))
    else:
        p.copy_((p.to(torch.float32) / s).to(p.dtype))


def _submodule(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def fold_scales(layer: nn.Module, mapping: SmoothMapping, scales: torch.Tensor) -> list[str]:
    """prev's output /= s (norm weight, or previous linear's rows), linears' columns *= s.

    Exact (up to rounding) when fold_problem is None. Returns the names (relative to `layer`)
    of every parameter that changed.
    """
    prev = layer.get_submodule(mapping.prev)
    changed = []
    for pname in ("weight", "bias"):
        p = getattr(prev, pname, None)
        if p is None:
            continue
        # A norm's bias is added after its (1 + w) product, so it scales plainly.
        kind = NORM if (mapping.kind == OFFSET_NORM and pname == "bias") else mapping.kind
        _absorb(p, kind, scales.to(device=p.device, dtype=torch.float32), mapping.chunk)
        changed.append(f"{mapping.prev}.{pname}")
    for name in mapping.linears + mapping.also:
        w = layer.get_submodule(name).weight
        w.copy_((w.to(torch.float32) * scales.to(w.device)[None, :]).to(w.dtype))
        changed.append(f"{name}.weight")
    return changed


ScaleChooser = Callable[[SmoothMapping, int], "torch.Tensor | None"]


@torch.no_grad()
def fold_layer(layer: nn.Module, spec: ArchSpec, scale_for: ScaleChooser,
               layer_name: str = "", warned: set[tuple[str, ...]] | None = None) -> list[str]:
    """Fold a scale into every smoothing mapping of one decoder layer.

    scale_for(mapping, in_features) gives the scale [in_features], or None to leave the
    mapping alone. A mapping whose preceding op cannot absorb a scale exactly (fold_problem)
    is skipped with a warning, once per mapping in `warned`. Returns the changed parameters.
    """
    warned = set() if warned is None else warned
    changed: list[str] = []
    for mapping in spec.layer_smooth(layer):
        try:
            in_features = layer.get_submodule(mapping.linears[0]).in_features
        except AttributeError:
            in_features = -1
        reason = fold_problem(layer, mapping, in_features)
        if reason is not None:
            _warn_skip(layer_name, mapping, reason, warned)
            continue
        scales = scale_for(mapping, in_features)
        if scales is not None:
            changed += fold_scales(layer, mapping, scales)
    return changed


def _warn_skip(layer_name: str, mapping: SmoothMapping, reason: str,
               warned: set[tuple[str, ...]]) -> None:
    # Same reason in every layer of a model: warn once per mapping, then only debug.
    log_fn = log.debug if mapping.linears in warned else log.warning
    warned.add(mapping.linears)
    names = ", ".join(mapping.linears[:4]) + (f", ... ({len(mapping.linears)} linears)"
                                              if len(mapping.linears) > 4 else "")
    log_fn("AWQ %s: cannot fold a scale for %s into %s exactly (%s); skipping scaling for "
           "this group", layer_name or "layer", names, mapping.prev, reason)


def clip_shrink_grid(grid: int, max_shrink: float) -> list[float]:
    """Shrink factors 1.0 (no clipping) down towards max_shrink, `grid` points."""
    return [1.0 - i * (1.0 - max_shrink) / grid for i in range(grid)]


def group_grams(x: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """Gram matrix of every input group, [n_groups, group_size, group_size] (the diagonal
    blocks of gram(x)); a ragged last group is zero-padded, so padding never adds error."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if geometry.col_ranges > 1:  # each tensor-parallel range has its own ragged last group
        part = geometry.part()
        return torch.cat([group_grams(c, part) for c in x.split(part.in_features, dim=1)])
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


@dataclass(frozen=True)
class AWQConfig:
    grid: int = 20  # scale exponents tried in [0, 1)
    clip_grid: int = 20  # clipping ratios tried in [max_shrink, 1]
    max_shrink: float = 0.5  # smallest fraction of a group's range clipping may keep

    def __post_init__(self) -> None:
        check_positive(self, "grid", "clip_grid", "max_shrink")
        if self.max_shrink > 1:
            raise SFMPError(f"method.args.max_shrink={self.max_shrink!r}: must be in (0, 1]")


@register
class AWQQuantizer(Quantizer):
    """The `awq` method: scale search + exact fold per layer, clipping search per target.

    Both searches score candidates on every calibration token through Gram matrices, so the
    cost of a candidate does not grow with the calibration set.
    """

    name = "awq"
    needs_inputs = True
    Config = AWQConfig

    def __init__(self, config: AWQConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._warned: set[tuple[str, ...]] = set()
        # Targets of one input group share one input tensor: its group Grams are computed once.
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def prepare_layer(self, layer: nn.Module, spec: ArchSpec, plans: Mapping[str, Any],
                      inputs: Mapping[str, torch.Tensor], layer_name: str = "") -> list[str]:
        """Search and fold the scales of every smoothing mapping of one decoder layer.

        plans and inputs are keyed by linear name relative to the layer; inputs are the
        full-precision inputs [T, K] in the original column order. Returns changed parameters.
        """
        def search(mapping: SmoothMapping, in_features: int) -> torch.Tensor | None:
            # Routed experts without enough tokens have no inputs here: scaled, not scored.
            scored = [n for n in mapping.linears if n in inputs]
            if (not all(name in plans for name in mapping.linears) or not scored
                    or (not mapping.routed and len(scored) != len(mapping.linears))):
                log.debug("AWQ %s: %s not all quantized; no scaling", layer_name,
                          mapping.linears[:4])
                return None
            weights = [layer.get_submodule(n).weight for n in scored]
            x = [inputs[n] for n in scored] if mapping.routed else inputs[mapping.linears[0]]
            scales, ratio = search_scales(x, weights, [plans[n] for n in scored],
                                          self.config.grid)
            log.debug("AWQ %s: %s <- %s ratio %.2f", layer_name, mapping.linears[:4],
                      mapping.prev, ratio)
            return scales

        return fold_layer(layer, spec, search, layer_name, self._warned)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, block_bits: torch.Tensor,
                 geometry: LayerGeometry, context: LinearContext) -> QuantizedCodes:
        context.require_inputs("awq")
        if self._cache is None or self._cache[0] is not context.inputs:
            x = context.inputs.reshape(-1, context.inputs.shape[-1])
            self._cache = (context.inputs, group_grams(x, geometry))
        shrink = search_clip(weight, block_bits, geometry, self._cache[1], self.config.clip_grid,
                             self.config.max_shrink)
        return quantize_minmax(weight, block_bits, geometry, shrink)
