"""Plain-torch CPU path of the SFMP op: the fallback where the compiled kernels (ops/cpu_native)
cannot be built (no C++ compiler, not x86-64) or are turned off (SFMP_CPU_KERNEL=torch).
Weights stay packed, tiles are decoded per call.

Per call, per chunk of rows (sized so a chunk's decoded tile stays in L2):
1. Decode every block's codes from its sign planes with table lookups, straight into int8:
   the bytes of two planes for the same 8 inputs form one 16-bit index into a 65536-entry
   int64 table whose 8 bytes are the 8 partial codes; an odd top plane uses a 256-entry table.
   One index_select decodes 8 weights x 2 planes: measured 1.3-1.8x faster than one plane per
   lookup and ~3x faster than shift-and-mask unpacking. The top plane's tables produce the
   *centred* code t = q - 2^(b-1) in two's complement, so the GEMM sees small signed values.
2. Convert the int8 tile to the compute dtype and multiply it with the input in ONE batched
   GEMM over the chunk's blocks ([blocks, M, cols] x [blocks, cols, rows]); each block is one
   group, so its scale is per output row and is applied to the small [blocks, M, rows] result:
       w = alpha (2q - (2^b - 1)) + beta = (2 alpha) t + (alpha + beta).
3. Sum the blocks of each row tile, add xsum_g @ (alpha + beta) per group, gather the rows.
Everything static (plane bytes regrouped plane-major, block order, scales, both gathers) is
built once at load by ops/cpu_torch_layout.py; a decoded tile lives for one chunk only.

Dispatch by batch size: the block GEMMs run in float32, except for bfloat16 inputs with more
than DECODE_MAX_M rows, where a bf16 GEMM is ~4x faster on AVX512-BF16 CPUs and exact in its
inputs (t is an integer in [-128, 127]); scales, offsets and sums are always float32.
From DENSE_MIN_M rows on (prefill), a chunk is instead dequantized into a dense [rows, in] tile
in the activation dtype (w = 2 alpha t + alpha + beta, rounded once, as the GPU's dequantize +
cuBLAS path does) and multiplied in ONE GEMM: the per-group batched GEMMs write n_groups
partial [M, rows] products, which at M in the thousands costs more than the GEMM itself.
The byte views assume a little-endian host (x86, ARM), checked in can_implement.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from sfmp_serve.ops import api
from sfmp_serve.ops.cpu_torch_layout import Chunk, CpuLayer, WidthClass, build
from sfmp_serve.ops.runtime import FusedLayer, LayerSpec

_F32 = torch.float32
# From this many rows on, chunks are dequantized to a dense tile and multiplied in one GEMM
# (SmolLM2 shapes, bf16, 1 thread, against the per-group GEMMs: 1.1-2.9x faster at M = 256,
# 2-4x at M = 2048; slower at M = 128, where decoding the tile is not yet paid back).
DENSE_MIN_M = 256


def _bytes_of(values: torch.Tensor) -> torch.Tensor:
    """[..., 8] byte values -> int64 with byte k = value k (little-endian)."""
    return (values.to(torch.int64) << (8 * torch.arange(8))).sum(-1)


_V8 = torch.arange(256)
_BITS8 = (_V8[:, None] >> torch.arange(8)) & 1  # [256, 8]: bit k of byte v
_SPREAD = _bytes_of(_BITS8)  # byte k = bit k
_V16 = torch.arange(1 << 16)
# (lo | hi << 8), two planes' bytes for the same 8 inputs -> their 2-bit partial codes.
_PAIR = _SPREAD[_V16 & 0xFF] | (_SPREAD[_V16 >> 8] << 1)


@functools.lru_cache(maxsize=None)
def _top_table(bits: int) -> torch.Tensor:
    """[256] table of the top plane (bits-1): a clear bit contributes -2^(b-1) in two's
    complement, so OR-ing the lower planes gives the int8 code t = q - 2^(b-1)."""
    negative = (0xFF << (bits - 1)) & 0xFF
    return _bytes_of((1 - _BITS8) * negative)


@functools.lru_cache(maxsize=None)
def _top_pair_table(bits: int) -> torch.Tensor:
    """[65536] table of the top two planes (bits-2, bits-1) for even bit-widths."""
    return (_SPREAD[_V16 & 0xFF] << (bits - 2)) | _top_table(bits)[_V16 >> 8]


def _decode(cls: WidthClass) -> torch.Tensor:
    """Centred int8 codes of a width class, as int64 [n] (8 codes per element)."""
    out = torch.empty(cls.n, dtype=torch.int64)
    for run in cls.pairs:
        idx = run.data.view(torch.uint16).to(torch.int32)
        parts = ((_PAIR, 0, run.split), (_top_pair_table(run.top_bits), run.split, idx.numel()))
        for table, lo, hi in parts:
            if lo == hi:
                continue
            if run.shift == 0:  # the first run covers every block of 2+ bits: write
                torch.index_select(table, 0, idx[lo:hi], out=out[lo:hi])
                continue
            part = torch.index_select(table, 0, idx[lo:hi])
            if table is _PAIR:  # top-pair tables already place their planes
                part.bitwise_left_shift_(run.shift)
            out[lo:hi].bitwise_or_(part)
    for top in cls.tops:
        part = torch.index_select(_top_table(top.bits), 0, top.data.to(torch.int32))
        dst = out[top.start:top.start + part.numel()]
        if top.bits == 1:  # 1-bit blocks have no pair run
            dst.copy_(part)
        else:
            dst.bitwise_or_(part)
    return out


def _class_matmul(x_groups: torch.Tensor, cls: WidthClass, rows: int) -> torch.Tensor:
    """[blocks, M, rows] = per-block x_g @ t^T for one width class."""
    tile = _decode(cls).view(torch.int8).view(-1, rows, cls.cols).to(x_groups.dtype)
    xg = x_groups.index_select(0, cls.group)[:, :, :cls.cols]
    return torch.bmm(xg, tile.transpose(1, 2))


def _chunk_matmul(x_groups: torch.Tensor, xsum: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """[M, n_tiles * rows]: the chunk's reordered output rows."""
    parts = [_class_matmul(x_groups, c, chunk.rows) for c in chunk.classes]
    out = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(_F32).mul_(chunk.scale)
    m = xsum.shape[0]
    if chunk.tile is None:
        y = out.sum(0, keepdim=True)
    else:
        y = out.new_zeros(chunk.n_tiles, m, chunk.rows).index_add_(0, chunk.tile, out)
    y.baddbmm_(xsum.expand(chunk.n_tiles, -1, -1), chunk.offset)
    return y.transpose(0, 1).reshape(m, chunk.n_tiles * chunk.rows)


