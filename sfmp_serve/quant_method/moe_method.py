"""SFMPMoEMethod: serves one vLLM FusedMoE layer (its routed experts) from SFMP tensors.

Lifecycle (vLLM's FusedMoEMethodBase):
1. create_weights: placeholder parameters `w13_<tensor>` and `w2_<tensor>` for every SFMP
   tensor suffix, the names vLLM's expert mapping gives the checkpoint's per-expert tensors
   (`experts.<e>.w1.qweight` -> `w13_qweight`, expert e, shard "w1"). Their weight_loader
   keeps each (expert id, shard id) tensor as it arrives, in any order.
2. process_weights_after_loading: per expert, gate (w1) and up (w3) are validated against
   [I, H] and prepared as one fused SFMP layer of 2I outputs, down (w2) against [H, I]; a
   missing tensor or a wrong shape fails start-up naming the stored linear. The raw tensors
   are dropped.
3. apply: vLLM's router has already chosen topk_ids / topk_weights; one custom-op call
   (sfmp_serve.ops.moe) runs the active experts through the SFMP op and sums them.
"""

from __future__ import annotations

import functools
import logging

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from sfmp_serve import metrics
from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.format import TENSOR_SUFFIXES, BitStats, PackedLinear, SFMPConfig
from sfmp_serve.ops import api
from sfmp_serve.ops.moe import ExpertSet, register_experts
from sfmp_serve.quant_method.linear_method import _add_served, _placeholder_dtype

logger = logging.getLogger(__name__)

_LOADED = "_sfmp_loaded"  # layer attribute: (expert id, shard id) -> {suffix: tensor}
_SHARDS = ("w1", "w3", "w2")  # vLLM's shard ids: gate, up, down


class SFMPMoEMethod(FusedMoEMethodBase):
    """Routed experts of one MoE layer, each expert's projections an SFMP linear."""

    def __init__(self, config: SFMPConfig, moe, prefix: str,
                 names: dict[str, str]) -> None:
        super().__init__(moe)
        self.config = config
        self.prefix = prefix  # vLLM's layer name: <layer>.<block>.experts
        self.names = names  # shard id -> checkpoint name of the projection (w1 -> "w1")
        self.num_experts = 0
        self.shapes: dict[str, tuple[int, int]] = {}  # shard id -> [out, in]

    def stored(self, expert: int, shard: str) -> str:
        """The checkpoint's linear for one expert and shard."""
        return f"{self.prefix}.{expert}.{self.names[shard]}"

    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs) -> None:
        activation = getattr(self.moe.activation, "value", self.moe.activation)
        if activation != "silu" or not self.moe.is_act_and_mul:
            raise SFMPError(f"layer {self.prefix}: SFMP serves gated SiLU experts only "
                            f"(got activation {activation!r})")
        self.num_experts = num_experts
        inter = intermediate_size_per_partition
        self.shapes = {"w1": (inter, hidden_size), "w3": (inter, hidden_size),
                       "w2": (hidden_size, inter)}
        setattr(layer, _LOADED, {})
        for stem, shards in (("w13", ("w1", "w3")), ("w2", ("w2",))):
            shapes = [self.shapes[s] for s in shards]
            for suffix in TENSOR_SUFFIXES:
                param = torch.nn.Parameter(
                    torch.empty(0, dtype=_placeholder_dtype(suffix, self.config, shapes)),
                    requires_grad=False)
                set_weight_attrs(param, {"weight_loader": functools.partial(
                    self._load, layer, stem, suffix)})
                layer.register_parameter(f"{stem}_{suffix}", param)

    def _load(self, layer: torch.nn.Module, stem: str, suffix: str, param: torch.nn.Parameter,
              loaded_weight: torch.Tensor, weight_name: str | None = None,
              shard_id: str | None = None, expert_id: int | None = None,
              return_success: bool = False) -> bool | None:
        wanted = ("w1", "w3") if stem == "w13" else ("w2",)
        if shard_id not in wanted or not isinstance(expert_id, int) \
                or not 0 <= expert_id < self.num_experts:
            raise FormatError(f"layer {self.prefix}: tensor {weight_name or stem + '_' + suffix}"
                              f" arrived as expert {expert_id!r}, shard {shard_id!r}; expected "
                              f"an expert in 0..{self.num_experts - 1} and shard {wanted}")
        getattr(layer, _LOADED).setdefault((expert_id, shard_id), {})[suffix] = loaded_weight
        return True if return_success else None

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> None:
        return None  # no modular kernel: apply() runs the experts itself

    def _packed(self, loaded: dict, expert: int, shard: str,
                device: torch.device) -> PackedLinear:
        name = self.stored(expert, shard)
        tensors = {f"{name}.{k}": v for k, v in loaded.get((expert, shard), {}).items()}
        packed = PackedLinear.from_tensors(name, tensors)  # names a missing tensor
        packed.validate(name, self.config, self.shapes[shard])
        return PackedLinear(**{k: getattr(packed, k).to(device) for k in TENSOR_SUFFIXES})

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        loaded = getattr(layer, _LOADED)
        device = layer.w13_qweight.device
        gate_up, down, packed = [], [], []
        for e in range(self.num_experts):
            gate, up, dn = (self._packed(loaded, e, s, device) for s in _SHARDS)
            gate_up.append(api.prepare_layer(
                f"{self.prefix}.{e}.w13", (self.stored(e, "w1"), self.stored(e, "w3")),
                (gate, up), self.config, layer.params_dtype, device))
            down.append(api.prepare_layer(f"{self.prefix}.{e}.w2", (self.stored(e, "w2"),),
                                          (dn,), self.config, layer.params_dtype, device))
            packed += [gate, up, dn]
        register_experts(self.prefix, ExpertSet(tuple(gate_up), tuple(down)))
        delattr(layer, _LOADED)
        served = _add_served(BitStats.of(packed, self.config))
        metrics.set_model_info(served.avg_bits, served.bits_per_weight)
        logger.debug("SFMP experts %s: %d experts, %s backend", self.prefix, self.num_experts,
                     gate_up[0].backend)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, shared_experts=None,
              shared_experts_input: torch.Tensor | None = None) -> torch.Tensor:
        if shared_experts is not None:
            raise SFMPError(f"layer {self.prefix}: shared experts are not supported")
        return torch.ops.sfmp.moe_experts(x, topk_weights, topk_ids, self.prefix)
