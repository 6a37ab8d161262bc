"""The compiled CPU backend of sfmp::linear (C++ in csrc/, built at first use by build.py).

One runtime layout, repacked once at load (csrc/kernel.h): tiles of 16 output rows that never
cross a block, and per input group one 32-bit mask per bit plane and column pair, laid out so
that a mask selects the 16-bit lanes of a (16 rows x 2 columns) vector. Every call picks, by
the number of activation rows M and the instruction set:
- M = 1 (and every M < the dense threshold without AMX): the vector GEMV. Codes are decoded
  from the planes with GFNI (an 8x8 bit transpose per instruction, any bit-width, two column
  pairs at a time) or with mask registers, straight into bf16(128 + q) for bf16 activations
  (one vdpbf16ps per 32 weights and activation row, fp32 accumulation) or into fp32 codes
  for the fp32 path (AVX-512 or AVX2); up to 8 activation rows share each decoded vector.
- 2 <= M < 512 (192 for layers under 4M weights) with bf16 activations on AMX CPUs: the
  decoded pair vectors are exactly the rows of an AMX B tile; a (tile, group)'s B tiles are
  decoded once into L1 and multiplied with every 16-row block of activations by tdpbf16ps.
- Per (tile, group) the scale and offset are applied in fp32, as the format defines them.
- M >= the dense threshold (prefill): the layer dequantized straight into the original order
  (bf16 for bf16 activations, rounded once as the GPU path does, else fp32; a per-thread
  scratch) and one torch GEMM (oneDNN), the activations untouched: at this size permuting
  activations costs more than folding both permutations into the dequantizer's stores.
The instruction set is chosen at run time (best of amx, avx512_bf16, avx512, avx2); threads
are torch's intra-op threads (at::parallel_for over output tiles), so vLLM's pinning applies.

SFMP_CPU_KERNEL=auto (default) uses this backend where it builds and falls back to the
plain-torch path (ops/cpu.py) with a warning otherwise; =native makes a failed build an error;
=torch always takes the plain-torch path.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from sfmp_serve.errors import SFMPError
from sfmp_serve.ops import api
from sfmp_serve.ops.runtime import FusedLayer, LayerSpec

logger = logging.getLogger(__name__)

BACKEND_PRIORITY = 10
# Rows from which dequantize + GEMM replaces the GEMV; -1: each ISA's own (measured with
# bench/cpu_op.py: with AMX 512, or 192 for layers under 4M weights; 32 with AVX-512, 16
# with AVX2).
DENSE_MIN_M = -1
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("auto", "native", "torch")


def mode() -> str:
    value = os.environ.get("SFMP_CPU_KERNEL", "auto")
    if value not in MODES:
        raise SFMPError(f"SFMP_CPU_KERNEL={value!r}: expected one of {', '.join(MODES)}")
    return value


_WARNED: set[str] = set()


def kernels() -> Any:
    """The compiled module; SFMPError (one line, says why) if it cannot be built here."""
    from sfmp_serve.ops.cpu_native import build
    return build.load()


def scatter_of(output_gather: torch.Tensor) -> torch.Tensor:
    """Original (fused) output column of every concatenated reordered row."""
    scatter = torch.empty_like(output_gather)
    scatter[output_gather] = torch.arange(output_gather.numel())
    return scatter


def prepare(layer: FusedLayer) -> Any:
    """The compiled runtime layout of a fused layer (a csrc Layer; has .nbytes)."""
    shards = [(s.qweight, s.block_bits, s.block_offsets, s.alpha, s.beta) for s in layer.shards]
    return kernels().Layer(shards, layer.spec.in_features, layer.config.group_size,
                           layer.config.block_rows, layer.input_perm,
                           scatter_of(layer.output_gather))


def apply(x: torch.Tensor, state: Any) -> torch.Tensor:
    """y [M, out] = x [M, in] @ W^T (no bias), x in float32, bfloat16 or float16."""
    return state.forward(x, DENSE_MIN_M)


class NativeCpuBackend:
    """Compiled bit-plane kernels for x86-64 CPUs with AVX2 or AVX-512."""

    name = "cpu-native"
    device_type = "cpu"

    def can_implement(self, spec: LayerSpec) -> tuple[bool, str]:
        if spec.device_type != "cpu":
            return False, f"runs on the CPU only, not on {spec.device_type}"
        if spec.act_dtype not in ACT_DTYPES:
            return False, f"activation dtype {spec.act_dtype} is not supported"
        wanted = mode()
        if wanted == "torch":
            return False, "disabled by SFMP_CPU_KERNEL=torch"
        try:
            isas = kernels().isas()
        except SFMPError as e:
            if wanted == "native":
                raise
            if str(e) not in _WARNED:
                _WARNED.add(str(e))
                logger.warning("%s; using the plain-torch CPU path (several times slower)", e)
            return False, str(e)
        if not isas:
            return False, "this CPU has neither AVX-512 nor AVX2 with FMA and F16C"
        return True, ""

    def prepare(self, layer: FusedLayer) -> Any:
        return prepare(layer)

    def apply(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        return apply(x, state)


api.register_backend(NativeCpuBackend(), priority=BACKEND_PRIORITY)
