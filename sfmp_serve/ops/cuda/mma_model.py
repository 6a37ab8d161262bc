"""A numpy model of the tensor-core kernels (mma.cuh), for tests on machines without a GPU.

It performs the kernels' integer steps exactly as written there: lop3 as its truth table, the
funnel-shift rotations, the magic-number conversion of codes to fp16/bf16 (0x6400 = 1024,
0x4300 = 128) and the exact subtraction that follows. From a repacked MmaLinear it rebuilds
- every code, through the m16n8k16 A-fragment map (which lane holds which row and input);
- the weight, in float64, from those codes and the fragment-order scales;
- y = x W^T by the kernels' algorithm (per k-block: sum q x, then 2 alpha acc + beta' sum x).
The tests compare the first two bit-exactly with the reference op, and the C++ decode helpers
(built for the host) with this model.
"""

from __future__ import annotations

import numpy as np
import torch

from sfmp_serve.ops.cuda.mma_repack import (CHUNK_COLS, LANES, STEP_COLS, TILE_ROWS, MmaLinear,
                                            slot_period)

MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}  # 1024.0 and 128.0: codes are mantissas
LOP3_SELECT = 0xE4  # (a & c) | (b & ~c): keep a where the mask c is set, else b
LOP3_MASK_OR = 0xEA  # (a & b) | c: mask a code pair and OR in the magic exponent
U32 = np.uint32


def lop3(a: np.ndarray, b: np.ndarray | int, c: np.ndarray | int, imm: int) -> np.ndarray:
    """PTX lop3.b32: bit i of the result is bit ((a_i << 2) | (b_i << 1) | c_i) of imm."""
    a, b, c = (np.asarray(v, dtype=U32) for v in (a, b, c))
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=U32)
    for idx in range(8):
        if (imm >> idx) & 1:
            out |= ((a if idx & 4 else ~a) & (b if idx & 2 else ~b) & (c if idx & 1 else ~c))
    return out


def rotr(x: np.ndarray, n: int) -> np.ndarray:
    """__funnelshift_r(x, x, n): rotate right by n mod 32."""
    n %= 32
    x = np.asarray(x, dtype=U32)
    return x if n == 0 else (x >> U32(n)) | (x << U32(32 - n))


def rotl32(v: int, n: int) -> int:
    n %= 32
    return ((v << n) | (v >> (32 - n))) & 0xFFFFFFFF if n else v


