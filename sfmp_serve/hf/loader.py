"""Load SFMP checkpoints into transformers models, or quantize a loaded model in memory.

Loading follows gpt-fast: build the model with empty (meta) parameters, swap every quantized
linear for an SFMPLinear holding the checkpoint's packed tensors, assign the remaining tensors,
tie the embeddings. No dense weight of a quantized linear is ever materialised. The experts of
a mixture-of-experts model are one module per expert and projection (sfmp_serve.experts), as
the checkpoint stores them.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import torch
from torch import nn

from sfmp_serve.errors import SFMPError, one_line
from sfmp_serve.experts import unroll_experts
from sfmp_serve.format import Checkpoint, PackedLinear, SFMPConfig, load_checkpoint
from sfmp_serve.hf.linear import (SFMPLinear, check_bias, dequantize_linears, find_linear,
                                  replace_module)
from sfmp_serve.hf.model_check import check_complete, empty_model
from sfmp_serve.model_dir import model_spec, module_name

log = logging.getLogger(__name__)


def quantize_in_memory(model: nn.Module, packed: Mapping[str, PackedLinear],
                       config: SFMPConfig,
                       tensors: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace the linears named in `packed` (checkpoint names) by SFMPLinear (in place;
    returns the model). `tensors`: other tensors by checkpoint name (the pipeline's
    extra_tensors: AWQ's folded norms and routers), loaded under the model's names first.

    Each PackedLinear is validated against the linear it replaces. A PackedLinear without a
    bias keeps the model's own bias, so the pipeline's in-memory result and the loaded
    checkpoint compute the same function. A mixture-of-experts model's stacked experts are
    first unrolled into one linear per expert and projection, as a loaded checkpoint has them.
    """
    spec = model_spec(model)
    if spec is not None:
        unroll_experts(model, spec)
    if tensors:
        model.load_state_dict({module_name(model, k): v for k, v in tensors.items()},
                              strict=False)
    for name, p in packed.items():
        linear = find_linear(model, name)
        p.validate(name, config, (linear.out_features, linear.in_features))
        if p.bias is None and linear.bias is not None:
            p = PackedLinear(**{**vars(p), "bias": linear.bias.detach()})
        replace_module(model, name, SFMPLinear(p, config).to(linear.weight.device))
    return model


def _load_rest(model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """Assign every tensor that is not part of a quantized linear (names and shapes were
    checked by check_complete), then tie the embeddings."""
    quantized = set(ckpt.config.quantized_modules)
    rest = {module_name(model, key): tensor.to(dtype) if tensor.is_floating_point() else tensor
            for key, tensor in ckpt.tensors.items() if key.rpartition(".")[0] not in quantized}
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:  # check_complete's contract; a bug if it did not hold
        raise RuntimeError(f"parameter {still_empty[0]} was not loaded")


def _attach_generation_config(model: nn.Module, ckpt: Checkpoint) -> None:
    from transformers import GenerationConfig

    if (ckpt.path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(ckpt.path)
        except Exception as e:  # transformers' validation raises several types
            raise SFMPError(f"{ckpt.path}/generation_config.json: not usable "
                            f"({one_line(e)})") from e


def load_sfmp_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, dequantized: bool = False,
                    verify: bool = True) -> nn.Module:
    """A transformers causal LM from an SFMP checkpoint, quantized linears as SFMPLinear.

    dtype: of the unquantized tensors (default: the checkpoint's act_dtype). Packed alpha/beta
    keep the act_dtype; the op accumulates in float32 and returns the activation's dtype.
    dequantized: each quantized linear becomes a DequantizedLinear (float32 dense weight, the
    same values): fast evaluation at several times the memory of the packed form.
    verify: check every tensor against its checksum (format version 2). Completeness, shapes
    and finite values are always checked.
    """
    ckpt = load_checkpoint(path, validate=False, verify=verify)
    dtype = dtype or ckpt.config.torch_act_dtype
    model = empty_model(ckpt.path, ckpt.hf_config, dtype)
    shapes = check_complete(model, ckpt.config, {k: t.shape for k, t in ckpt.tensors.items()},
                            ckpt.files, ckpt.path)
    ckpt.validate(shapes)
    linears = {n: find_linear(model, n) for n in ckpt.config.quantized_modules}
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
