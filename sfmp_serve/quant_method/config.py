"""vLLM QuantizationConfig adapter for SFMP checkpoints: parses quantization_config, picks a
method per layer (SFMPLinearMethod for linears, SFMPMoEMethod for the routed experts of a
FusedMoE layer; routers are plain linears that stay unquantized). No kernel rules here
(those live in sfmp_serve/ops)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import (QuantizationConfig,
                                                                 QuantizeMethodBase)

from sfmp_serve.arch import ARCHITECTURES, ArchSpec, arch_for
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import QUANT_METHOD, SFMPConfig
from sfmp_serve.tp import check_tensor_parallel

logger = logging.getLogger(__name__)


def _tensor_parallel_size() -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size
    try:
        return get_tensor_model_parallel_world_size()
    except AssertionError:  # no parallel state (unit tests, offline tools): one rank
        return 1


class SFMPQuantConfig(QuantizationConfig):
    """The "sfmp" method: every linear in `quantized_modules` is served by SFMPLinearMethod."""

    def __init__(self, config: SFMPConfig) -> None:
        super().__init__()
        self.sfmp = config
        self.modules = frozenset(config.quantized_modules)
        self.arch: ArchSpec | None = None  # known once vLLM passes the HF config

    def __repr__(self) -> str:
        return (f"SFMPQuantConfig(avg_bits={self.sfmp.avg_bits}, "
                f"bits_per_weight={self.sfmp.bits_per_weight}, group_size={self.sfmp.group_size}, "
                f"block_rows={self.sfmp.block_rows}, layers={len(self.modules)})")

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the CUDA kernels target sm_80+; not consulted on the CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # quantization_config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SFMPQuantConfig":
        return cls(SFMPConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config: Any = None,
                            revision: str | None = None) -> None:
        """vLLM calls this once, with the model path, before anything is loaded: the place
        for the checks vLLM's loader does not make (sfmp_serve.preflight)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type is not None:
            self.arch = arch_for(model_type)
        from sfmp_serve.preflight import check_for_vllm
        check_for_vllm(model_name)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        # Models whose vLLM module names differ from the checkpoint's rename them here.
        self.modules = frozenset(hf_to_vllm_mapper.apply_list(sorted(self.modules)))

    def shards_of(self, prefix: str) -> list[str]:
        """Stored linears behind the vLLM layer `prefix`, in vLLM's shard order.

        vLLM's packed_modules_mapping (set from the model class before any layer is built)
        decides; without one, the architecture table's copy of it. A layer fused in the
        checkpoint as well (Phi-3's qkv_proj) is one stored linear for all its shards.
        """
        base, _, name = prefix.rpartition(".")
        members = (self.packed_modules_mapping or {}).get(name)
        if members:
            return [f"{base}.{m}" if base else m for m in members]
        for spec in (self.arch,) if self.arch is not None else ARCHITECTURES:
            for fused, names in spec.fused.items():
                if prefix == fused or prefix.endswith("." + fused):
                    head = prefix[: len(prefix) - len(fused)]
                    return [head + n for n in names]
        return [prefix]

    def _moe_method(self, layer: Any, prefix: str) -> QuantizeMethodBase | None:
        """The method of a FusedMoE layer (`prefix`: <layer>.<block>.experts): SFMP when every
        expert's projections are quantized, vLLM's unquantized one (None) when none is."""
        names = {"w1": layer.ckpt_gate_proj_name, "w3": layer.ckpt_up_proj_name,
                 "w2": layer.ckpt_down_proj_name}
        stored = [f"{prefix}.{e}.{n}" for e in range(layer.global_num_experts)
                  for n in names.values()]
        quantized = [n for n in stored if n in self.modules]
        if not quantized:
            return None
        if len(quantized) != len(stored):
            missing = next(n for n in stored if n not in self.modules)
            raise SFMPError(f"layer {prefix}: vLLM serves its experts as one layer, but "
                            f"{missing} is not in quantization_config.quantized_modules "
                            f"while {quantized[0]} is; quantize all experts or none")
        if layer.local_num_experts != layer.global_num_experts or _tensor_parallel_size() > 1:
            raise SFMPError(f"layer {prefix}: SFMP serves experts on one rank only (no tensor "
                            "or expert parallelism); run one replica per GPU instead")
        from sfmp_serve.quant_method.moe_method import SFMPMoEMethod
        return SFMPMoEMethod(self.sfmp, layer.moe_config, prefix, names)

    def get_quant_method(self, layer: torch.nn.Module,
                         prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, RoutedExperts):
            return self._moe_method(layer, prefix)
        if not isinstance(layer, LinearBase):
            return None  # embeddings, (tied) lm_head, attention: unquantized defaults
        shards = self.shards_of(prefix)
        quantized = [name in self.modules for name in shards]
        if not any(quantized):
            return UnquantizedLinearMethod()
        if not all(quantized):
            names = shards
            missing = [n for n, q in zip(names, quantized) if not q]
            raise SFMPError(f"layer {prefix}: vLLM fuses {names} into one layer, but "
                            f"{missing} are not in quantization_config.quantized_modules; "
                            "quantize all or none of them")
        check_tensor_parallel(self.sfmp, _tensor_parallel_size())
        from sfmp_serve.quant_method.linear_method import SFMPLinearMethod
        return SFMPLinearMethod(self.sfmp, prefix, shards)
