"""`AutoModelForCausalLM.from_pretrained(sfmp_ckpt)` through transformers' quantizer registry.

Without this, transformers warns "Unknown quantization type" and silently loads a model whose
quantized linears are randomly initialised. `register_transformers()` (called on import of
sfmp_serve.hf) registers the "sfmp" config and quantizer: before loading, each listed linear
becomes an SFMPLinear with empty buffers shaped like the checkpoint's tensors (read from the
safetensors headers); transformers fills them by name; after loading, every layer is validated
exactly as `load_sfmp_model` does.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,
                                          AUTO_QUANTIZER_MAPPING)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from sfmp_serve.errors import FormatError
from sfmp_serve.format import QUANT_METHOD, TENSOR_SUFFIXES, PackedLinear, SFMPConfig
from sfmp_serve.hf.linear import SFMPLinear, check_bias, find_linear, replace_module

_ST_DTYPES = {"I32": torch.int32, "U8": torch.uint8, "I64": torch.int64, "F16": torch.float16,
              "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class SFMPQuantizationConfig(QuantizationConfigMixin):
    """transformers' view of `quantization_config`; all checking is SFMPConfig's."""

    def __init__(self, **kwargs: Any) -> None:
        self.sfmp = SFMPConfig.from_dict(kwargs)
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict[str, Any]:
        return self.sfmp.to_dict()


def _safetensors_header(path: str | Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", ...}} without reading any tensor data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def _empty_packed(name: str, header: dict[str, dict]) -> PackedLinear:
    tensors = {}
    for suffix in (*TENSOR_SUFFIXES, "bias"):
        entry = header.get(f"{name}.{suffix}")
        if entry is None:
            if suffix == "bias":
                continue
            raise FormatError(f"layer {name}: missing tensor {name}.{suffix}")
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise FormatError(f"layer {name}: tensor {name}.{suffix}: unsupported dtype "
                              f"{entry['dtype']}")
        tensors[suffix] = torch.empty(entry["shape"], dtype=dtype, device="meta")
    return PackedLinear(**{s: tensors[s] for s in TENSOR_SUFFIXES}, bias=tensors.get("bias"))


class SFMPHfQuantizer(HfQuantizer):
    requires_calibration = True  # only pre-quantized checkpoints: `sfmp quantize` makes them
    quantization_config: SFMPQuantizationConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("sfmp: transformers can only load SFMP checkpoints; create them "
                             "with `sfmp quantize`")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None,
                                             **kwargs: Any) -> None:
        header: dict[str, dict] = {}
        for f in checkpoint_files or ():
            header.update(_safetensors_header(f))
        config = self.quantization_config.sfmp
        self._shapes = {}
        for name in config.quantized_modules:
            linear = find_linear(model, name)
            check_bias(name, linear, f"{name}.bias" in header)
            self._shapes[name] = (linear.out_features, linear.in_features)
            replace_module(model, name, SFMPLinear(_empty_packed(name, header), config))

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        config = self.quantization_config.sfmp
        for name in config.quantized_modules:
            module = model.get_submodule(name)
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
