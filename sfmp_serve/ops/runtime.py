"""One serving layer from one or more SFMP shards, composed once at load.

vLLM fuses linears that read the same input (q/k/v, gate/up) into one layer whose output is
the shards' outputs concatenated. SFMP shards of such a group share one input order (the
offline pipeline reorders their columns together), so the fused layer needs ONE input gather
and, after the concatenated reordered output, ONE composed output gather. This module builds
that description, checks the shards agree, and names the layer and tensor when they do not.
Backends (ops/cpu_native/, ops/cpu_torch.py, ops/cuda/) turn it into their own runtime state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sfmp_serve.errors import FormatError
from sfmp_serve.format import ACT_DTYPES, PackedLinear, SFMPConfig


@dataclass(frozen=True)
class LayerSpec:
    """The small frozen description a backend decides on (STYLE.md: serving -> kernel)."""

    name: str
    in_features: int
    shard_out_features: tuple[int, ...]
    group_size: int
    block_rows: int
    bits: tuple[int, ...]  # bit-widths that occur in this layer, sorted
    act_dtype: torch.dtype  # dtype of x and y
    device_type: str

    @property
    def out_features(self) -> int:
        return sum(self.shard_out_features)


@dataclass
class FusedLayer:
    """Shards of one vLLM layer, in vLLM's output order, plus the composed permutations.

    input_perm: int64 [in_features], shared by every shard: reordered input j = x[:, input_perm[j]].
    output_gather: int64 [out_features]: y = y_cat[:, output_gather], where y_cat is the shards'
        reordered outputs concatenated in shard order (the inverse of the composed output_perm).
    row_offsets: first reordered row of each shard inside y_cat.
    """

    spec: LayerSpec
    config: SFMPConfig
    shards: tuple[PackedLinear, ...]
    input_perm: torch.Tensor
    output_gather: torch.Tensor
    row_offsets: tuple[int, ...]


def _shared_input_perm(name: str, shard_names: tuple[str, ...],
                       shards: tuple[PackedLinear, ...]) -> torch.Tensor:
    first = shards[0].input_perm
    for shard_name, shard in zip(shard_names[1:], shards[1:]):
        if not torch.equal(shard.input_perm, first):
            raise FormatError(
                f"layer {name}: tensor {shard_name}.input_perm differs from "
                f"{shard_names[0]}.input_perm; vLLM fuses these linears, so they must share one "
                "input order (quantize them as one input group)")
    return first.to(torch.int64)


def compose_output_gather(shards: tuple[PackedLinear, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Index that takes the concatenated reordered outputs to the fused original order."""
    offsets, pieces, start = [], [], 0
    for shard in shards:
        offsets.append(start)
        pieces.append(shard.output_perm.to(torch.int64) + start)
        start += shard.out_features
    fused_perm = torch.cat(pieces)  # y_cat column i is original fused column fused_perm[i]
    gather = torch.empty_like(fused_perm)
    gather[fused_perm] = torch.arange(fused_perm.numel())
    return gather, tuple(offsets)


def fuse_shards(name: str, shard_names: tuple[str, ...], shards: tuple[PackedLinear, ...],
                config: SFMPConfig, act_dtype: torch.dtype,
                device: torch.device | str) -> FusedLayer:
    """Compose already validated shards (PackedLinear.validate) into one layer description."""
    if not shards or len(shards) != len(shard_names):
        raise ValueError(f"layer {name}: need one name per shard, got {len(shard_names)} names "
                         f"for {len(shards)} shards")
    if act_dtype not in ACT_DTYPES.values():
        raise FormatError(f"layer {name}: activation dtype {act_dtype} is not supported "
                          f"(expected one of {sorted(ACT_DTYPES)})")
    in_features = shards[0].in_features
    for shard_name, shard in zip(shard_names, shards):
        if shard.in_features != in_features:
            raise FormatError(f"layer {name}: tensor {shard_name}.input_perm has "
                              f"{shard.in_features} inputs, {shard_names[0]} has {in_features}")
    input_perm = _shared_input_perm(name, shard_names, shards)
    output_gather, offsets = compose_output_gather(shards)
    bits = sorted({int(b) for s in shards for b in s.block_bits.unique().tolist()})
    spec = LayerSpec(name=name, in_features=in_features,
                     shard_out_features=tuple(s.out_features for s in shards),
                     group_size=config.group_size, block_rows=config.block_rows,
                     bits=tuple(bits), act_dtype=act_dtype,
                     device_type=torch.device(device).type)
    return FusedLayer(spec, config, tuple(shards), input_perm, output_gather, offsets)
