"""Load-time repack for the tensor-core kernels (mma.cuh): canonical shards -> fragment order.

The checkpoint format does not change; this runs once per (fused) layer at load. The kernels
compute y^T = W x^T with `mma.sync.m16n8k16` and the weights as the A operand (swap-AB: 16
output rows per mma, the batch in the n8 dimension), so the weight must be stored the way one
warp's 32 lanes hold an A fragment. docs/gpu-kernels.md has the picture; in short:

- Padded row space: every block-row of every shard is padded to a multiple of 16 rows, so a
  16-row tile never crosses a block (its bit-width is uniform per group) or a shard.
- Padded K space: every group is padded to a multiple of 64 inputs (a "chunk": four k16 mma
  steps) and cut into k-blocks of at most two chunks (128 inputs). `kidx[kp]` is the original
  input read at padded position kp, or -1 (a zero activation).
- For each (tile, k-block) with b bits: b planes x 32 lanes x chunks u32 words. The word of
  plane p, lane (g = lane / 4, t = lane % 4), chunk c holds bit p of the 32 codes that lane
  needs for the four k16 steps of the chunk: its A fragment rows g and g + 8, columns
  16 j + {2t, 2t+1, 2t+8, 2t+9}. The codes of one mma step are gathered from the planes into a
  "T-word" of 8 nibbles (b <= 4) or two T-words of 4 bytes (b >= 5), each slot one code, with
  b - 1 bit selects (lop3) and rotations; `plane_sources` gives the exact bit positions.
- scales: (alpha, beta) of rows g and g + 8 for every (tile, k-block, g): one 8-byte load per
  lane, in the activation dtype as stored in the checkpoint (the kernel forms 2 alpha and
  beta - alpha (2^b - 1) in fp32, so nothing is rounded beyond the checkpoint).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sfmp_serve.bitplanes import unpack_codes
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import MAX_BITS, PackedLinear, SFMPConfig
from sfmp_serve.ops.cuda.repack import check_dtype
from sfmp_serve.ops.runtime import compose_output_gather

TILE_ROWS = 16  # mma m16: output rows per warp tile
STEP_COLS = 16  # mma k16
CHUNK_COLS = 64  # four k16 steps: the inputs one u32 plane word of a lane covers
KBLOCK_CHUNKS = 2  # a k-block (the kernel's unit of staging and scaling) is <= 128 inputs
LANES = 32
NIBBLE_MAX_BITS = 4  # b <= 4: codes gathered into nibbles, else into bytes
WARPS_PER_CTA = 4  # tiles per thread block; the kernels' kWarps (mma.cuh)


def slot_period(bits: int) -> int:
    """Bits per code slot of a T-word: 4 (nibbles) for b <= 4, 8 (bytes) above."""
    return 4 if bits <= NIBBLE_MAX_BITS else 8


def _slot_register(period: int, n: int, slot: int) -> tuple[int, int, int]:
    """(local k16 step j, A register r, half h) of slot `slot` of T-word `n`.

    A registers of m16n8k16 (row-major A): r0 = row g, k 2t..2t+1; r1 = row g+8, same k;
    r2 = row g, k 2t+8..2t+9; r3 = row g+8, same k; the half h picks the second k.
    Nibble T-words (one per step): slot s = register s % 4, half s // 4, so a shift by 4r and
    a mask 0x000f000f put register r's two codes at bits 0 and 16. Byte T-words (two per step):
    slot s = register 2 (n % 2) + s % 2, half s // 2 (a shift by 8i, mask 0x00ff00ff).
    """
    if period == 4:
        return n, slot % 4, slot // 4
    return n // 2, 2 * (n % 2) + slot % 2, slot // 2


@functools.cache
def plane_sources(period: int) -> tuple[np.ndarray, np.ndarray]:
    """For every plane p, lane and bit x of a plane word: the (row in the tile, column in the
    chunk) whose code supplies that bit. Returns rows, cols int64 [8 planes, 32 lanes, 32 bits].

    T-word n, slot s, code bit p lives at bit (period * s + p + n) mod 32 of plane p's word:
    within one plane the T-words are rotated by n, so every (n, s) gets a distinct bit, and the
    kernel undoes the rotation once per T-word after selecting the planes (mma.cuh)."""
    rows = np.zeros((MAX_BITS, LANES, 32), dtype=np.int64)
    cols = np.zeros_like(rows)
    for p in range(MAX_BITS):
        for n in range(period):
            for s in range(32 // period):
                x = (period * s + p + n) % 32
                j, r, h = _slot_register(period, n, s)
                for lane in range(LANES):
                    g, t = divmod(lane, 4)
                    rows[p, lane, x] = g + 8 * (r % 2)
                    cols[p, lane, x] = STEP_COLS * j + 2 * t + 8 * (r // 2) + h
    return rows, cols


@dataclass
class MmaLinear:
    """One (fused) linear in the tensor-core kernels' layout, built by `repack_mma`."""

    qweight: torch.Tensor  # int32 [total]: per (tile, k-block): [plane][lane][chunk]
    tile_meta: torch.Tensor  # int32 [n_tiles, n_kblocks, 2] = (word offset, bits)
    kb_info: torch.Tensor  # int32 [n_kblocks, 4] = (padded column, chunks, group, 0)
    kidx: torch.Tensor  # int32 [padded_cols]: original input, or -1 for padding
    scales: torch.Tensor  # dtype [n_tiles, n_kblocks, 8, 2, 2]: (g, row g / g+8, alpha/beta)
    out_row: torch.Tensor  # int32 [padded_rows]: fused original output, or -1 for padding
    gather_index: torch.Tensor  # int64 [out_features]: padded row of every original output
    counters: torch.Tensor  # int32 [row blocks * 2]: split-K tickets, zero between calls
    bias: torch.Tensor | None  # dtype [out_features], original order
    out_features: int
    in_features: int
    group_size: int
    dtype: torch.dtype

    @property
    def n_tiles(self) -> int:
        return self.tile_meta.shape[0]

    @property
    def n_kblocks(self) -> int:
        return self.tile_meta.shape[1]

    @property
    def padded_rows(self) -> int:
        return self.out_row.numel()

    @property
    def padded_cols(self) -> int:
        return self.kidx.numel()

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        tensors = (self.qweight, self.tile_meta, self.kb_info, self.kidx, self.scales,
                   self.out_row, self.gather_index, self.counters, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class KSpace:
    kb_info: np.ndarray  # [n_kb, 4]
    col_to_kp: np.ndarray  # [K]: padded position of reordered input j
    padded_cols: int


def k_space(in_features: int, group_size: int) -> KSpace:
    kb_rows, col_to_kp, kp = [], np.empty(in_features, dtype=np.int64), 0
    for g in range(math.ceil(in_features / group_size)):
        start = g * group_size
        cols = min(group_size, in_features - start)
        col_to_kp[start:start + cols] = kp + np.arange(cols)
        chunks = math.ceil(cols / CHUNK_COLS)
        for c0 in range(0, chunks, KBLOCK_CHUNKS):
            n = min(KBLOCK_CHUNKS, chunks - c0)
            kb_rows.append((kp, n, g, 0))
            kp += n * CHUNK_COLS
    return KSpace(np.array(kb_rows, dtype=np.int64), col_to_kp, kp)


def _row_space(shards: Sequence[PackedLinear], config: SFMPConfig):
    """Padded row of every concatenated reordered row, the padded row count, and per tile the
    (shard, block-row) it belongs to."""
    padded_of_row, tile_block, start = [], [], 0
    for s, shard in enumerate(shards):
        geo = shard.geometry(config)
        for r, rows in enumerate(geo.rows().tolist()):
            padded_of_row.append(start + np.arange(rows))
            tiles = math.ceil(rows / TILE_ROWS)
            tile_block += [(s, r)] * tiles
            start += tiles * TILE_ROWS
    return np.concatenate(padded_of_row), start, tile_block


def _plane_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 [tiles, 16, 64] of one chunk -> plane words uint32 [bits, tiles, 32].

    Plane p's bit x comes from the same code as plane 0's bit x - p (plane_sources), so the
    codes are gathered once and each plane is plane 0's packing rotated left by p."""
    rows, cols = plane_sources(slot_period(bits))
    flat = rows[0] * CHUNK_COLS + cols[0]  # [32 lanes, 32 bits] into a tile's 16 x 64 codes
    picked = np.take(codes.reshape(codes.shape[0], -1), flat, axis=1)  # [tiles, 32, 32]
    out = np.empty((bits, codes.shape[0], LANES), dtype=np.uint32)
    for p in range(bits):
        # bit x of a word = element x: little-endian bytes of little-endian bit order
        q = np.packbits((picked >> p) & 1, axis=-1, bitorder="little").view("<u4")[..., 0]
        out[p] = q if p == 0 else (q << np.uint32(p)) | (q >> np.uint32(32 - p))
    return out


PACK_BATCH = 8192  # (tile, k-block) pairs packed at a time: bounds the temporary memory


def _pack_words(codes_pad: np.ndarray, tile_bits: np.ndarray,
                kspace: KSpace) -> tuple[np.ndarray, np.ndarray]:
    """Fragment-order words of every (tile, k-block) and their word offsets (tile-major)."""
    n_tiles, n_kb = tile_bits.shape
    chunks = kspace.kb_info[:, 1]
    sizes = tile_bits.astype(np.int64) * LANES * chunks[None, :]
    ends = np.cumsum(sizes.reshape(-1))
    offsets = (ends - sizes.reshape(-1)).reshape(n_tiles, n_kb)
    total = int(ends[-1]) if ends.size else 0
    if total >= 2**31:
        raise SFMPError(f"{total} repacked words exceed the kernels' int32 offsets")
    words = np.zeros(total, dtype=np.uint32)
    # [tile, chunk, 16, 64]: one contiguous block of codes per (tile, chunk)
    blocks = np.ascontiguousarray(
        codes_pad.reshape(n_tiles, TILE_ROWS, -1, CHUNK_COLS).transpose(0, 2, 1, 3))
    plane_lane = np.arange(MAX_BITS)[:, None] * LANES + np.arange(LANES)[None, :]  # [8, 32]
    for b in np.unique(tile_bits).tolist():
        for c in range(KBLOCK_CHUNKS):  # pairs of this width whose k-block has a chunk c
            tile_idx, kb_idx = np.nonzero((tile_bits == b) & (chunks[None, :] > c))
            for i in range(0, tile_idx.size, PACK_BATCH):
                t, kb = tile_idx[i:i + PACK_BATCH], kb_idx[i:i + PACK_BATCH]
                block = blocks[t, kspace.kb_info[kb, 0] // CHUNK_COLS + c]  # [pairs, 16, 64]
                planes = _plane_words(block, b)  # [b, pairs, 32]
                # word (p, lane, c) of a block sits at offset + (p * 32 + lane) * chunks + c
                index = (offsets[t, kb][None, :, None]
                         + plane_lane[:b, None, :] * chunks[kb][None, :, None] + c)
                words[index] = planes
    return words, offsets


def repack_mma(shards: Sequence[PackedLinear], config: SFMPConfig,
               output_gather: torch.Tensor, dtype: torch.dtype, device: torch.device | str,
               bias: torch.Tensor | None = None, name: str = "linear") -> MmaLinear:
    """Validated shards sharing one input_perm -> the tensor-core layout on `device`.

    `output_gather` takes the shards' concatenated reordered outputs to the fused original order
    (ops.runtime.compose_output_gather)."""
    check_dtype(dtype, f"layer {name}")
    k = shards[0].in_features
    kspace = k_space(k, config.group_size)
    padded_of_row, n_pad, tile_block = _row_space(shards, config)
    n = padded_of_row.size
    codes_pad = np.zeros((n_pad, kspace.padded_cols), dtype=np.uint8)
    alpha = np.zeros((n_pad, math.ceil(k / config.group_size)), dtype=np.float32)
    beta = np.zeros_like(alpha)
    row0 = 0
    for shard in shards:
        geo = shard.geometry(config)
        codes = unpack_codes(shard.qweight.cpu(), shard.block_bits.cpu(),
                             shard.block_offsets.cpu(), geo).numpy()
        rows = padded_of_row[row0:row0 + geo.out_features]
        codes_pad[rows[:, None], kspace.col_to_kp[None, :]] = codes
        alpha[rows] = shard.alpha.float().cpu().numpy()
        beta[rows] = shard.beta.float().cpu().numpy()
        row0 += geo.out_features
    block_bits = [s.block_bits.cpu().numpy().astype(np.int64) for s in shards]
    tile_bits = np.stack([block_bits[s][r][kspace.kb_info[:, 2]] for s, r in tile_block])
    words, offsets = _pack_words(codes_pad, tile_bits, kspace)

    # (alpha, beta) of rows g and g+8 of every tile, for the group of every k-block
    groups = kspace.kb_info[:, 2]
    pair = np.stack([alpha[:, groups], beta[:, groups]], axis=-1)  # [n_pad, n_kb, 2]
    pair = pair.reshape(n_pad // TILE_ROWS, 2, 8, len(groups), 2)  # tile, half, g, kb, ab
    scales = torch.from_numpy(np.ascontiguousarray(pair.transpose(0, 3, 2, 1, 4)))
    # the checkpoint's values, exactly: float32 holds every fp16/bf16 value
    scales = scales.to(dtype)

    gather = output_gather.to(torch.int64).cpu().numpy()
    out_row = np.full(n_pad, -1, dtype=np.int64)
    out_row[padded_of_row[gather]] = np.arange(n)
    kidx = np.full(kspace.padded_cols, -1, dtype=np.int64)
    kidx[kspace.col_to_kp] = shards[0].input_perm.to(torch.int64).cpu().numpy()
    row_blocks = math.ceil((n_pad // TILE_ROWS) / WARPS_PER_CTA)

    def put(a: np.ndarray | torch.Tensor, to: torch.dtype) -> torch.Tensor:
        t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
        return t.to(device=device, dtype=to).contiguous()

    meta = np.stack([offsets, tile_bits], axis=-1)
    return MmaLinear(
        qweight=put(words.view(np.int32), torch.int32), tile_meta=put(meta, torch.int32),
        kb_info=put(kspace.kb_info, torch.int32), kidx=put(kidx, torch.int32),
        scales=put(scales, dtype), out_row=put(out_row, torch.int32),
        gather_index=put(padded_of_row[gather], torch.int64),
        counters=torch.zeros(2 * row_blocks, dtype=torch.int32, device=device),
        bias=None if bias is None else put(bias, dtype), out_features=n, in_features=k,
        group_size=config.group_size, dtype=dtype)


def repack_mma_linear(packed: PackedLinear, config: SFMPConfig, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> MmaLinear:
    """One unfused linear, with its bias, on `device` (default: where `packed` lives)."""
    gather, _ = compose_output_gather((packed,))
    device = device if device is not None else packed.qweight.device
    return repack_mma((packed,), config, gather, dtype or config.torch_act_dtype, device,
                      bias=packed.bias)
