"""Host emulator of the CUDA kernels: kernels.cu built with nvcc for the CPU, run via ctypes.

The same kernel bodies the GPU runs (see common.cuh) execute here one thread after another,
phase by phase, on CPU tensors. It checks index arithmetic, masking of ragged edges, launch
planning and argument passing on machines without a GPU; it says nothing about speed, races
between warps or device memory errors (the GPU tests and compute-sanitizer cover those).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from sfmp_serve.errors import SFMPError
from sfmp_serve.ops.cuda import sources
from sfmp_serve.ops.cuda.launch import Launch

log = logging.getLogger(__name__)

EMULATION_DEFINE = "SFMP_HOST_EMULATION"


def build_library(nvcc: str | None = None, cache_dir: Path | None = None,
                  entry: Path = sources.ENTRY_FILE,
                  headers: tuple[str, ...] = sources.HEADERS) -> Path:
    """Compile an entry file (default kernels.cu) for the host into a shared library (cached by
    source digest)."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise SFMPError("the CUDA host emulator needs nvcc on the PATH")
    cache_dir = cache_dir or Path(tempfile.gettempdir()) / f"sfmp-emulator-{os.getuid()}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = sources.source_digest(" ".join(sources.compile_options((EMULATION_DEFINE,))),
                                   entry, headers)
    lib = cache_dir / f"{entry.stem}_host_{digest}.so"
    if lib.is_file():
        return lib
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [nvcc, *sources.compile_options((EMULATION_DEFINE,)), "-O2", "-shared",
           "-Xcompiler", "-fPIC", "-o", str(tmp), str(entry)]
    log.info("building the CUDA host emulator: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SFMPError(f"nvcc failed building the host emulator:\n{done.stderr}")
    os.replace(tmp, lib)
    return lib


class MmaDecodeHost:
    """The decode helpers of mma_decode.cuh built for the host: the same C++ the kernels run
    (lop3 immediates, masks, rotations, magic numbers), without the mma itself."""

    def __init__(self, library: Path | None = None):
        self._lib = ctypes.CDLL(str(library or build_library(
            entry=sources.MMA_ENTRY_FILE, headers=sources.MMA_HEADERS)))
        self._lib.sfmp_mma_decode_chunk.restype = ctypes.c_int
        self._lib.sfmp_mma_decode_chunk.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                    ctypes.c_void_p]

    def decode_chunk(self, words: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
        """Plane words int32 [bits, 32 lanes] of one (tile, chunk) -> the decoded codes as
        fp16/bf16 [16 rows, 64 inputs], placed by the A-fragment map."""
        words = words.to(torch.int32).contiguous()
        if words.shape != (bits, 32):
            raise ValueError(f"decode_chunk: words {tuple(words.shape)}, expected ({bits}, 32)")
        out = torch.zeros(16, 64, dtype=torch.int16)
        rc = self._lib.sfmp_mma_decode_chunk(words.data_ptr(), bits,
                                             int(dtype == torch.bfloat16), out.data_ptr())
        if rc != 0:
            raise ValueError(f"decode_chunk: bit-width {bits} is not in 1..8")
        return out.view(dtype)


class EmulatorRunner:
    """A KernelRunner on the CPU; `multiprocessors` only steers the launch planning."""

    def __init__(self, multiprocessors: int = 132, library: Path | None = None):
        self.multiprocessors = multiprocessors
        self._lib = ctypes.CDLL(str(library or build_library()))
        self._lib.sfmp_emulator_error.restype = ctypes.c_char_p
        self._functions: dict[str, ctypes._CFuncPtr] = {}
        for name, params in sources.kernel_params().items():
            fn = getattr(self._lib, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_int] * 5 + [
                ctypes.c_void_p if kind == "p" else ctypes.c_int for _, kind in params]
            self._functions[name] = fn
        self.launches: list[Launch] = []  # every launch run, for tests to inspect

    def lut_words_per_tile(self, batch_tile: int) -> int:
        """LutTile<MB>::kWords as compiled (plan.py must agree)."""
        return int(self._lib.sfmp_lut_words_per_tile(batch_tile))

    def launch(self, launch: Launch) -> None:
        launch.check()
        args = []
        for value in launch.args:
            if isinstance(value, torch.Tensor):
                if value.device.type != "cpu":
                    raise ValueError(f"{launch.kernel}: the emulator needs CPU tensors")
                args.append(ctypes.c_void_p(value.data_ptr()))
            elif value is None:
                args.append(ctypes.c_void_p(0))
            else:
                args.append(value)
        self._lib.sfmp_emulator_clear()
        self._functions[launch.kernel](*launch.grid, launch.block[0] * launch.block[1],
                                       launch.smem_bytes, *args)
        error = self._lib.sfmp_emulator_error().decode()
        if error:
            raise RuntimeError(f"{launch.kernel}: {error}")
        self.launches.append(launch)
