"""SFMP on NVIDIA GPUs: CUDA kernels (kernels.cu and its headers) loaded with CuPy.

Importing this package registers `CudaBackend` with the op registry (ops/api.py), which is how
torch.ops.sfmp.linear reaches these kernels for layers prepared on a CUDA device. Standalone:
    prepare_cuda(packed, config) -> CudaLinear      once per linear, at load (repack + compile)
    cuda_linear(x, state) -> y                      every call; batch-size dispatch inside
Nothing here imports CuPy until a CUDA runner is needed, so the package imports on CPU-only
machines (the host emulator in emulator.py runs the same kernels on the CPU for tests).
"""

from __future__ import annotations

import torch

from sfmp_serve.format import PackedLinear, SFMPConfig
from sfmp_serve.ops import api
from sfmp_serve.ops.cuda.backend import CudaBackend
from sfmp_serve.ops.cuda.linear import cuda_linear
from sfmp_serve.ops.cuda.repack import CudaLinear, repack

__all__ = ["CudaBackend", "CudaLinear", "cuda_linear", "prepare_cuda"]

BACKEND_PRIORITY = 10


def prepare_cuda(packed: PackedLinear, config: SFMPConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cuda") -> CudaLinear:
    """Repack one unfused linear (bias included) for `device` and compile the kernels there."""
    from sfmp_serve.ops.cuda.runtime import runner_for
    state = repack(packed, config, dtype, device)
    runner_for(state.device)
    return state


api.register_backend(CudaBackend(), priority=BACKEND_PRIORITY)
