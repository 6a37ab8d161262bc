"""Bit-plane (BCQ) packing: pure, stateless functions between integer codes and packed words.

An unsigned b-bit code q = sum_i 2^i c_i (c_i in {0,1}); with s_i = 2 c_i - 1 in {-1,+1},
w = scale * (q - zero) = sum_i alpha * 2^i * s_i + beta, alpha = scale / 2,
beta = scale * ((2^b - 1) / 2 - zero). Planes are packed 32 inputs per int32 word, LSB first.
"""

from __future__ import annotations

import torch

from sfmp_serve.format import WORD_BITS, LayerGeometry

_SHIFTS = torch.arange(WORD_BITS, dtype=torch.int64)


def bcq_scales(scale: torch.Tensor, zero: torch.Tensor,
               bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha, beta of the bit-plane form from an asymmetric (scale, zero) pair per group.

    `bits` broadcasts against scale (per row-group bit-width)."""
    levels = (2.0 ** bits.to(torch.float64) - 1.0)
    scale64 = scale.to(torch.float64)
    alpha = scale64 / 2
    beta = scale64 * (levels / 2 - zero.to(torch.float64))
    return alpha, beta


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_block(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [R, K_g] -> int32 words [bits, W, R] (W = ceil(K_g / 32), zero-padded)."""
    rows, cols = codes.shape
    words = -(-cols // WORD_BITS)
    padded = torch.zeros(rows, words * WORD_BITS, dtype=torch.int64)
    padded[:, :cols] = codes.to(torch.int64)
    planes = []
    for i in range(bits):
        plane_bits = ((padded >> i) & 1).view(rows, words, WORD_BITS)
        packed = (plane_bits << _SHIFTS).sum(-1)  # [R, W]
        planes.append(packed.t())
    return _to_int32(torch.stack(planes))


def unpack_block_bits(words: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 words [b, W, R] -> 0/1 planes uint8 [b, R, cols]."""
    b, w, r = words.shape
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    bits = (unsigned.permute(0, 2, 1)[..., None] >> _SHIFTS.to(words.device)) & 1
    return bits.reshape(b, r, w * WORD_BITS)[..., :cols].to(torch.uint8)


def pack_linear(codes: torch.Tensor, block_bits: torch.Tensor,
                geometry: LayerGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Reordered codes uint8 [N, K] -> (qweight int32 [total], block_offsets int32)."""
    offsets, total = geometry.offsets(block_bits)
    qweight = torch.empty(total, dtype=torch.int32)
    rows, cols = geometry.rows().tolist(), geometry.cols().tolist()
    r0 = 0
    for r, nrows in enumerate(rows):
        c0 = 0
        for g, ncols in enumerate(cols):
            b = int(block_bits[r, g])
            block = pack_block(codes[r0:r0 + nrows, c0:c0 + ncols], b).flatten()
            start = int(offsets[r, g])
            qweight[start:start + block.numel()] = block
            c0 += ncols
        r0 += nrows
    return qweight, offsets.to(torch.int32)


def iter_blocks(qweight: torch.Tensor, block_bits: torch.Tensor, block_offsets: torch.Tensor,
                geometry: LayerGeometry):
    """Yield (row0, nrows, col0, ncols, group, planes 0/1 uint8 [b, nrows, ncols]) per block."""
    rows, cols, words = geometry.rows().tolist(), geometry.cols().tolist(), geometry.words()
    r0 = 0
    for r, nrows in enumerate(rows):
        c0 = 0
        for g, ncols in enumerate(cols):
            b, w = int(block_bits[r, g]), int(words[g])
            start = int(block_offsets[r, g])
            block = qweight[start:start + b * w * nrows].view(b, w, nrows)
            yield r0, nrows, c0, ncols, g, unpack_block_bits(block, ncols)
            c0 += ncols
        r0 += nrows


def unpack_codes(qweight: torch.Tensor, block_bits: torch.Tensor, block_offsets: torch.Tensor,
                 geometry: LayerGeometry) -> torch.Tensor:
    """Inverse of `pack_linear`: codes uint8 [N, K] of the reordered matrix."""
    codes = torch.zeros(geometry.out_features, geometry.in_features, dtype=torch.uint8)
    for r0, nrows, c0, ncols, _, planes in iter_blocks(qweight, block_bits, block_offsets,
                                                       geometry):
        weights = (2 ** torch.arange(planes.shape[0], dtype=torch.int32))[:, None, None]
        codes[r0:r0 + nrows, c0:c0 + ncols] = (planes.to(torch.int32) * weights).sum(0).to(
            torch.uint8)
    return codes
