"""The CUDA backends of the sfmp::linear op (ops/api.py registry).

- `CudaBackend` ("cuda-lut", the default): LUT GEMM + dequant/cuBLAS (kernels.cu), verified on
  H100s.
- `CudaMmaBackend` ("cuda-mma", opt-in with SFMP_CUDA_KERNELS=mma): the tensor-core family
  (mma_kernels.cu) for M <= 128 and its L2-chunked dequant + cuBLAS above. It stays opt-in until
  scripts/gpu_check.sh has passed on a GPU; then it becomes the default and the LUT kernels go.
"""

from __future__ import annotations

import os

import torch

from sfmp_serve.errors import SFMPError
from sfmp_serve.ops.cuda.linear import cuda_linear
from sfmp_serve.ops.cuda.mma_linear import mma_linear
from sfmp_serve.ops.cuda.mma_repack import MmaLinear, repack_mma
from sfmp_serve.ops.cuda.repack import KERNEL_DTYPES, CudaLinear, repack_shards
from sfmp_serve.ops.cuda.runtime import MIN_CAPABILITY, runner_for
from sfmp_serve.ops.runtime import FusedLayer, LayerSpec

KERNELS_ENV = "SFMP_CUDA_KERNELS"
KERNEL_FAMILIES = ("lut", "mma")


def kernel_family() -> str:
    """The CUDA kernel family asked for in SFMP_CUDA_KERNELS ('lut' when unset)."""
    family = os.environ.get(KERNELS_ENV, "lut").strip().lower() or "lut"
    if family not in KERNEL_FAMILIES:
        raise SFMPError(f"{KERNELS_ENV}={family!r}: expected one of {list(KERNEL_FAMILIES)}")
    return family


def _cuda_reason(spec: LayerSpec) -> str:
    """Why no CUDA kernel can run `spec` here ('' when one can)."""
    if spec.device_type != "cuda":
        return f"runs on CUDA devices only, not on {spec.device_type}"
    if spec.act_dtype not in KERNEL_DTYPES:
        return f"activation dtype {spec.act_dtype} is not supported (float16 or bfloat16)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (f"compute capability {capability[0]}.{capability[1]} is below "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install cupy-cuda13x or cupy-cuda12x)"
    return ""


class CudaBackend:
    """Fused SFMP layers on NVIDIA GPUs, kernels from kernels.cu loaded with CuPy."""

    name = "cuda-lut"
    device_type = "cuda"

    def can_implement(self, spec: LayerSpec) -> tuple[bool, str]:
        why = _cuda_reason(spec)
        return not why, why

    def prepare(self, layer: FusedLayer) -> CudaLinear:
        """Repack the shards once and compile the kernels for this GPU (before any capture)."""
        device = torch.device("cuda", torch.cuda.current_device())
        state = repack_shards(layer.shards, layer.config, layer.output_gather,
                              layer.spec.act_dtype, device, name=layer.spec.name)
        runner_for(device)
        return state

    def apply(self, x: torch.Tensor, state: CudaLinear) -> torch.Tensor:
        return cuda_linear(x, state)


class CudaMmaBackend:
    """The tensor-core family (mma_kernels.cu); chosen only with SFMP_CUDA_KERNELS=mma."""

    name = "cuda-mma"
    device_type = "cuda"

    def can_implement(self, spec: LayerSpec) -> tuple[bool, str]:
        if kernel_family() != "mma":
            return False, (f"opt-in until verified on a GPU: set {KERNELS_ENV}=mma to use the "
                           "tensor-core kernels")
        why = _cuda_reason(spec)
        return not why, why

    def prepare(self, layer: FusedLayer) -> MmaLinear:
        """Repack into fragment order once and compile the kernels (before any capture)."""
        device = torch.device("cuda", torch.cuda.current_device())
        state = repack_mma(layer.shards, layer.config, layer.output_gather,
                           layer.spec.act_dtype, device, name=layer.spec.name)
        runner_for(device).load_mma()
        return state

    def apply(self, x: torch.Tensor, state: MmaLinear) -> torch.Tensor:
        return mma_linear(x, state)
