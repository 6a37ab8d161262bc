"""The reference SFMP op in plain torch: y = x @ W^T + bias from the packed format.

Two formulations, both device-agnostic and both oracles for faster kernels:
- `lut`: the bit-serial lookup-table form of the GPU kernel. For every 8 activations a
  256-entry table of all +/- sign combinations; each packed byte of a sign plane indexes it.
- `dequant`: rebuild the reordered weight from alpha, beta and the planes, then one matmul.
Accumulation is in float32 (or float64 when x is float64); the result has x's dtype.
"""

from __future__ import annotations

import torch

from sfmp_serve.bitplanes import iter_blocks
from sfmp_serve.format import WORD_BITS, PackedLinear, SFMPConfig

_BYTE_SIGNS = None


def byte_sign_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """[256, 8] float: entry [v, j] = +1 if bit j of v is set else -1."""
    global _BYTE_SIGNS
    if _BYTE_SIGNS is None:
        v = torch.arange(256)[:, None]
        _BYTE_SIGNS = ((v >> torch.arange(8)) & 1).to(torch.float64) * 2 - 1
    return _BYTE_SIGNS.to(device)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dequantize(packed: PackedLinear, config: SFMPConfig,
               dtype: torch.dtype = torch.float32, reordered: bool = False) -> torch.Tensor:
    """The weight [out, in] the packed tensors represent (original order unless `reordered`)."""
    geo = packed.geometry(config)
    w = torch.empty(geo.out_features, geo.in_features, dtype=dtype,
                    device=packed.qweight.device)
    alpha, beta = packed.alpha.to(dtype), packed.beta.to(dtype)
    for r0, nrows, c0, ncols, g, planes in iter_blocks(packed.qweight, packed.block_bits,
                                                       packed.block_offsets, geo):
        scales = 2 ** torch.arange(planes.shape[0], dtype=dtype, device=w.device)
        signed = planes.to(dtype) * 2 - 1  # [b, R, C]
        sum_planes = (signed * scales[:, None, None]).sum(0)
        w[r0:r0 + nrows, c0:c0 + ncols] = (alpha[r0:r0 + nrows, g, None] * sum_planes
                                           + beta[r0:r0 + nrows, g, None])
    if reordered:
        return w
    original = torch.empty_like(w)
    original[packed.output_perm.long()[:, None], packed.input_perm.long()[None, :]] = w
    return original


def _lut_matmul_reordered(x_r: torch.Tensor, packed: PackedLinear,
                          config: SFMPConfig) -> torch.Tensor:
    """y_r [M, N] from reordered activations x_r [M, K] by table lookups on the sign planes."""
    geo = packed.geometry(config)
    acc = _acc_dtype(x_r)
    m = x_r.shape[0]
    signs = byte_sign_table(x_r.device).to(acc)
    alpha, beta = packed.alpha.to(acc), packed.beta.to(acc)
    y = torch.zeros(m, geo.out_features, dtype=acc, device=x_r.device)
    for r0, nrows, c0, ncols, g, planes in iter_blocks(packed.qweight, packed.block_bits,
                                                       packed.block_offsets, geo):
        padded_cols = -(-ncols // WORD_BITS) * WORD_BITS
        xg = torch.zeros(m, padded_cols, dtype=acc, device=x_r.device)
        xg[:, :ncols] = x_r[:, c0:c0 + ncols].to(acc)
        chunks = padded_cols // 8
        table = xg.view(m, chunks, 8) @ signs.t()  # [M, chunks, 256]
        bits = torch.zeros(planes.shape[0], nrows, padded_cols, dtype=torch.int64,
                           device=x_r.device)
        bits[..., :ncols] = planes.to(torch.int64)
        byte_idx = (bits.view(*bits.shape[:2], chunks, 8)
                    << torch.arange(8, device=x_r.device)).sum(-1)  # [b, R, chunks]
        looked_up = table[:, torch.arange(chunks, device=x_r.device), byte_idx]  # [M,b,R,ch]
        plane_dots = looked_up.sum(-1)  # [M, b, R]
        scales = 2 ** torch.arange(planes.shape[0], dtype=acc, device=x_r.device)
        dot = (plane_dots * scales[None, :, None]).sum(1)  # sum_i 2^i * (s_i . x)
        y[:, r0:r0 + nrows] += (alpha[r0:r0 + nrows, g] * dot
                                + beta[r0:r0 + nrows, g] * xg.sum(-1, keepdim=True))
    return y


def sfmp_linear_reference(x: torch.Tensor, packed: PackedLinear, config: SFMPConfig,
                          mode: str = "lut") -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., in_features] in the original input order."""
    if mode not in ("lut", "dequant"):
        raise ValueError(f"mode must be 'lut' or 'dequant', got {mode!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_r = x2[:, packed.input_perm.long()]
    if mode == "lut":
        y_r = _lut_matmul_reordered(x_r, packed, config)
    else:
        acc = _acc_dtype(x)
        y_r = x_r.to(acc) @ dequantize(packed, config, acc, reordered=True).t()
    y = torch.empty_like(y_r)
    y[:, packed.output_perm.long()] = y_r
    if packed.bias is not None:
        y = y + packed.bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, packed.out_features)
