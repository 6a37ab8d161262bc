"""SFMPLinear: an nn.Module that keeps a linear in its packed SFMP form.

The packed tensors are buffers named exactly like the checkpoint's (`<layer>.qweight`, ...), so
`state_dict()` of a swapped model is the checkpoint's tensor set. No dense weight is kept:
memory is the point of the format. The forward runs the serving path's op backend for the
input's device (ops/api.py: the compiled CPU kernels, the CUDA kernels, or their fallbacks),
its runtime layout built on first use and kept beside the buffers (the packed planes regrouped,
about as large again); where no backend applies (float64, other devices) the plain-torch
reference op. `DequantizedLinear` is the evaluation form: the same weights dequantized once.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.format import TENSOR_SUFFIXES, PackedLinear, SFMPConfig
from sfmp_serve.model_dir import module_name
from sfmp_serve.ops import api
from sfmp_serve.ops.reference import dequantize, sfmp_linear_reference


# Activation dtypes the op backends are built for; anything else (float64) takes the reference op.
_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sfmp_matmul(x: torch.Tensor, packed: PackedLinear, config: SFMPConfig) -> torch.Tensor:
    """y = x @ W^T (+ bias) with the reference op, where the CPU op does not apply.

    The `dequant` formulation rebuilds the weight transiently inside the call (one matmul is
    far faster in plain torch than the table lookups of `lut`); nothing outlives the call.
    """
    return sfmp_linear_reference(x, packed, config, mode="dequant")


class SFMPLinear(nn.Module):
    """Drop-in replacement for nn.Linear(in_features, out_features) holding a PackedLinear."""

    def __init__(self, packed: PackedLinear, config: SFMPConfig) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.config = config
        self.ranges = packed.ranges  # tensor-parallel ranges (format version 4)
        for suffix in TENSOR_SUFFIXES:
            self.register_buffer(suffix, getattr(packed, suffix))
        self.register_buffer("bias", packed.bias)

    def packed(self) -> PackedLinear:
        """A view of the buffers as a PackedLinear (follows .to(device) of the module)."""
        return PackedLinear(**{s: getattr(self, s) for s in TENSOR_SUFFIXES}, bias=self.bias,
                            ranges=self.ranges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._op_for(x)
        if parts is None:
            return sfmp_matmul(x, self.packed(), self.config)
        y = api.apply_parts(x.reshape(-1, self.in_features), parts)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _op_for(self, x: torch.Tensor) -> list[api.PreparedPart] | None:
        """The serving op's prepared input parts for x (one unless the inputs are cut into
        tensor-parallel ranges: sfmp_serve/tp.py), built on first use; None when no backend
        applies. Kept outside the buffers, so state_dict() stays the checkpoint's, and rebuilt
        when the buffers were replaced (load_state_dict, .to())."""
        key = (self.qweight.data_ptr(), self.alpha.data_ptr(), x.dtype, x.device)
        if getattr(self, "_op_key", None) != key:
            self._op_key, self._op = key, None
            if x.dtype in _OP_DTYPES and x.device == self.qweight.device:
                try:
                    self._op = api.prepare_parts("hf", ("hf",), (self.packed(),), self.config,
                                                 x.dtype, x.device)
                except SFMPError:
                    pass  # no backend for this device: the reference op
        return self._op

    def extra_repr(self) -> str:
        bits = self.block_bits.to(torch.float64)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_bits={bits.min():.0f}..{bits.max():.0f}")


class DequantizedLinear(nn.Module):
    """An SFMPLinear's weight dequantized once, in float32 and the original order.

    The math of the reference op `sfmp_matmul` (float32 accumulation of the same weight values)
    without rebuilding the weight in every call: for evaluation, where speed matters and memory
    does not. Outputs match the reference op's up to float32 summation order.
    """

    def __init__(self, linear: SFMPLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = linear.packed()
        self.weight = nn.Parameter(dequantize(packed, linear.config, torch.float32),
                                   requires_grad=False)
        self.bias = (None if packed.bias is None else
                     nn.Parameter(packed.bias.to(torch.float32), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.float32), self.weight, self.bias).to(x.dtype)


def dequantize_linears(model: nn.Module) -> int:
    """Replace every SFMPLinear of `model` by its DequantizedLinear; returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, SFMPLinear)]
    for name in names:
        replace_module(model, name, DequantizedLinear(model.get_submodule(name)))
    return len(names)


def find_linear(model: nn.Module, name: str) -> nn.Linear:
    """The nn.Linear the checkpoint calls `name`; FormatError if the model has none
    (config/model mismatch)."""
    try:
        module = model.get_submodule(module_name(model, name))
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise FormatError(f"layer {name}: listed in quantization_config.quantized_modules but "
                          f"the model has no linear of that name")
    return module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (the checkpoint's or the model's name) is."""
    parent_name, _, child = module_name(model, name).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_bias(name: str, linear: nn.Linear, stored: bool) -> None:
    """The checkpoint stores `<name>.bias` exactly when the model's linear has a bias."""
    if stored != (linear.bias is not None):
        why = "unexpected (the model's linear has no bias)" if stored else "missing"
        raise FormatError(f"layer {name}: tensor {name}.bias: {why}")
