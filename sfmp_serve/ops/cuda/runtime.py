"""Loading and launching the CUDA kernels with CuPy, on torch's current stream.

`runner_for(device)` compiles kernels.cu with NVRTC (CuPy caches the binary on disk) and looks up
every entry point once, at load, before any CUDA-graph capture. Launches then only pass raw
pointers (tensor.data_ptr(), zero-copy) and int32 scalars, on
cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream), so they are ordered with
torch's own work and recorded by torch.cuda.graph captures.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from sfmp_serve.errors import SFMPError
from sfmp_serve.ops.cuda import sources
from sfmp_serve.ops.cuda.launch import Launch
from sfmp_serve.ops.cuda.plan import lut_smem_bytes

log = logging.getLogger(__name__)

DEFAULT_SMEM_LIMIT = 48 << 10  # above this a kernel must opt in to more dynamic shared memory
MIN_CAPABILITY = (8, 0)  # sm_80+: what the CI compile test builds for

_RUNNERS: dict[int, "CupyRunner"] = {}
_LOCK = threading.Lock()


def import_cupy():
    try:
        import cupy
    except ImportError as e:
        raise SFMPError("the CUDA SFMP kernels need CuPy (pip install cupy-cuda13x, or "
                        "cupy-cuda12x for CUDA 12)") from e
    return cupy


class CupyRunner:
    """The compiled kernels of one GPU; a KernelRunner."""

    def __init__(self, device: torch.device):
        cupy = import_cupy()
        self._cupy = cupy
        self.device_index = device.index if device.index is not None else \
            torch.cuda.current_device()
        props = torch.cuda.get_device_properties(self.device_index)
        if (props.major, props.minor) < MIN_CAPABILITY:
            raise SFMPError(f"GPU {props.name} (compute capability {props.major}."
                            f"{props.minor}): the SFMP CUDA kernels need 8.0 or newer")
        self.multiprocessors = props.multi_processor_count
        log.info("loading the SFMP CUDA kernels on GPU %d (NVRTC compiles them on first use, "
                 "then CuPy's disk cache serves them)", self.device_index)
        with cupy.cuda.Device(self.device_index):
            module = cupy.RawModule(code=sources.read_source(),
                                    options=sources.compile_options(), jitify=False)
            self._kernels = {name: module.get_function(name)
                             for name in sources.kernel_params()}  # compiles here, at load
            for name, kernel in self._kernels.items():  # resolve every function now, too
                log.debug("%s: %d registers", name, kernel.num_regs)
            for mb in sources.BATCH_TILES:
                if lut_smem_bytes(mb) > DEFAULT_SMEM_LIMIT:
                    for dtype in sources.DTYPE_TAGS:
                        kernel = self._kernels[sources.lut_kernel(dtype, mb)]
                        kernel.max_dynamic_shared_size_bytes = lut_smem_bytes(mb)
        self._module = module
        self._mma_module = None
        self._streams: dict[int, object] = {}
        log.info("SFMP CUDA kernels ready on GPU %d (%s, %d SMs)", self.device_index,
                 props.name, self.multiprocessors)

    def load_mma(self) -> None:
        """Compile and load the tensor-core kernels (mma_kernels.cu) once, at load time: they
        are a module of their own, so the default LUT kernels never pay for compiling them."""
        if self._mma_module is not None:
            return
        with _LOCK, self._cupy.cuda.Device(self.device_index):
            if self._mma_module is not None:
                return
            log.info("loading the SFMP tensor-core kernels on GPU %d", self.device_index)
            module = self._cupy.RawModule(code=sources.read_mma_source(),
                                          options=sources.compile_options(), jitify=False)
            kernels = {name: module.get_function(name) for name in sources.mma_kernel_params()}
            for name, kernel in kernels.items():
                log.debug("%s: %d registers, %d bytes local memory", name, kernel.num_regs,
                          kernel.local_size_bytes)
            self._kernels.update(kernels)
            self._mma_module = module

    def kernel_attributes(self) -> dict[str, dict[str, int]]:
        """Registers, local memory and static shared memory of every loaded kernel, as NVRTC
        compiled them on this GPU (the GPU check records them)."""
        return {name: dict(registers=k.num_regs, local_bytes=k.local_size_bytes,
                           shared_bytes=k.shared_size_bytes) for name, k in self._kernels.items()}

    def _stream(self):
        ptr = torch.cuda.current_stream(self.device_index).cuda_stream
        stream = self._streams.get(ptr)
        if stream is None:
            stream = self._cupy.cuda.ExternalStream(ptr, self.device_index)
            self._streams[ptr] = stream
        return stream

    def launch(self, launch: Launch) -> None:
        args = []
        for (_, kind), value in zip(sources.all_kernel_params()[launch.kernel], launch.args,
                                    strict=True):
            if kind == "p":
                args.append(0 if value is None else value.data_ptr())  # int64 by value
            else:
                args.append(np.int32(value))
        kernel = self._kernels[launch.kernel]
        with self._cupy.cuda.Device(self.device_index):
            kernel(launch.grid, (*launch.block, 1), tuple(args), shared_mem=launch.smem_bytes,
                   stream=self._stream())


def runner_for(device: torch.device | str) -> CupyRunner:
    """The (cached) runner of a CUDA device; compiles and loads the kernels on first use."""
    device = torch.device(device)
    if device.type != "cuda":
        raise SFMPError(f"the SFMP CUDA kernels run on CUDA devices, not {device}")
    if not torch.cuda.is_available():
        raise SFMPError("the SFMP CUDA kernels need a CUDA GPU, and torch sees none")
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _LOCK:
        if index not in _RUNNERS:
            _RUNNERS[index] = CupyRunner(torch.device("cuda", index))
        return _RUNNERS[index]