def slot_bits_below(p: int, period: int) -> int:
    """Bits 0..p-1 of every slot of a T-word (the planes already selected)."""
    return sum(((1 << p) - 1) << (period * s) for s in range(32 // period))


def gather_tword(planes: list[np.ndarray], n: int, bits: int) -> np.ndarray:
    """T-word n from the plane words (before undoing its rotation by n): b - 1 selects."""
    period = slot_period(bits)
    s = planes[0]
    for p in range(1, bits):
        s = lop3(s, planes[p], rotl32(slot_bits_below(p, period), n), LOP3_SELECT)
    return s


def _half_value(bits16: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    bits16 = np.asarray(bits16, dtype=np.uint32)
    if dtype == torch.float16:
        return bits16.astype(np.uint16).view(np.float16).astype(np.float64)
    return (bits16 << U32(16)).view(np.float32).astype(np.float64)


def _half_bits(value: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Exact values only (small integers): no rounding is modelled or needed."""
    if dtype == torch.float16:
        return value.astype(np.float16).view(np.uint16).astype(U32)
    return value.astype(np.float32).view(np.uint32) >> U32(16)


def hsub2(a: np.ndarray, b: int, dtype: torch.dtype) -> np.ndarray:
    """__hsub2 on packed pairs; exact here (both operands and the result are integers)."""
    out = np.zeros_like(np.asarray(a, dtype=U32))
    for shift in (0, 16):
        d = (_half_value((a >> U32(shift)) & U32(0xFFFF), dtype)
             - _half_value(np.full_like(a, (b >> shift) & 0xFFFF), dtype))
        out |= _half_bits(d, dtype) << U32(shift)
    return out


def hadd2(a: np.ndarray, b: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    out = np.zeros_like(np.asarray(a, dtype=U32))
    for shift in (0, 16):
        s = (_half_value((a >> U32(shift)) & U32(0xFFFF), dtype)
             + _half_value((b >> U32(shift)) & U32(0xFFFF), dtype))
        out |= _half_bits(s, dtype) << U32(shift)
    return out


def extract_pair(tword: np.ndarray, rotation: int, bits: int, dtype: torch.dtype) -> np.ndarray:
    """One A register (two codes as fp16/bf16) from a T-word: rotate, mask, magic, subtract."""
    magic = MAGIC[dtype] * 0x00010001
    v = rotr(tword, rotation)
    if dtype == torch.bfloat16 and bits == 8:  # 128 + q needs 8 mantissa bits: split off bit 7
        lo = lop3(v, 0x007F007F, magic, LOP3_MASK_OR)
        hi = lop3(v, 0x00800080, magic, LOP3_MASK_OR)  # 0x4380 = 256 when bit 7 is set
        return hadd2(hsub2(lo, magic, dtype), hsub2(hi, magic, dtype), dtype)
    mask = ((1 << bits) - 1) * 0x00010001
    return hsub2(lop3(v, mask, magic, LOP3_MASK_OR), magic, dtype)


def decode_step(planes: list[np.ndarray], step: int, bits: int,
                dtype: torch.dtype) -> list[np.ndarray]:
    """The four A registers (r0..r3) of local k16 step `step` (0..3) of a chunk."""
    if slot_period(bits) == 4:
        s = gather_tword(planes, step, bits)
        return [extract_pair(s, step + 4 * r, bits, dtype) for r in range(4)]
    regs = []
    for half in range(2):  # T-word 2 step + half holds registers 2 half and 2 half + 1
        n = 2 * step + half
        s = gather_tword(planes, n, bits)
        regs += [extract_pair(s, n + 8 * i, bits, dtype) for i in range(2)]
    return regs


def decode_chunk(words: np.ndarray, bits: int, dtype: torch.dtype) -> np.ndarray:
    """Plane words uint32 [bits, tiles, 32 lanes] of one chunk -> codes float64 [tiles, 16, 64]."""
    tiles = words.shape[1]
    out = np.zeros((tiles, TILE_ROWS, CHUNK_COLS))
    lanes = np.arange(LANES)
    g, t = lanes // 4, lanes % 4
    planes = [words[p] for p in range(bits)]
    for step in range(CHUNK_COLS // STEP_COLS):
        for r, reg in enumerate(decode_step(planes, step, bits, dtype)):
            for h in range(2):
                value = _half_value((reg >> U32(16 * h)) & U32(0xFFFF), dtype)
                rows = g + 8 * (r % 2)
                cols = STEP_COLS * step + 2 * t + 8 * (r // 2) + h
                out[:, rows, cols] = value
    return out


def _to_numpy(state: MmaLinear):
    return (state.qweight.cpu().numpy().view(np.uint32), state.tile_meta.cpu().numpy(),
            state.kb_info.cpu().numpy())


def rebuild_codes(state: MmaLinear) -> np.ndarray:
    """Codes float64 [padded_rows, padded_cols] decoded from the repacked words."""
    words, meta, kb_info = _to_numpy(state)
    codes = np.zeros((state.padded_rows, state.padded_cols))
    tiles = codes.reshape(state.n_tiles, TILE_ROWS, -1)
    for kb, (kp, nch, _, _) in enumerate(kb_info.tolist()):
        for b in np.unique(meta[:, kb, 1]).tolist():
            sel = np.nonzero(meta[:, kb, 1] == b)[0]
            for c in range(nch):
                index = (meta[sel, kb, 0][None, :, None]
                         + (np.arange(b)[:, None, None] * LANES
                            + np.arange(LANES)[None, None, :]) * nch + c)
                col = kp + c * CHUNK_COLS
                tiles[sel, :, col:col + CHUNK_COLS] = decode_chunk(words[index], b,
                                                                   state.dtype)
    return codes


def kernel_scales(state: MmaLinear) -> tuple[np.ndarray, np.ndarray]:
    """(2 alpha, beta - alpha (2^b - 1)) per padded row and k-block, in float64; the kernels
    form them in fp32 (2 alpha exactly, beta' with one rounding of an fma)."""
    sc = state.scales.to(torch.float64).cpu().numpy()  # [tiles, kb, g, half, ab]
    alpha = sc[..., 0].transpose(0, 3, 2, 1).reshape(state.padded_rows, -1)
    beta = sc[..., 1].transpose(0, 3, 2, 1).reshape(state.padded_rows, -1)
    bits = np.repeat(state.tile_meta[..., 1].cpu().numpy(), TILE_ROWS, axis=0)
    return 2 * alpha, beta - alpha * (2.0 ** bits - 1)


def rebuild_weight(state: MmaLinear) -> torch.Tensor:
    """W float64 [out, in] in the original orders, from the repacked tensors only."""
    codes = rebuild_codes(state)
    scale, shift = kernel_scales(state)
    kb_info = state.kb_info.cpu().numpy()
    kb_of_col = np.repeat(np.arange(len(kb_info)), kb_info[:, 1] * CHUNK_COLS)
    w_pad = codes * scale[:, kb_of_col] + shift[:, kb_of_col]
    out_row, kidx = state.out_row.cpu().numpy(), state.kidx.cpu().numpy()
    rows, cols = np.nonzero(out_row >= 0)[0], np.nonzero(kidx >= 0)[0]
    w = np.full((state.out_features, state.in_features), np.nan)
    w[out_row[rows][:, None], kidx[cols][None, :]] = w_pad[rows][:, cols]
    return torch.from_numpy(w)


def model_linear(x: torch.Tensor, state: MmaLinear) -> torch.Tensor:
    """y [M, out] float64 by the kernels' algorithm: gather x through kidx, per k-block the
    integer-code product and its sum of x, scaled per row, scattered through out_row, + bias."""
    codes = rebuild_codes(state)
    scale, shift = kernel_scales(state)
    kidx = state.kidx.cpu().numpy()
    x64 = x.to(torch.float64).cpu().numpy()
    xg = np.where(kidx[None, :] >= 0, x64[:, np.maximum(kidx, 0)], 0.0)  # [M, Kp]
    y_pad = np.zeros((x64.shape[0], state.padded_rows))
    for kb, (kp, nch, _, _) in enumerate(state.kb_info.cpu().numpy().tolist()):
        cols = slice(kp, kp + nch * CHUNK_COLS)
        acc = xg[:, cols] @ codes[:, cols].T  # [M, rows]
        y_pad += acc * scale[:, kb] + xg[:, cols].sum(1, keepdims=True) * shift[:, kb]
    out_row = state.out_row.cpu().numpy()
    valid = out_row >= 0
    y = np.zeros((x64.shape[0], state.out_features))
    y[:, out_row[valid]] = y_pad[:, valid]
    if state.bias is not None:
        y += state.bias.to(torch.float64).cpu().numpy()
    return torch.from_numpy(y)


class ModelRunner:
    """A KernelRunner that executes the tensor-core launches with this model, on CPU tensors.

    It checks the host side of mma_linear.py without a GPU: planning, 128-row slices, z-chunks,
    split partials, the prefill gather, whole and chunked dequantization, the padded-row
    gather of y and the bias. Launches are checked against the entry points first; results
    are exact (float64, rounded once to the activation dtype)."""

    def __init__(self, multiprocessors: int = 132):
        self.multiprocessors = multiprocessors
        self.launches: list = []

    @staticmethod
    def _state(qweight, tile_meta, kb_info, kidx, scales, out_row, dtype) -> MmaLinear:
        return MmaLinear(qweight=qweight, tile_meta=tile_meta, kb_info=kb_info, kidx=kidx,
                         scales=scales, out_row=out_row, gather_index=out_row, counters=out_row,
                         bias=None, out_features=0, in_features=0, group_size=0, dtype=dtype)

    def launch(self, launch) -> None:
        launch.check()
        self.launches.append(launch)
        dtype = torch.bfloat16 if "_bf16" in launch.kernel else torch.float16
        if launch.kernel.startswith("sfmp_mma_gather"):
            x, kidx, xr, m, _, cols = launch.args
            idx = kidx.long()
            xr.copy_(torch.where(idx[None, :] >= 0, x[:m, idx.clamp(min=0)], 0).to(dtype))
        elif launch.kernel.startswith("sfmp_mma_dequant"):
            self._dequant(launch.args, dtype)
        else:
            self._gemm(launch, dtype)

    def _dequant(self, args, dtype) -> None:
        qweight, meta, kb_info, scales, out_row, w, _, t0, t1, _, _ = args
        kidx = torch.zeros(int(kb_info[:, 1].sum()) * CHUNK_COLS, dtype=torch.int32)
        rows = torch.zeros(meta.shape[0] * TILE_ROWS, dtype=torch.int32)
        state = self._state(qweight, meta, kb_info, kidx, scales, rows, dtype)
        scale, shift = kernel_scales(state)
        kb_of_col = np.repeat(np.arange(kb_info.shape[0]), kb_info[:, 1].numpy() * CHUNK_COLS)
        w_pad = rebuild_codes(state) * scale[:, kb_of_col] + shift[:, kb_of_col]
        sel = np.arange(t0 * TILE_ROWS, t1 * TILE_ROWS)
        if out_row is not None:
            dest = out_row.numpy()[sel]
            sel, dest = sel[dest >= 0], dest[dest >= 0]
        else:
            dest = sel - t0 * TILE_ROWS
        w[torch.from_numpy(dest)] = torch.from_numpy(w_pad[sel]).to(dtype)

    def _gemm(self, launch, dtype) -> None:
        (x, kidx, qweight, meta, kb_info, scales, out_row, bias, partial, counters, y, m, _, _,
         n_tiles, n_kb, kb_per_split, zchunks) = launch.args
        grid_x, splits, _ = launch.grid
        nb = int(launch.kernel.rsplit("_n", 1)[1])
        if grid_x != -(-n_tiles // 4) * zchunks or splits != -(-n_kb // kb_per_split) or \
                m > 8 * nb * zchunks or (splits > 1) != (partial is not None):
            raise ValueError(f"{launch.kernel}: grid {launch.grid} does not cover the layer")
        if partial is not None and partial.numel() < splits * grid_x * 64 * 8 * nb:
            raise ValueError(f"{launch.kernel}: partial buffer too small")
        if counters.numel() < grid_x:
            raise ValueError(f"{launch.kernel}: {counters.numel()} tickets for {grid_x} blocks")
        state = self._state(qweight, meta, kb_info, kidx, scales, out_row, dtype)
        state.bias = bias
        state.out_features = int(out_row.max()) + 1
        y_full = model_linear(x[:m], state)
        cols = out_row.long()[out_row >= 0]
        y[:m, cols] = y_full[:, cols].to(dtype)
