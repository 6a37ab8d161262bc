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

A mixture-of-experts family adds a MoESpec: where its sparse block, router and experts live,
and the checkpoint names of each expert's gate, up and down projections. transformers 5.x
keeps the experts of such a block as stacked 3-D parameters while checkpoints (and vLLM) name
one linear per expert; sfmp_serve.experts turns the stacked form into one nn.Linear per expert
and projection, so every expert projection is a quantization target like any other linear,
and `stored_key` / `model_key` translate between the model's and the checkpoint's names (they
differ where transformers renames the block, e.g. Mixtral's block_sparse_moe -> mlp). In a
layer that has the sparse block, the table's groups and folds under the block are replaced by
the experts' (a family whose config mixes dense and sparse layers, Qwen3-MoE's
mlp_only_layers, lists its dense MLP as usual).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

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
    # Unquantized modules that read the same input and take the scale on their weight columns
    # so their output is unchanged (a MoE router reads what the experts read).
    also: tuple[str, ...] = ()
    # The linears read different token subsets of one input (routed experts): each is scored
    # on its own tokens, and one without enough of them is scaled but not scored.
    routed: bool = False


@dataclass(frozen=True)
class MoESpec:
    """A sparse mixture-of-experts block: a router picks top-k experts per token, each a gated
    MLP down(act(gate(x)) * up(x)). Names are relative to the decoder layer."""

    block: str = "mlp"  # the sparse block in the transformers model
    stored_block: str = "mlp"  # its name in checkpoints (Mixtral: block_sparse_moe)
    experts: str = "experts"  # inside the block: the experts (stacked in transformers 5.x)
    router: str = "gate"  # inside the block: never quantized
    # checkpoint names of each expert's projections, in vLLM's order (gate, down, up)
    gate: str = "gate_proj"
    down: str = "down_proj"
    up: str = "up_proj"
    norm: str = "post_attention_layernorm"  # what the block reads: AWQ folds its scale here
    norm_kind: str = NORM

    @property
    def experts_path(self) -> str:
        return f"{self.block}.{self.experts}"

    def expert_linears(self, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) of one expert, model names relative to the decoder layer."""
        head = f"{self.experts_path}.{expert}"
        return f"{head}.{self.gate}", f"{head}.{self.up}", f"{head}.{self.down}"

    def groups(self, n_experts: int) -> tuple[tuple[str, ...], ...]:
        """Per expert: (gate, up) read its routed tokens, (down,) their gated product."""
        out: list[tuple[str, ...]] = []
        for e in range(n_experts):
            gate, up, down = self.expert_linears(e)
            out += [(gate, up), (down,)]
        return tuple(out)

    def smooth(self, n_experts: int) -> tuple[SmoothMapping, ...]:
        """The norm before the block absorbs one scale for every expert's gate and up (the
        router's columns take it too); each expert's up rows absorb its down's scale."""
        linears = tuple(n for e in range(n_experts) for n in self.expert_linears(e)[:2])
        mappings = [SmoothMapping(self.norm, linears, self.norm_kind,
                                  also=(f"{self.block}.{self.router}",), routed=True)]
        for e in range(n_experts):
            _, up, down = self.expert_linears(e)
            mappings.append(SmoothMapping(up, (down,), LINEAR))
        return tuple(mappings)

    def expert_of(self, local: str) -> int | None:
        """The expert index of a model name relative to the decoder layer, else None."""
        head = self.experts_path + "."
        if not local.startswith(head):
            return None
        index = local[len(head):].partition(".")[0]
        return int(index) if index.isdigit() else None


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
    moe: MoESpec | None = None  # the sparse block of a mixture-of-experts family
    # How vLLM splits each linear over tensor-parallel ranks: linear -> (dim, unit). dim "out":
    # column-parallel (rows split), "in": row-parallel (columns split); unit: what a rank
    # gets whole ("heads", "kv_heads": attention heads of the config; "width": any equal
    # share). A quantized linear not listed cannot be split (offline/tp_plan.py).
    tensor_parallel: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def linears(self) -> tuple[str, ...]:
        """Quantized linears relative to a decoder layer, in execution order (dense layers)."""
        return tuple(name for group in self.input_groups for name in group)

    def n_experts(self, layer: Any) -> int:
        """Experts of the decoder layer's sparse block; 0 for a dense layer (or family)."""
        if self.moe is None:
            return 0
        try:
            experts = layer.get_submodule(self.moe.experts_path)
        except AttributeError:
            return 0
        return int(experts.num_experts)

    def _dense(self, name: str) -> bool:
        return self.moe is None or not name.startswith(self.moe.block + ".")

    def layer_groups(self, layer: Any) -> tuple[tuple[str, ...], ...]:
        """The input groups of one decoder layer (a sparse layer's experts replace its MLP)."""
        n = self.n_experts(layer)
        if not n:
            return self.input_groups
        return tuple(g for g in self.input_groups if self._dense(g[0])) + self.moe.groups(n)

    def layer_smooth(self, layer: Any) -> tuple[SmoothMapping, ...]:
        """The AWQ folds of one decoder layer."""
        n = self.n_experts(layer)
        if not n:
            return self.smooth
        return tuple(m for m in self.smooth if self._dense(m.linears[0])) + self.moe.smooth(n)

    def _rename(self, key: str, old: str, new: str) -> str:
        match = re.match(rf"({re.escape(self.layers_path)}\.\d+\.){re.escape(old)}\.", key)
        return key if match is None else match.group(1) + new + "." + key[match.end():]

    def stored_key(self, key: str) -> str:
        """A model state-dict name (experts unrolled) as the checkpoint names it."""
        if self.moe is None or self.moe.block == self.moe.stored_block:
            return key
        return self._rename(key, self.moe.block, self.moe.stored_block)

    def model_key(self, key: str) -> str:
        """A checkpoint tensor name as the model (experts unrolled) names it."""
        if self.moe is None or self.moe.block == self.moe.stored_block:
            return key
        return self._rename(key, self.moe.stored_block, self.moe.block)

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
# vLLM's QKVParallelLinear / RowParallelLinear (attention), MergedColumnParallelLinear /
# RowParallelLinear (MLP)
_TP_ATTN = {"self_attn.q_proj": ("out", "heads"), "self_attn.k_proj": ("out", "kv_heads"),
            "self_attn.v_proj": ("out", "kv_heads"), "self_attn.o_proj": ("in", "heads")}
