"""Export: PackedLinear tensors, the stored tensors of each unit (a decoder layer, or what lies
outside the layers), and the in-memory checkpoint directory.

Quantized linears are stored only in SFMP form (alpha/beta in the activation dtype = the
model's dtype); everything else keeps its original dtype. Tied lm_head weights are not stored
twice. `save_checkpoint` writes a whole in-memory result atomically through
sfmp_serve.format.write_checkpoint; offline.writer writes unit by unit as layers finish.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from offline.allocation import block_sizes
from offline.model_io import LoadedModel
from offline.quantizers.base import QuantizedCodes
from offline.reorder import Order
from offline.sequential import LayerResult
from offline.targets import decoder_layers
from sfmp_serve.bitplanes import bcq_scales, pack_linear
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import (ACT_DTYPES, WORD_BITS, BitStats, LayerGeometry, PackedLinear,
                               SFMPConfig, all_finite, perm_dtype, write_checkpoint)
from sfmp_serve.shards import DEFAULT_MAX_SHARD_SIZE, split_units

CARD_FILE = "README.md"

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
                        block_bits=block_bits.to(torch.uint8).clone(), block_offsets=offsets,
                        input_perm=order.input_perm.to(torch.int32).clone(),  # groups share it
                        output_perm=order.output_perm.to(torch.int32).clone(),
                        bias=None if bias is None else bias.detach().clone(),
                        ranges=(geometry.row_ranges, geometry.col_ranges))


def packed_nbytes(geometry: LayerGeometry, block_bits: torch.Tensor,
                  act_dtype: torch.dtype) -> int:
    """Bytes the PackedLinear for this allocation will take (bias excluded), without packing."""
    _, words = geometry.offsets(block_bits)
    tables = geometry.n_block_rows * geometry.n_groups
    act_bytes = torch.empty(0, dtype=act_dtype).element_size()
    return (words * WORD_BITS // 8 + 2 * geometry.out_features * geometry.n_groups * act_bytes
            + tables * (1 + 4)
            + sum(n * torch.empty(0, dtype=perm_dtype(n)).element_size()
                  for n in (geometry.out_features, geometry.in_features)))


@dataclass
class Unit:
    """The stored tensors of one decoder layer (index >= 0) or of everything outside the
    decoder layers (index -1): the unit a writer puts into a shard and a resumed run skips."""

    index: int
    tensors: dict[str, torch.Tensor]  # state-dict names -> stored tensors, packed ones included
    packed: dict[str, PackedLinear] = field(default_factory=dict)
    stats: BitStats = field(default_factory=lambda: BitStats(0, 0, 0))
    hidden: list[torch.Tensor] | None = None  # calibration inputs of the next layer

    def add_to(self, stats: BitStats) -> BitStats:
        return BitStats(stats.weights + self.stats.weights,
                        stats.code_bits + self.stats.code_bits,
                        stats.stored_bits + self.stats.stored_bits)


def _orig(loaded: LoadedModel, key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(loaded.orig_dtypes.get(key, tensor.dtype))


def _checked(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and not all_finite(tensor):
        raise SFMPError(f"tensor {key} contains NaN or Inf after quantization")
    return tensor


def outside_unit(loaded: LoadedModel) -> Unit:
    """Every state-dict tensor outside the decoder layers (embeddings, final norm, lm_head) in
    its original dtype; a tensor shared with an earlier key (tied lm_head) is stored once."""
    layers = loaded.spec.layers_path + "."
    seen: set[int] = set()
    out = {}
    for key, tensor in loaded.model.state_dict().items():
        if key.startswith(layers):
            continue
        if tensor.numel() and tensor.data_ptr() in seen:
            log.debug("%s is tied to an earlier tensor: not stored", key)
            continue
        seen.add(tensor.data_ptr())
        out[key] = _orig(loaded, key, tensor).clone()
    return Unit(-1, out)


def layer_unit(loaded: LoadedModel, config: SFMPConfig, geos: Mapping[str, LayerGeometry],
               orders: Mapping[str, Order], block_bits: Mapping[str, torch.Tensor],
               result: LayerResult) -> Unit:
    """Decoder layer `result.index` as stored: its quantized linears packed (biases and every
    other tensor the method changed taken from the result), the rest in the original dtype
    (read from the checkpoint when the layer is streamed)."""
    prefix = loaded.targets.layer_prefix(result.index)
    names = [t.name for t in loaded.targets if t.layer == result.index and t.name in geos]
    changed = result.tensors
    packed, stats = {}, BitStats(0, 0, 0)
    for name in names:
        bias, key = None, f"{name}.bias"
        if loaded.targets[name].has_bias:
            bias = _orig(loaded, key, changed[key] if key in changed else loaded.read(key))
        geo = geos[name]
        p = pack_codes(result.codes[name], block_bits[name], geo, orders[name],
                       loaded.act_dtype, bias)
        p.validate(name, config, (geo.out_features, geo.in_features))
        packed[name] = p
        stats = BitStats(stats.weights + geo.out_features * geo.in_features,
                         stats.code_bits + int((block_bits[name].to(torch.int64)
                                                * block_sizes(geo)).sum()),
                         stats.stored_bits + p.stored_bits())
    skip = {f"{n}.{s}" for n in names for s in ("weight", "bias")}
    tensors = {}
    layer = decoder_layers(loaded.model, loaded.spec)[result.index]
    for local in layer.state_dict():
        key = loaded.spec.stored_key(f"{prefix}.{local}")  # MoE: the checkpoint's block name
        if key not in skip:
            value = changed[key] if key in changed else loaded.read(key)
            tensors[key] = _checked(key, _orig(loaded, key, value))
    for name, p in packed.items():
        tensors.update(p.to_tensors(name))
    return Unit(result.index, tensors, packed, stats, result.hidden)


def unquantized_nbytes(loaded: LoadedModel, quantized: Iterable[str]) -> int:
    """Bytes the checkpoint's unquantized tensors will take (nothing is read: shapes and
    dtypes only), tied tensors once."""
    skip = {f"{name}.{p}" for name in quantized for p in ("weight", "bias")}
    seen: set[int] = set()
    total = 0
    for key, tensor in loaded.model.state_dict().items():
        key = loaded.spec.stored_key(key)
        if key in skip:
            continue
        if not tensor.is_meta and tensor.numel():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
        dtype = loaded.orig_dtypes.get(key, tensor.dtype)
        total += tensor.numel() * torch.empty(0, dtype=dtype).element_size()
    return total


def nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copy_files(model_dir: str | os.PathLike) -> list[Path]:
    """Tokenizer, chat template and generation config files of MODEL_DIR."""
    found = {f for pattern in COPY_PATTERNS for f in Path(model_dir).glob(pattern)
             if f.is_file()}
    return sorted(found)


def save_checkpoint(out_dir: str | os.PathLike, model_dir: str | os.PathLike,
                    hf_config: Mapping[str, Any], config: SFMPConfig,
                    packed: Mapping[str, PackedLinear], extra: Mapping[str, torch.Tensor],
                    overwrite: bool = False, options: Any = None,
                    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, **card: Any) -> Path:
    """Write the checkpoint directory atomically (config.json keeps every original key); with
    the pipeline's `options`, also its recipe and model card (`card`: model_card's
    keyword arguments)."""
    tensors = dict(extra)
    for name, p in packed.items():
        tensors.update(p.to_tensors(name))
    texts = {}
    if options is not None:
        from offline.card import model_card
        from sfmp_serve.recipe import RECIPE_FILE, Recipe

        recipe = Recipe.from_options(options).resolved()
        size = nbytes(tensors)
        shards = len(split_units([(k, t.numel() * t.element_size())
                                  for k, t in tensors.items()], max_shard_size))
        texts[RECIPE_FILE] = recipe.dump()
        texts[CARD_FILE] = model_card(Path(out_dir).name, model_dir, hf_config, config,
                                      recipe, size, shards, **card)
    out = write_checkpoint(out_dir, hf_config, config, tensors, copy_files(model_dir),
                           overwrite=overwrite, max_shard_size=max_shard_size,
                           text_files=texts)
    log.info("wrote %s (%.1f MB of tensors)", out, nbytes(tensors) / 1e6)
    return out
