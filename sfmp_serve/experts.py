"""The routed experts of a mixture-of-experts block as one linear per expert and projection.

transformers 5.x stores the experts of Mixtral and Qwen3-MoE as two stacked parameters,
`gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj` [E, H, I]; their
checkpoints and vLLM name one linear per expert (`experts.<e>.w1` or `experts.<e>.gate_proj`).
`unroll_experts` replaces each stacked experts module by LinearExperts, whose children are
named as the checkpoint names them: nn.Linear while quantizing (so each expert projection is a
quantization target, its calibration inputs are exactly the tokens routed to it and its Fisher
gradient comes from those tokens only), SFMPLinear in a loaded SFMP model. The forward is
transformers' eager experts loop; an expert that receives no token is not called.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from sfmp_serve.arch import ArchSpec
from sfmp_serve.errors import SFMPError

log = logging.getLogger(__name__)


class LinearExperts(nn.Module):
    """Drop-in replacement for a transformers experts module (forward(hidden, top_k_index,
    top_k_weights)) holding one module per expert and projection: child `<e>` has the
    attributes `gate`, `up` and `down` under the checkpoint's names."""

    def __init__(self, names: tuple[str, str, str], act_fn: Callable[[torch.Tensor], torch.Tensor],
                 experts: list[tuple[nn.Module, nn.Module, nn.Module]]) -> None:
        super().__init__()
        self.names = names  # checkpoint names of (gate, up, down)
        self.act_fn = act_fn
        self.num_experts = len(experts)
        for e, linears in enumerate(experts):
            expert = nn.Module()
            for name, linear in zip(names, linears):
                expert.add_module(name, linear)
            self.add_module(str(e), expert)

    def projections(self, expert: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(gate, up, down) of one expert."""
        module = self.get_submodule(str(expert))
        return tuple(getattr(module, n) for n in self.names)  # type: ignore[return-value]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        # Experts in ascending order, as transformers' loop adds them (same summation order).
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue  # transformers' padding id for tokens routed nowhere
            tokens, slot = torch.where(top_k_index == e)
            gate, up, down = self.projections(e)
            x = hidden_states[tokens]
            y = down(self.act_fn(gate(x)) * up(x)) * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, projections={self.names}"


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta",
                       dtype=weight.dtype)
    linear.weight = nn.Parameter(weight if weight.is_meta else weight.detach().clone())
    return linear


def linear_experts(stacked: nn.Module, spec: ArchSpec, where: str) -> LinearExperts:
    """LinearExperts with nn.Linear children holding the slices of a stacked experts module
    (meta slices stay on meta)."""
    moe = spec.moe
    gate_up = getattr(stacked, "gate_up_proj", None)
    down = getattr(stacked, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise SFMPError(f"{where}: {type(stacked).__name__} has no stacked gate_up_proj and "
                        "down_proj: the architecture table does not match this model")
    n, rows, hidden = gate_up.shape
    if rows % 2 or tuple(down.shape) != (n, hidden, rows // 2):
        raise SFMPError(f"{where}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
                        f"{tuple(down.shape)} are not [E, 2I, H] and [E, H, I]")
    inter = rows // 2
    with torch.no_grad():
        experts = [(_linear(gate_up[e, :inter]), _linear(gate_up[e, inter:]), _linear(down[e]))
                   for e in range(n)]
    return LinearExperts((moe.gate, moe.up, moe.down), stacked.act_fn, experts)


def moe_layers(model: nn.Module, spec: ArchSpec) -> list[int]:
    """Indices of the decoder layers that have the family's sparse block."""
    if spec.moe is None:
        return []
    layers = model.get_submodule(spec.layers_path)
    return [i for i, layer in enumerate(layers) if spec.n_experts(layer)]


def unroll_experts(model: nn.Module, spec: ArchSpec,
                   layers: list[int] | None = None) -> list[int]:
    """Replace the stacked experts of every sparse decoder layer (or of `layers`) by
    LinearExperts, in place; returns the layers changed. Works on meta models too."""
    if spec.moe is None:
        return []
    changed = []
    decoder = model.get_submodule(spec.layers_path)
    for i in moe_layers(model, spec) if layers is None else layers:
        block = decoder[i].get_submodule(spec.moe.block)
        current = getattr(block, spec.moe.experts)
        if isinstance(current, LinearExperts):
            continue
        where = f"{spec.layers_path}.{i}.{spec.moe.experts_path}"
        setattr(block, spec.moe.experts, linear_experts(current, spec, where))
        changed.append(i)
    if changed:
        log.debug("experts of %d sparse layers as one linear per expert", len(changed))
    return changed
