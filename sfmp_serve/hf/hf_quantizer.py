"""`AutoModelForCausalLM.from_pretrained(sfmp_ckpt)` through transformers' quantizer registry.

Without this, transformers would warn "Unknown quantization type" and load a model whose
quantized linears are randomly initialised; checkpoints therefore carry a guard in config.json
that stops such a load with the import to make (format.TRANSFORMERS_GUARD), and the quantizer
removes it before transformers looks for the weight files. `register_transformers()` (called on
import of sfmp_serve.hf) registers the "sfmp" config and quantizer: before loading, the
checkpoint is read and checked as `load_sfmp_model` checks it (checksums, structure, finite
values, every parameter of the model present at its shape) and each listed linear becomes an
SFMPLinear with empty buffers shaped like the checkpoint's tensors; transformers fills them by
name; after loading, every layer is validated again as transformers stored it. In a
mixture-of-experts model, the sparse layers whose experts are quantized get their experts as
one module per expert and projection (sfmp_serve.experts), named as the checkpoint names them
(transformers still renames the block, Mixtral's block_sparse_moe -> mlp); sparse layers left
unquantized keep transformers' stacked experts, which transformers fills from the per-expert
tensors itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,
                                          AUTO_QUANTIZER_MAPPING)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from sfmp_serve.errors import SFMPError
from sfmp_serve.experts import moe_layers, unroll_experts
from sfmp_serve.format import (QUANT_METHOD, TENSOR_SUFFIXES, TRANSFORMERS_GUARD_KEY,
                               PackedLinear, SFMPConfig, load_checkpoint)
from sfmp_serve.hf.linear import SFMPLinear, replace_module
from sfmp_serve.hf.model_check import check_complete, empty_model
from sfmp_serve.model_dir import model_spec, module_name


class SFMPQuantizationConfig(QuantizationConfigMixin):
    """transformers' view of `quantization_config`; all checking is SFMPConfig's."""

    def __init__(self, **kwargs: Any) -> None:
        self.sfmp = SFMPConfig.from_dict(kwargs)
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict[str, Any]:
        return self.sfmp.to_dict()


def _empty_packed(name: str, stored: dict[str, torch.Tensor],
                  ranges: tuple[int, int]) -> PackedLinear:
    """Meta tensors shaped like the stored ones (already validated), for transformers to fill."""
    tensors = {suffix: torch.empty_like(stored[f"{name}.{suffix}"], device="meta")
               for suffix in (*TENSOR_SUFFIXES, "bias") if f"{name}.{suffix}" in stored}
    return PackedLinear(**{s: tensors[s] for s in TENSOR_SUFFIXES}, bias=tensors.get("bias"),
                        ranges=ranges)


class SFMPHfQuantizer(HfQuantizer):
    requires_calibration = True  # only pre-quantized checkpoints: `sfmp quantize` makes them
    quantization_config: SFMPQuantizationConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("sfmp: transformers can only load SFMP checkpoints; create them "
                             "with `sfmp quantize`")

    def update_tp_plan(self, config):
        # The first hook that receives the model's config before transformers resolves the
        # weight files, where the guard would stop the load; our reader finds them itself.
        if TRANSFORMERS_GUARD_KEY in config:
            delattr(config, TRANSFORMERS_GUARD_KEY)
        return super().update_tp_plan(config)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None,
                                             **kwargs: Any) -> None:
        if not checkpoint_files:
            raise SFMPError("sfmp: no checkpoint files to load")
        # The files are read and checked exactly as load_sfmp_model reads them (checksums,
        # structure, finite values, completeness) before transformers reads them again; on
        # the CPU, as transformers makes the meta device the default here.
        spec = model_spec(model)
        with torch.device("cpu"):
            ckpt = load_checkpoint(Path(checkpoint_files[0]).parent, validate=False)
            # Checked against the model as the checkpoint stores it (experts unrolled).
            reference = model if spec is None or spec.moe is None else empty_model(
                ckpt.path, ckpt.hf_config, model.dtype)
            self._shapes = check_complete(reference, ckpt.config,
                                          {k: t.shape for k, t in ckpt.tensors.items()},
                                          ckpt.files, ckpt.path)
            ckpt.validate(self._shapes)
        config = self.quantization_config.sfmp
        if spec is not None and spec.moe is not None:
            quantized = set(config.quantized_modules)
            unroll_experts(model, spec, [
                i for i in moe_layers(model, spec)
                if spec.stored_key(f"{spec.layers_path}.{i}.{spec.moe.expert_linears(0)[0]}")
                in quantized])
        for name in config.quantized_modules:
            replace_module(model, name, SFMPLinear(
                _empty_packed(name, ckpt.tensors, config.ranges_of(name)), config))

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        config = self.quantization_config.sfmp
        for name in config.quantized_modules:
            module = model.get_submodule(module_name(model, name))
            packed = module.packed()
            # transformers casts floating tensors to the requested dtype; validate as stored.
            packed.alpha = packed.alpha.to(config.torch_act_dtype)
            packed.beta = packed.beta.to(config.torch_act_dtype)
            packed.validate(name, config, self._shapes[name])
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register_transformers() -> None:
    """Register "sfmp" with transformers' quantizer registry (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, SFMPQuantizationConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, SFMPHfQuantizer)
