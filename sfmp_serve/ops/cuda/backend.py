"""The CUDA backend of the sfmp::linear op (ops/api.py registry): LUT GEMM + dequant/cuBLAS."""

from __future__ import annotations

import torch

from sfmp_serve.ops.cuda.linear import cuda_linear
from sfmp_serve.ops.cuda.repack import KERNEL_DTYPES, CudaLinear, repack_shards
from sfmp_serve.ops.cuda.runtime import MIN_CAPABILITY, runner_for
from sfmp_serve.ops.runtime import FusedLayer, LayerSpec


class CudaBackend:
    """Fused SFMP layers on NVIDIA GPUs, kernels from kernels.cu loaded with CuPy."""

    name = "cuda-lut"
    device_type = "cuda"

    def can_implement(self, spec: LayerSpec) -> tuple[bool, str]:
        if spec.device_type != "cuda":
            return False, f"runs on CUDA devices only, not on {spec.device_type}"
        if spec.act_dtype not in KERNEL_DTYPES:
            return False, (f"activation dtype {spec.act_dtype} is not supported "
                           "(float16 or bfloat16)")
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch"
        capability = torch.cuda.get_device_capability()
        if capability < MIN_CAPABILITY:
            return False, (f"compute capability {capability[0]}.{capability[1]} is below "
                           f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
        try:
            import cupy  # noqa: F401
        except ImportError:
            return False, "CuPy is not installed (pip install cupy-cuda13x or cupy-cuda12x)"
        return True, ""

    def prepare(self, layer: FusedLayer) -> CudaLinear:
        """Repack the shards once and compile the kernels for this GPU (before any capture)."""
        device = torch.device("cuda", torch.cuda.current_device())
        state = repack_shards(layer.shards, layer.config, layer.output_gather,
                              layer.spec.act_dtype, device, name=layer.spec.name)
        runner_for(device)
        return state

    def apply(self, x: torch.Tensor, state: CudaLinear) -> torch.Tensor:
        return cuda_linear(x, state)
