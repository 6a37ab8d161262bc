"""SFMP on NVIDIA GPUs: CUDA kernels (kernels.cu and its headers) loaded with CuPy.

Importing this package registers `CudaBackend` (LUT kernels, the default) and `CudaMmaBackend`
(tensor-core kernels of mma_kernels.cu, opt-in with SFMP_CUDA_KERNELS=mma) with the op registry
(ops/api.py), which is how torch.ops.sfmp.linear reaches these kernels for layers prepared on a
CUDA device. Standalone:
    prepare_cuda(packed, config) -> CudaLinear      once per linear, at load (repack + compile)
    cuda_linear(x, state) -> y                      every call; batch-size dispatch inside
    prepare_cuda_mma(packed, config) -> MmaLinear   the same for the tensor-core family
    mma_linear(x, state) -> y
Nothing here imports CuPy until a CUDA runner is needed, so the package imports on CPU-only
machines (the host emulator in emulator.py runs the same kernels on the CPU for tests).
"""

from __future__ import annotations

import torch

from sfmp_serve.format import PackedLinear, SFMPConfig
from sfmp_serve.ops import api
from sfmp_serve.ops.cuda.backend import CudaBackend, CudaMmaBackend
from sfmp_serve.ops.cuda.linear import cuda_linear
from sfmp_serve.ops.cuda.mma_linear import mma_linear
from sfmp_serve.ops.cuda.mma_repack import MmaLinear, repack_mma_linear
from sfmp_serve.ops.cuda.repack import CudaLinear, repack

__all__ = ["CudaBackend", "CudaLinear", "CudaMmaBackend", "MmaLinear", "cuda_linear",
           "mma_linear", "prepare_cuda", "prepare_cuda_mma"]

BACKEND_PRIORITY = 10
MMA_BACKEND_PRIORITY = 20  # asked first; declines unless SFMP_CUDA_KERNELS=mma


def prepare_cuda(packed: PackedLinear, config: SFMPConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cuda") -> CudaLinear:
    """Repack one unfused linear (bias included) for `device` and compile the kernels there."""
    from sfmp_serve.ops.cuda.runtime import runner_for
    state = repack(packed, config, dtype, device)
    runner_for(state.device)
    return state


def prepare_cuda_mma(packed: PackedLinear, config: SFMPConfig, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cuda") -> MmaLinear:
    """Repack one unfused linear into fragment order for `device`; compile the mma kernels."""
    from sfmp_serve.ops.cuda.runtime import runner_for
    state = repack_mma_linear(packed, config, dtype, device)
    runner_for(state.device).load_mma()
    return state


api.register_backend(CudaBackend(), priority=BACKEND_PRIORITY)
api.register_backend(CudaMmaBackend(), priority=MMA_BACKEND_PRIORITY)
