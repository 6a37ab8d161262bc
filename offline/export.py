"""Export: PackedLinear tensors, the SFMPConfig, the unquantized tensors, and the directory.

Quantized linears are stored only in SFMP form (alpha/beta in the activation dtype = the
model's dtype); everything else keeps its original dtype. Tied lm_head weights are not stored
twice. The directory is written atomically by sfmp_serve.format.write_checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from offline.quantizers.base import QuantizedCodes
from offline.reorder import Order
from offline.streaming import SafetensorsSource
from sfmp_serve.bitplanes import bcq_scales, pack_linear
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import (ACT_DTYPES, WORD_BITS, LayerGeometry, PackedLinear,
                               SFMPConfig, write_checkpoint)

log = logging.getLogger(__name__)

# Files besides config.json and weights that a served model needs (tokenizer, chat template,
# generation defaults). Weights in other formats are deliberately not copied.
COPY_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                 "merges.txt", "chat_template*", "generation_config.json")


def act_dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in ACT_DTYPES.items() if d == dtype)


def pack_codes(quantized: QuantizedCodes, block_bits: torch.Tensor, geometry: LayerGeometry,
               order: Order, act_dtype: torch.dtype,
               bias: torch.Tensor | None = None) -> PackedLinear:
    """Bit planes + (alpha, beta) of one linear from its reordered integer codes."""
    qweight, offsets = pack_linear(quantized.codes, block_bits, geometry)
    bits = block_bits.to(torch.int64).repeat_interleave(geometry.rows(), dim=0)
    alpha, beta = bcq_scales(quantized.scale, quantized.zero, bits)
    return PackedLinear(qweight=qweight, alpha=alpha.to(act_dtype), beta=beta.to(act_dtype),
                        block_bits=block_bits.to(torch.uint8), block_offsets=offsets,
                        input_perm=order.input_perm.to(torch.int32).clone(),  # groups share it
                        output_perm=order.output_perm.to(torch.int32).clone(),
                        bias=None if bias is None else bias.detach().clone())


def packed_nbytes(geometry: LayerGeometry, block_bits: torch.Tensor,
                  act_dtype: torch.dtype) -> int:
    """Bytes the PackedLinear for this allocation will take (bias excluded), without packing."""
    _, words = geometry.offsets(block_bits)
    tables = geometry.n_block_rows * geometry.n_groups
    act_bytes = torch.empty(0, dtype=act_dtype).element_size()
    return (words * WORD_BITS // 8 + 2 * geometry.out_features * geometry.n_groups * act_bytes
            + tables * (1 + 4) + 4 * (geometry.out_features + geometry.in_features))


def unquantized_tensors(model: nn.Module, quantized: Mapping[str, Any],
                        orig_dtypes: Mapping[str, torch.dtype],
                        source: SafetensorsSource | None = None) -> dict[str, torch.Tensor]:
    """Every state-dict tensor that is not a quantized linear's weight/bias, in its original
    dtype; a tensor shared with an earlier key (tied lm_head) is stored once. Tensors on meta
    (streamed decoder layers) are read from `source`."""
    skip = {f"{name}.{p}" for name in quantized for p in ("weight", "bias")}
    seen: set[int] = set()
    out = {}
    for key, tensor in model.state_dict().items():
        if key in skip:
            continue
        if tensor.is_meta:
            if source is None:
                raise SFMPError(f"tensor {key} was never loaded (on meta) and has no source")
            out[key] = source.read([key])[key]
            continue
        ptr = tensor.data_ptr()
        if tensor.numel() and ptr in seen:
            log.debug("%s is tied to an earlier tensor: not stored", key)
            continue
        seen.add(ptr)
        out[key] = tensor.detach().to(orig_dtypes.get(key, tensor.dtype)).clone()
    return out


def nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bits_per_weight(packed: Mapping[str, PackedLinear]) -> float:
    """All stored bits of the quantized linears (codes, scales, tables, perms) per weight."""
    weights = sum(p.out_features * p.in_features for p in packed.values())
    return sum(p.stored_bits() for p in packed.values()) / weights


def copy_files(model_dir: str | os.PathLike) -> list[Path]:
    """Tokenizer, chat template and generation config files of MODEL_DIR."""
    found = {f for pattern in COPY_PATTERNS for f in Path(model_dir).glob(pattern)
             if f.is_file()}
    return sorted(found)


def save_checkpoint(out_dir: str | os.PathLike, model_dir: str | os.PathLike,
                    hf_config: Mapping[str, Any], config: SFMPConfig,
                    packed: Mapping[str, PackedLinear], extra: Mapping[str, torch.Tensor],
                    overwrite: bool = False) -> Path:
    """Write the checkpoint directory atomically (config.json keeps every original key)."""
    tensors = dict(extra)
    for name, p in packed.items():
        tensors.update(p.to_tensors(name))
    out = write_checkpoint(out_dir, hf_config, config, tensors, copy_files(model_dir),
                           overwrite=overwrite)
    log.info("wrote %s (%.1f MB of tensors)", out, nbytes(tensors) / 1e6)
    return out
