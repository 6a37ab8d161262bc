"""Architecture knowledge as data: which linears a decoder layer has, which read the same input,
how vLLM fuses them, and which preceding op can absorb an AWQ input scale.

Every other module asks this table; none of them knows a model family by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sfmp_serve.errors import SFMPError


@dataclass(frozen=True)
class SmoothMapping:
    """AWQ: a per-channel scale on the input of `linears` can be folded into `prev` exactly."""

    prev: str  # module (relative to the decoder layer) whose output feeds `linears`
    linears: tuple[str, ...]
    kind: str  # "norm" (scale the norm weight) or "linear" (scale the previous linear's rows)


@dataclass(frozen=True)
class ArchSpec:
    model_types: tuple[str, ...]
    layers_path: str  # attribute path from the causal LM to the list of decoder layers
    linears: tuple[str, ...]  # quantizable linears, relative to a decoder layer
    input_groups: tuple[tuple[str, ...], ...]  # linears that read one input tensor
    # vLLM's fused layers: fused name -> ((shard name, shard id), ...) in vLLM's shard order
    fused: dict[str, tuple[tuple[str, str | int], ...]] = field(default_factory=dict)
    smooth: tuple[SmoothMapping, ...] = ()

    def group_of(self, linear: str) -> tuple[str, ...]:
        for group in self.input_groups:
            if linear in group:
                return group
        return (linear,)


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")

LLAMA_LIKE = ArchSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers_path="model.layers",
    linears=(*_ATTN, "self_attn.o_proj", *_MLP_IN, "mlp.down_proj"),
    input_groups=(_ATTN, ("self_attn.o_proj",), _MLP_IN, ("mlp.down_proj",)),
    fused={
        "self_attn.qkv_proj": (
            ("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v")),
        "mlp.gate_up_proj": (("mlp.gate_proj", 0), ("mlp.up_proj", 1)),
    },
    smooth=(
        SmoothMapping("input_layernorm", _ATTN, "norm"),
        SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
        SmoothMapping("post_attention_layernorm", _MLP_IN, "norm"),
        SmoothMapping("mlp.up_proj", ("mlp.down_proj",), "linear"),
    ),
)

ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA_LIKE,)


def arch_for(model_type: str) -> ArchSpec:
    """The spec for a transformers `model_type`; a clear error for anything else."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for spec in ARCHITECTURES for t in spec.model_types)
    raise SFMPError(f"architecture '{model_type}' is not supported: cannot find its linears "
                    f"(supported model_type: {', '.join(known)})")