def dense_chunk(chunk: Chunk, groups: int, group_cols: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The chunk's weights [n_tiles * rows, groups * group_cols] in the padded reordered input
    order (padding columns zero), float32 arithmetic rounded once to `dtype`."""
    w = torch.zeros(chunk.n_tiles, chunk.rows, groups, group_cols, dtype=_F32)
    by_block = w.permute(0, 2, 1, 3)  # [tile, group, rows, cols] view: blocks write through
    first = 0
    for cls in chunk.classes:
        blocks = cls.group.numel()
        t = _decode(cls).view(torch.int8).view(blocks, chunk.rows, cls.cols).to(_F32)
        tiles = (chunk.tile[first:first + blocks] if chunk.tile is not None
                 else torch.zeros(blocks, dtype=torch.int64))
        scale = chunk.scale[first:first + blocks].transpose(1, 2)  # [blocks, rows, 1]
        offset = chunk.offset[tiles, cls.group][:, :, None]  # [blocks, rows, 1]
        by_block[tiles, cls.group, :, :cls.cols] = t.mul_(scale).add_(offset)
        first += blocks
    return w.view(chunk.n_tiles * chunk.rows, groups * group_cols).to(dtype)


def _apply_dense(x_r: torch.Tensor, state: CpuLayer) -> torch.Tensor:
    """[M, n_chunk_rows] for prefill-sized M: one GEMM per chunk on its dequantized tile."""
    flat = x_r.reshape(x_r.shape[0], -1)
    return torch.cat([flat @ dense_chunk(c, state.groups, state.group_cols, flat.dtype).t()
                      for c in state.chunks], 1)


def apply(x: torch.Tensor, state: CpuLayer) -> torch.Tensor:
    """y [M, out] = x [M, in] @ W^T for a prepared layer (no bias)."""
    m = x.shape[0]
    gemm_dtype = (torch.bfloat16 if x.dtype == torch.bfloat16 and m > api.DECODE_MAX_M
                  else _F32)
    xc = F.pad(x, (0, 1)) if state.pad_input else x
    x_r = xc.index_select(1, state.in_gather).view(m, state.groups, state.group_cols)
    if m >= DENSE_MIN_M:
        return _apply_dense(x_r, state).index_select(1, state.out_gather).to(x.dtype)
    xsum = x_r.sum(-1, dtype=_F32)
    x_groups = x_r.transpose(0, 1).to(gemm_dtype).contiguous()  # [groups, M, group_cols]
    parts = [_chunk_matmul(x_groups, xsum, chunk) for chunk in state.chunks]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return y.index_select(1, state.out_gather).to(x.dtype)


def prepare(layer: FusedLayer) -> CpuLayer:
    """The runtime state of a fused layer (for callers without the op registry)."""
    return build(layer)


class TorchCpuBackend:
    """Plain-torch backend for any layer on the CPU (the lowest-priority CPU backend)."""

    name = "cpu-torch"
    device_type = "cpu"

    def can_implement(self, spec: LayerSpec) -> tuple[bool, str]:
        if spec.device_type != "cpu":
            return False, f"runs on the CPU only, not on {spec.device_type}"
        if sys.byteorder != "little":
            return False, "the byte-level decoding needs a little-endian host"
        return True, ""

    def prepare(self, layer: FusedLayer) -> CpuLayer:
        return build(layer)

    def apply(self, x: torch.Tensor, state: CpuLayer) -> torch.Tensor:
        return apply(x, state)


api.register_backend(TorchCpuBackend())
