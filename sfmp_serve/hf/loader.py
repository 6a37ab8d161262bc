"""Load SFMP checkpoints into transformers models, or quantize a loaded model in memory.

Loading follows gpt-fast: build the model with empty (meta) parameters, swap every quantized
linear for an SFMPLinear holding the checkpoint's packed tensors, assign the remaining tensors,
tie the embeddings. No dense weight of a quantized linear is ever materialised.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import torch
from torch import nn

from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.format import (TENSOR_SUFFIXES, Checkpoint, PackedLinear, SFMPConfig,
                               load_checkpoint)
from sfmp_serve.hf.linear import (SFMPLinear, check_bias, dequantize_linears, find_linear,
                                  replace_module)

log = logging.getLogger(__name__)


def quantize_in_memory(model: nn.Module, packed: Mapping[str, PackedLinear],
                       config: SFMPConfig) -> nn.Module:
    """Replace the linears named in `packed` by SFMPLinear (in place; returns the model).

    Each PackedLinear is validated against the linear it replaces. A PackedLinear without a
    bias keeps the model's own bias, so the pipeline's in-memory result and the loaded
    checkpoint compute the same function.
    """
    for name, p in packed.items():
        linear = find_linear(model, name)
        p.validate(name, config, (linear.out_features, linear.in_features))
        if p.bias is None and linear.bias is not None:
            p = PackedLinear(**{**vars(p), "bias": linear.bias.detach()})
        replace_module(model, name, SFMPLinear(p, config).to(linear.weight.device))
    return model


def _build_empty_model(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """The model of the checkpoint's config with meta parameters and real (computed) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = {k: v for k, v in ckpt.hf_config.items() if k != "quantization_config"}
    model_type = hf.pop("model_type", None)
    if model_type is None:
        raise SFMPError(f"{ckpt.path}/config.json: no model_type")
    try:
        config = AutoConfig.for_model(model_type, **hf)
    except (ValueError, KeyError) as e:
        raise SFMPError(f"{ckpt.path}/config.json: transformers cannot build '{model_type}' "
                        f"({e})") from e
    # Buffers such as rotary inv_freq are computed in __init__; keep them off the meta device.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _load_rest(model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """Assign every tensor that is not part of a quantized linear; strict about names."""
    quantized = set(ckpt.config.quantized_modules)
    known = set(TENSOR_SUFFIXES) | {"bias"}
    rest = {}
    for key, tensor in ckpt.tensors.items():
        owner, _, suffix = key.rpartition(".")
        if owner not in quantized:
            rest[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        elif suffix not in known:
            raise FormatError(f"layer {owner}: tensor {key}: unknown SFMP tensor "
                              f"(expected {', '.join(sorted(known))})")
    expected = set(model.state_dict())
    unexpected = sorted(set(rest) - expected)
    if unexpected:
        raise FormatError(f"tensor {unexpected[0]}: not a parameter of the "
                          f"{type(model).__name__} model")
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise FormatError(f"tensor {still_empty[0]}: missing from the checkpoint")


def _attach_generation_config(model: nn.Module, ckpt: Checkpoint) -> None:
    from transformers import GenerationConfig

    if (ckpt.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(ckpt.path)


def load_sfmp_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, dequantized: bool = False) -> nn.Module:
    """A transformers causal LM from an SFMP checkpoint, quantized linears as SFMPLinear.

    dtype: of the unquantized tensors (default: the checkpoint's act_dtype). Packed alpha/beta
    keep the act_dtype; the op accumulates in float32 and returns the activation's dtype.
    dequantized: each quantized linear becomes a DequantizedLinear (float32 dense weight, the
    same values): fast evaluation at several times the memory of the packed form.
    """
    ckpt = load_checkpoint(path, validate=False)
    dtype = dtype or ckpt.config.torch_act_dtype
    model = _build_empty_model(ckpt, dtype)
    linears = {n: find_linear(model, n) for n in ckpt.config.quantized_modules}
    ckpt.validate({n: (m.out_features, m.in_features) for n, m in linears.items()})
    for name, linear in linears.items():
        packed = ckpt.packed(name)
        check_bias(name, linear, packed.bias is not None)
        if packed.bias is not None:
            packed.bias = packed.bias.to(dtype)
        replace_module(model, name, SFMPLinear(packed, ckpt.config))
    _load_rest(model, ckpt, dtype)
    _attach_generation_config(model, ckpt)
    model.eval()
    if dequantized:
        dequantize_linears(model)
    log.info("loaded %s: %d SFMP linears%s", path, len(linears),
             " (dequantized to float32)" if dequantized else "")
    return model.to(device)
