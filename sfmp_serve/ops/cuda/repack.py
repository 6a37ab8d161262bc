"""Runtime repack, once at load: canonical PackedLinear shards -> what the CUDA kernels read.

The plane words stay exactly as stored: the canonical block layout [bits][words][rows] already
puts consecutive rows of one word next to each other, which is what the kernels want (a thread
per row, coalesced loads). The shards of a fused layer (q/k/v, gate/up; they share one input
order) are stacked into one matrix of sum(out_features) reordered rows:
- qweight: the shards' words concatenated; block offsets shifted accordingly;
- meta[block_row][group] = (word offset, bits), block-rows of all shards in shard order;
- row_info[row] = (block-row, row inside it, rows of that block-row, 0): every shard's last
  block-row may be ragged, so a row's block cannot be found by one division;
- scales[group][row] = (alpha, beta) in the activation dtype: threads mapped to consecutive
  rows read one coalesced 32-bit word each;
- output_perm[row] = fused original output of reordered row `row` (the kernels' scatter), and
  its inverse output_index (the gather of the large-batch path), input_perm as int32 (kernels)
  and int64 (torch index_select).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from sfmp_serve.errors import SFMPError
from sfmp_serve.format import PackedLinear, SFMPConfig
from sfmp_serve.ops.runtime import compose_output_gather

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class CudaLinear:
    """One (fused) linear in the CUDA kernels' layout, built by `repack`/`repack_shards`."""

    qweight: torch.Tensor  # int32 [total_words]
    meta: torch.Tensor  # int32 [n_block_rows, n_groups, 2] = (word offset, bits)
    row_info: torch.Tensor  # int32 [out_features, 4] = (block-row, local row, its rows, 0)
    scales: torch.Tensor  # dtype [n_groups, out_features, 2] = (alpha, beta)
    input_perm: torch.Tensor  # int32 [in_features]
    input_index: torch.Tensor  # int64 [in_features] (= input_perm)
    output_perm: torch.Tensor  # int32 [out_features]: reordered row -> original output
    output_index: torch.Tensor  # int64 [out_features]: y = y_reordered[:, output_index]
    bias: torch.Tensor | None  # dtype [out_features], original order
    out_features: int
    in_features: int
    group_size: int
    dtype: torch.dtype

    @property
    def n_groups(self) -> int:
        return math.ceil(self.in_features / self.group_size)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Device bytes this layer keeps resident."""
        tensors = (self.qweight, self.meta, self.row_info, self.scales, self.input_perm,
                   self.input_index, self.output_perm, self.output_index, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def check_dtype(dtype: torch.dtype, where: str) -> None:
    if dtype not in KERNEL_DTYPES:
        raise SFMPError(f"{where}: activation dtype {dtype} is not supported by the CUDA "
                        f"kernels (expected float16 or bfloat16)")


def _row_info(shards: Sequence[PackedLinear], config: SFMPConfig) -> torch.Tensor:
    pieces, first_block_row = [], 0
    for shard in shards:
        geo = shard.geometry(config)
        rows = torch.arange(geo.out_features)
        block_row = rows // config.block_rows
        pieces.append(torch.stack([block_row + first_block_row,
                                   rows - block_row * config.block_rows,
                                   geo.rows()[block_row], torch.zeros_like(rows)], dim=1))
        first_block_row += geo.n_block_rows
    return torch.cat(pieces)


def repack_shards(shards: Sequence[PackedLinear], config: SFMPConfig,
                  output_gather: torch.Tensor, dtype: torch.dtype,
                  device: torch.device | str, bias: torch.Tensor | None = None,
                  name: str = "linear") -> CudaLinear:
    """Stack validated shards that share one input_perm; `output_gather` takes their
    concatenated reordered outputs to the fused original order (ops.runtime)."""
    check_dtype(dtype, f"layer {name}")
    in_features = shards[0].in_features
    meta, base = [], 0
    for shard in shards:
        offsets = shard.block_offsets.to(torch.int64).cpu() + base
        meta.append(torch.stack([offsets, shard.block_bits.to(torch.int64).cpu()], dim=-1))
        base += shard.qweight.numel()
    if base >= 2**31:
        raise SFMPError(f"layer {name}: {base} packed words exceed the CUDA kernels' int32 "
                        "offsets")
    output_index = output_gather.to(torch.int64).cpu()
    output_perm = torch.empty_like(output_index)
    output_perm[output_index] = torch.arange(output_index.numel())
    scales = torch.cat([torch.stack([s.alpha.t(), s.beta.t()], dim=-1).cpu() for s in shards],
                       dim=1)

    def put(t: torch.Tensor, to: torch.dtype) -> torch.Tensor:
        return t.to(device=device, dtype=to).contiguous()

    return CudaLinear(
        qweight=put(torch.cat([s.qweight for s in shards]), torch.int32),
        meta=put(torch.cat(meta), torch.int32), row_info=put(_row_info(shards, config),
                                                             torch.int32),
        scales=put(scales, dtype), input_perm=put(shards[0].input_perm, torch.int32),
        input_index=put(shards[0].input_perm, torch.int64),
        output_perm=put(output_perm, torch.int32), output_index=put(output_index, torch.int64),
        bias=None if bias is None else put(bias, dtype),
        out_features=int(output_index.numel()), in_features=in_features,
        group_size=config.group_size, dtype=dtype)


def repack(packed: PackedLinear, config: SFMPConfig, dtype: torch.dtype | None = None,
           device: torch.device | str | None = None) -> CudaLinear:
    """One unfused linear, with its bias, on `device` (default: where `packed` lives)."""
    gather, _ = compose_output_gather((packed,))
    device = device if device is not None else packed.qweight.device
    return repack_shards((packed,), config, gather, dtype or config.torch_act_dtype, device,
                         bias=packed.bias)
