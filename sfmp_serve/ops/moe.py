"""Routed experts through the SFMP op: one opaque custom op per mixture-of-experts call.

Each expert is two prepared SFMP layers (ops.api.prepare_layer): its gate and up projections
fused into one layer of 2I outputs (they share one input order, as vLLM's w13 does), and its
down projection. `register_experts` keeps them under the name of the vLLM MoE layer;
`torch.ops.sfmp.moe_experts(x, topk_weights, topk_ids, layer)` then computes

    y[t] = sum over the top-k experts e of t:  w[t, e] * down_e(silu(gate_e(x[t])) * up_e(x[t]))

looping over the experts that received tokens, in ascending order, adding each expert's
weighted output with index_add_ (the summation order of transformers' experts loop, so the
two paths agree to rounding). Which experts are active depends on the batch, so the loop runs
inside the op: under vLLM's torch.compile a Python loop in apply() would be traced once and
frozen. Every backend of ops.api serves the experts; no backend needs to know about MoE.
The loop reads the active expert ids on the host (torch.unique): fine on the CPU, but not
CUDA-graph-capture-safe, so a GPU server would need --enforce-eager until a grouped kernel
replaces the loop (untested: no GPU on the development machines).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sfmp_serve.errors import SFMPError
from sfmp_serve.ops import api


@dataclass(frozen=True)
class ExpertSet:
    """The prepared layers of one MoE layer's experts, indexed by (local) expert id."""

    gate_up: tuple[api.LayerHandle, ...]  # [2I] outputs: gate rows, then up rows
    down: tuple[api.LayerHandle, ...]

    @property
    def intermediate(self) -> int:
        return self.gate_up[0].out_features // 2


_EXPERTS: dict[str, ExpertSet] = {}


def register_experts(layer: str, experts: ExpertSet) -> None:
    """Make the experts of vLLM's MoE layer `layer` callable through the op."""
    if not experts.gate_up or len(experts.gate_up) != len(experts.down):
        raise SFMPError(f"layer {layer}: {len(experts.gate_up)} gate/up and "
                        f"{len(experts.down)} down projections; need one of each per expert")
    _EXPERTS[layer] = experts


def release_experts(layer: str) -> None:
    experts = _EXPERTS.pop(layer, None)
    if experts is not None:
        for handle in experts.gate_up + experts.down:
            api.release_layer(handle.name)


def run_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                experts: ExpertSet) -> torch.Tensor:
    """The weighted sum of each token's routed experts (x [M, H], topk_* [M, k])."""
    out = torch.zeros_like(x)
    inter = experts.intermediate
    for e in torch.unique(topk_ids).tolist():
        if not 0 <= e < len(experts.gate_up):
            continue  # an id outside this rank's experts (padding)
        tokens, slot = torch.where(topk_ids == e)
        h = api.linear(x[tokens], experts.gate_up[e])
        y = api.linear(F.silu(h[:, :inter]) * h[:, inter:], experts.down[e])
        out.index_add_(0, tokens, (y * topk_weights[tokens, slot, None]).to(out.dtype))
    return out


@torch.library.custom_op("sfmp::moe_experts", mutates_args=())
def _moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 layer: str) -> torch.Tensor:
    experts = _EXPERTS.get(layer)
    if experts is None:
        raise SFMPError(f"layer {layer}: experts not prepared in this process")
    return run_experts(x.reshape(-1, x.shape[-1]), topk_weights, topk_ids,
                       experts).reshape(x.shape)


@_moe_experts.register_fake
def _moe_experts_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      layer: str) -> torch.Tensor:
    return torch.empty_like(x)
