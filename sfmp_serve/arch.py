"""Architecture knowledge as data: one entry per model family.

An entry says which linears of a decoder layer are quantized and which of them read one input
tensor (`input_groups`, in execution order), which stored linears vLLM fuses into one layer
(`fused`, vLLM's `packed_modules_mapping`, used when vLLM does not pass its own), and which
preceding op can absorb an AWQ input scale exactly (`smooth`). Every other module asks this
table (offline/targets.py turns it into quantization targets); none knows a family by name.

Adding a family is one ArchSpec in ARCHITECTURES (and a tiny config of each of its model_types
in tests/tiny.py FAMILY_MODELS). tests/test_families.py checks every entry on a tiny random
model: every decoder linear listed, input groups exactly the linears that share an input, folds
exact (or refused by shape, with a warning), fused names equal to vLLM's packed_modules_mapping;
tests/serving/test_families_vllm.py serves it in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from sfmp_serve.errors import SFMPError

# How `SmoothMapping.prev` absorbs a per-channel scale s of its consumers' input:
NORM = "norm"  # y = normalize(x) * w (+ b): w / s, b / s
OFFSET_NORM = "offset_norm"  # y = normalize(x) * (1 + w) (Gemma): (1 + w) / s - 1
LINEAR = "linear"  # rows of the previous linear (one chunk of them if it is fused) / s
FOLD_KINDS = (NORM, OFFSET_NORM, LINEAR)


@dataclass(frozen=True)
class SmoothMapping:
    """AWQ: a per-channel scale on the input of `linears` can be folded into `prev` exactly."""

    prev: str  # module (relative to the decoder layer) whose output feeds `linears`
    linears: tuple[str, ...]
    kind: str  # one of FOLD_KINDS
    # LINEAR with a fused `prev` (Phi-3's qkv_proj, gate_up_proj): its outputs are n equal
    # chunks and chunk i feeds `linears`. A model whose chunks are unequal fails the shape check
    # and the fold is skipped.
    chunk: tuple[int, int] = (0, 1)


@dataclass(frozen=True)
class ArchSpec:
    family: str  # for messages and docs
    model_types: tuple[str, ...]  # transformers' config.model_type values
    layers_path: str  # attribute path from the causal LM to the list of decoder layers
    input_groups: tuple[tuple[str, ...], ...]  # quantized linears sharing one input, in order
    # vLLM layer -> the stored linears it fuses, in vLLM's shard order (relative names)
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    smooth: tuple[SmoothMapping, ...] = ()
    # linear -> module whose forward input is the linear's input, where that is not the linear
    capture: Mapping[str, str] = field(default_factory=dict)

    @property
    def linears(self) -> tuple[str, ...]:
        """Quantized linears relative to a decoder layer, in execution order."""
        return tuple(name for group in self.input_groups for name in group)

    def group_of(self, linear: str) -> tuple[str, ...]:
        for group in self.input_groups:
            if linear in group:
                return group
        return (linear,)

    def capture_of(self, linear: str) -> str:
        return self.capture.get(linear, linear)


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
_VLLM_FUSES_APART = {"self_attn.qkv_proj": _ATTN, "mlp.gate_up_proj": _MLP_IN}

LLAMA_LIKE = ArchSpec(
    family="Llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers_path="model.layers",
    input_groups=(_ATTN, ("self_attn.o_proj",), _MLP_IN, ("mlp.down_proj",)),
    fused=_VLLM_FUSES_APART,
    smooth=(
        SmoothMapping("input_layernorm", _ATTN, NORM),
        SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",), LINEAR),  # GQA: skipped
        SmoothMapping("post_attention_layernorm", _MLP_IN, NORM),
        SmoothMapping("mlp.up_proj", ("mlp.down_proj",), LINEAR),
    ),
)

# Gemma 2 and 3 (text): (1 + w) norms; the MLP reads pre_feedforward_layernorm. Their
# post_attention / post_feedforward norms normalise o_proj / down_proj outputs on the way to the
# residual: no linear reads them, so they absorb nothing.
GEMMA = ArchSpec(
    family="Gemma 2/3",
    model_types=("gemma2", "gemma3_text"),
    layers_path="model.layers",
    input_groups=(_ATTN, ("self_attn.o_proj",), _MLP_IN, ("mlp.down_proj",)),
    fused=_VLLM_FUSES_APART,
    smooth=(
        SmoothMapping("input_layernorm", _ATTN, OFFSET_NORM),
        SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",), LINEAR),  # GQA: skipped
        SmoothMapping("pre_feedforward_layernorm", _MLP_IN, OFFSET_NORM),
        SmoothMapping("mlp.up_proj", ("mlp.down_proj",), LINEAR),
    ),
)

# Phi-3 stores qkv_proj ([q; k; v] rows) and gate_up_proj ([gate; up] rows) fused: each is one
# stored linear that serves all of vLLM's shards of the layer of the same name.
PHI3 = ArchSpec(
    family="Phi-3",
    model_types=("phi3",),
    layers_path="model.layers",
    input_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                  ("mlp.down_proj",)),
    smooth=(
        SmoothMapping("input_layernorm", ("self_attn.qkv_proj",), NORM),
        # v rows: the last third when there are as many KV heads as heads; otherwise skipped
        SmoothMapping("self_attn.qkv_proj", ("self_attn.o_proj",), LINEAR, chunk=(2, 3)),
        SmoothMapping("post_attention_layernorm", ("mlp.gate_up_proj",), NORM),
        SmoothMapping("mlp.gate_up_proj", ("mlp.down_proj",), LINEAR, chunk=(1, 2)),  # up rows
    ),
)

ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA_LIKE, GEMMA, PHI3)


def supported() -> str:
    """'Llama (llama, mistral, ...), Gemma 2/3 (...), ...' for error messages."""
    return "; ".join(f"{spec.family}: {', '.join(spec.model_types)}" for spec in ARCHITECTURES)


def arch_for(model_type: str) -> ArchSpec:
    """The spec for a transformers `model_type`; a clear error for anything else."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise SFMPError(f"architecture '{model_type}' is not supported: cannot find its linears "
                    f"(supported model_type values, by family: {supported()})")