_TP_MLP = {"mlp.gate_proj": ("out", "width"), "mlp.up_proj": ("out", "width"),
           "mlp.down_proj": ("in", "width")}

LLAMA_LIKE = ArchSpec(
    family="Llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers_path="model.layers",
    input_groups=(_ATTN, ("self_attn.o_proj",), _MLP_IN, ("mlp.down_proj",)),
    fused=_VLLM_FUSES_APART,
    tensor_parallel={**_TP_ATTN, **_TP_MLP},
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
    tensor_parallel={**_TP_ATTN, **_TP_MLP},
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

# Mixtral: every decoder layer is sparse; checkpoints (and vLLM) call the block
# block_sparse_moe and an expert's gate/down/up w1/w2/w3, transformers calls the block mlp.
MIXTRAL = ArchSpec(
    family="Mixtral",
    model_types=("mixtral",),
    layers_path="model.layers",
    input_groups=(_ATTN, ("self_attn.o_proj",)),
    fused={"self_attn.qkv_proj": _ATTN},
    tensor_parallel=_TP_ATTN,  # experts are not split: SFMP serves MoE layers on one rank
    smooth=(
        SmoothMapping("input_layernorm", _ATTN, NORM),
        SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",), LINEAR),  # GQA: skipped
    ),
    moe=MoESpec(stored_block="block_sparse_moe", gate="w1", down="w2", up="w3"),
)

# Qwen3-MoE: sparse layers, and dense ones where the config says (mlp_only_layers,
# decoder_sparse_step): those keep the Llama MLP.
QWEN3_MOE = ArchSpec(
    family="Qwen3-MoE",
    model_types=("qwen3_moe",),
    layers_path="model.layers",
    input_groups=LLAMA_LIKE.input_groups,
    fused=_VLLM_FUSES_APART,
    tensor_parallel=LLAMA_LIKE.tensor_parallel,
    smooth=LLAMA_LIKE.smooth,
    moe=MoESpec(),
)

ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA_LIKE, GEMMA, PHI3, MIXTRAL, QWEN3_MOE)


def supported() -> str:
    """'Llama (llama, mistral, ...), Gemma 2/3 (...), ...' for error messages."""
    return "; ".join(f"{spec.family}: {', '.join(spec.model_types)}" for spec in ARCHITECTURES)


def find_arch(model_type: str | None) -> ArchSpec | None:
    """The spec for a transformers `model_type`, or None."""
    return next((spec for spec in ARCHITECTURES if model_type in spec.model_types), None)


def arch_for(model_type: str) -> ArchSpec:
    """The spec for a transformers `model_type`; a clear error for anything else."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise SFMPError(f"architecture '{model_type}' is not supported: cannot find its linears "
                    f"(supported model_type values, by family: {supported()})")
