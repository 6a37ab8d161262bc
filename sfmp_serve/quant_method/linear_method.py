"""SFMPLinearMethod: loads one vLLM linear layer's SFMP shards and calls the sfmp::linear op.

Lifecycle (vLLM's):
1. create_weights: empty placeholder parameters named like the checkpoint tensors, with a
   weight_loader that keeps each shard's tensors as they arrive (under tensor parallelism only
   this rank's slice of each, cut as it arrives: sfmp_serve/tp.py) (shard ids "q"/"k"/"v" or 0/1
   for layers vLLM fuses from several stored linears, in any order; None for a layer that is
   one stored linear, which may still cover several of vLLM's output partitions: Phi-3's
   qkv_proj).
2. process_weights_after_loading: every shard is validated against the model's [out, in]
   (a FormatError names layer and tensor and fails start-up), then ops.api builds the runtime
   layout ONCE (one input gather for the fused layer, one composed output gather, the
   backend's tables). The loaded tensors are dropped; the weights stay packed. The model
   gauges (average bits, bits per weight) are computed from the tensors served.
3. apply: one opaque custom-op call (+ bias). Nothing is derived per forward here, and no
   Python branch depends on the batch: vLLM's torch.compile would freeze it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

import torch
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.utils import set_weight_attrs

from sfmp_serve import metrics
from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve import tp
from sfmp_serve.format import (TENSOR_SUFFIXES, BitStats, LayerGeometry, PackedLinear,
                               SFMPConfig, perm_dtype)
from sfmp_serve.ops import api
from sfmp_serve.tp import rank_share

logger = logging.getLogger(__name__)

_LOADED = "_sfmp_loaded"  # layer attribute: shard index -> {tensor suffix: tensor}
_QKV = {"q": 0, "k": 1, "v": 2}  # vLLM's shard ids of QKVParallelLinear
# Bits of the layers this process serves, so the model gauges report the tensors, not the config.
_served = BitStats(0, 0, 0)


def _add_served(stats: BitStats) -> BitStats:
    global _served
    _served = BitStats(_served.weights + stats.weights, _served.code_bits + stats.code_bits,
                       _served.stored_bits + stats.stored_bits)
    return _served


def _placeholder_dtype(suffix: str, config: SFMPConfig, shapes: list[tuple[int, int]],
                       ) -> torch.dtype:
    # Matching dtypes keep vLLM's loader from warning about "mismatched" placeholders.
    if suffix in ("alpha", "beta"):
        return config.torch_act_dtype
    if suffix in ("input_perm", "output_perm"):  # stored as their format version stores them
        length = max(s[1] if suffix == "input_perm" else s[0] for s in shapes)
        return perm_dtype(length, config.format_version)
    return torch.uint8 if suffix == "block_bits" else torch.int32


class SFMPLinearMethod(LinearMethodBase):
    """Serves one (possibly fused) linear layer from SFMP shards."""

    def __init__(self, config: SFMPConfig, prefix: str, shards: list[str]) -> None:
        self.config = config
        self.prefix = prefix
        self.shard_names = tuple(shards)
        self.shapes: list[tuple[int, int]] = []  # [out, in] per shard, from create_weights
        self.handle: api.LayerHandle | None = None

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        split_in = input_size_per_partition != input_size
        split_out = sum(output_partition_sizes) != output_size
        if len(output_partition_sizes) == len(self.shard_names):
            self.shapes = [(n, input_size_per_partition) for n in output_partition_sizes]
        elif len(self.shard_names) == 1:  # fused in the checkpoint: one linear, every partition
            self.shapes = [(sum(output_partition_sizes), input_size_per_partition)]
        else:
            raise SFMPError(f"layer {self.prefix}: vLLM expects {len(output_partition_sizes)} "
                            f"shards, the checkpoint has {list(self.shard_names)}")
        # This rank's share of each stored linear (None: the whole linear).
        tp_size, rank = getattr(layer, "tp_size", 1), getattr(layer, "tp_rank", 0)
        self.shares, self.full = [], []
        for name, (rows, cols) in zip(self.shard_names, self.shapes):
            ranges = self.config.ranges_of(name)
            share = (rank_share(name, self.config.split_of(name), tp_size, rank)
                     if split_in or split_out else None)
            if share is not None and (share.dim == "in") != split_in:
                raise SFMPError(f"layer {name}: vLLM splits its "
                                f"{'inputs' if split_in else 'outputs'} over {tp_size} ranks, "
                                f"the checkpoint's ranges split its {share.dim}puts")
            if share is None:
                full = (rows, cols)
            elif split_in:
                full = (rows, input_size)
            else:  # a rank holds `count` of the n equal output ranges
                full = (rows // share.count * share.n, cols)
            self.shares.append(share)
            try:
                self.full.append(LayerGeometry(*full, self.config.group_size,
                                               self.config.block_rows, *ranges))
            except FormatError as e:  # vLLM's shape and the checkpoint's ranges disagree
                raise FormatError(f"layer {name}: tensor-parallel ranges {list(ranges)}: "
                                  f"{e}") from None
        setattr(layer, _LOADED, {})
        for suffix in TENSOR_SUFFIXES:
            param = torch.nn.Parameter(
                torch.empty(0, dtype=_placeholder_dtype(suffix, self.config, self.shapes)),
                requires_grad=False)
            set_weight_attrs(param, {"weight_loader": functools.partial(self._load, layer,
                                                                         suffix)})
            layer.register_parameter(suffix, param)

    def _shard_index(self, suffix: str, shard_id: str | int | None) -> int:
        count = len(self.shard_names)
        index = _QKV.get(shard_id) if isinstance(shard_id, str) and count == 3 else shard_id
        if count == 1 and shard_id is None:
            return 0
        if count > 1 and isinstance(index, int) and 0 <= index < count:
            return index
        expected = [None] if count == 1 else (list(_QKV) if count == 3 else []) + list(
            range(count))
        raise FormatError(f"layer {self.prefix}: tensor {suffix} arrived with shard id "
                          f"{shard_id!r}, expected one of {expected} (stored linears "
                          f"{list(self.shard_names)})")

    def _load(self, layer: torch.nn.Module, suffix: str, param: torch.nn.Parameter,
              loaded_weight: torch.Tensor, shard_id: str | int | None = None) -> None:
        index = self._shard_index(suffix, shard_id)
        kept = getattr(layer, _LOADED).setdefault(index, {})
        share, geo = self.shares[index], self.full[index]
        if share is None:
            kept[suffix] = loaded_weight
            return
        # Keep only this rank's slice. qweight is cut by the full block_offsets, which the
        # checkpoint's (sorted) tensor order delivers first; otherwise it waits for them.
        if suffix == "block_offsets":
            kept["_offsets"] = loaded_weight.clone()
            pending = kept.pop("_qweight", None)
            if pending is not None:
                kept["qweight"] = tp.narrow("qweight", pending, geo, share, loaded_weight)
        if suffix == "qweight" and "_offsets" not in kept:
            kept["_qweight"] = loaded_weight
            return
        kept[suffix] = tp.narrow(suffix, loaded_weight, geo, share, kept.get("_offsets"))

    def _packed_shards(self, layer: torch.nn.Module) -> tuple[PackedLinear, ...]:
        loaded = getattr(layer, _LOADED)
        shards = []
        for index, (name, shape) in enumerate(zip(self.shard_names, self.shapes)):
            tensors = {f"{name}.{k}": v for k, v in loaded.get(index, {}).items()}
            share, geo = self.shares[index], self.full[index]
            packed = PackedLinear.from_tensors(name, tensors, self.config.ranges_of(name))
            if share is not None:
                packed = tp.localize(packed, geo, share)
            packed.validate(name, self.config, shape)
            shards.append(packed)
        return tuple(shards)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        device = layer.qweight.device
        shards = tuple(replace(p, **{k: getattr(p, k).to(device) for k in TENSOR_SUFFIXES})
                       for p in self._packed_shards(layer))
        self.handle = api.prepare_layer(self.prefix, self.shard_names, shards, self.config,
                                        layer.params_dtype, device)
        delattr(layer, _LOADED)  # the runtime state owns what it needs; drop the raw tensors
        served = _add_served(BitStats.of(shards, self.config))
        metrics.set_model_info(served.avg_bits, served.bits_per_weight)
        logger.debug("SFMP layer %s: %s backend, %d resident bytes", self.prefix,
                     self.handle.backend, self.handle.nbytes)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ops.sfmp.linear(x, self.prefix, sum(n for n, _ in self.shapes))
        return y if bias is None else y + bias
