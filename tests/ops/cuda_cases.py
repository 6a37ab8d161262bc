"""Random layers and reference results shared by the CUDA kernel tests (emulator and GPU)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sfmp_serve.format import PackedLinear, SFMPConfig
from sfmp_serve.ops.reference import dequantize
from tests.serving.packed import random_packed, sfmp_config

BIT_MIXES = ((2,), (3,), (4,), (2, 3), (3, 4), (2, 4), (2, 3, 4))
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass
class Layer:
    config: SFMPConfig
    packed: PackedLinear
    weight: torch.Tensor  # float64 [out, in], original order (the reference's dequantize)
    _on_device: dict = field(default_factory=dict, repr=False)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T + bias in float64 (x in original input order)."""
        w = self._on_device.get(x.device)
        if w is None:  # the float64 weight moves to the GPU once, not per call
            w = self._on_device[x.device] = self.weight.to(x.device)
        y = x.to(torch.float64) @ w.t()
        if self.packed.bias is not None:
            y = y + self.packed.bias.to(device=x.device, dtype=torch.float64)
        return y


def make_layer(out_features: int, in_features: int, bits: tuple[int, ...], dtype: torch.dtype,
               group_size: int = 32, block_rows: int = 16, seed: int = 0,
               bias: bool = False, input_perm: torch.Tensor | None = None) -> Layer:
    """A random valid layer; shards of one fused layer must pass the same `input_perm`."""
    act = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    config = sfmp_config(group_size=group_size, block_rows=block_rows, bit_choices=bits,
                         act_dtype=act)
    gen = torch.Generator().manual_seed(seed)
    packed = random_packed(out_features, in_features, config, gen, input_perm=input_perm)
    if bias:
        packed.bias = (torch.randn(out_features, generator=gen) * 0.1).to(dtype)
    packed.validate("layer", config)
    return Layer(config, packed, dequantize(packed, config, torch.float64))


def random_x(m: int, in_features: int, dtype: torch.dtype, seed: int = 1,
             device: str | torch.device = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, in_features, generator=gen).to(dtype).to(device)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y64, ref64 = y.to(torch.float64), ref.to(torch.float64)
    return float((y64 - ref64).norm() / ref64.norm())


def nan_like(shape: tuple[int, ...], dtype: torch.dtype,
             device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
