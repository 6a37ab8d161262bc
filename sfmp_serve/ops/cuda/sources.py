"""The CUDA sources of the SFMP kernels, their entry points and how they are compiled.

One place shared by the CuPy loader (runtime.py), the host emulator (emulator.py) and the CI
compile test, so all of them build the same file with the same defines.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch

CUDA_DIR = Path(__file__).resolve().parent
ENTRY_FILE = CUDA_DIR / "kernels.cu"
HEADERS = ("common.cuh", "lut_gemm.cuh", "finish.cuh", "dequant.cuh", "host_block.cuh")
# The tensor-core family (opt-in, see backend.py): a module of its own, compiled on first use.
MMA_ENTRY_FILE = CUDA_DIR / "mma_kernels.cu"
MMA_HEADERS = ("common.cuh", "mma_decode.cuh", "mma.cuh")
# Defines every build uses; the host emulator adds SFMP_HOST_EMULATION.
DEFINES: tuple[str, ...] = ()
STD = "c++17"
ARCHS = ("sm_80", "sm_90")  # Ampere (A100) and Hopper (H100/H200); both tested in CI

DTYPE_TAGS = {torch.float16: "f16", torch.bfloat16: "bf16"}
BATCH_TILES = (1, 2, 4, 8, 16)  # MB specializations of the LUT kernel
MMA_BATCH_TILES = (1, 2, 4, 8)  # NB specializations of the mma kernel: n8 tiles of the batch

# Parameter lists of the entry points in kernels.cu, in order: "p" = pointer, "i" = int32.
LUT_PARAMS = (("x", "p"), ("input_perm", "p"), ("qweight", "p"), ("meta", "p"),
              ("row_info", "p"), ("scales", "p"), ("output_perm", "p"), ("bias", "p"),
              ("partial", "p"), ("y", "p"), ("M", "i"), ("N", "i"), ("K", "i"), ("ldx", "i"),
              ("ldy", "i"), ("group_size", "i"), ("n_groups", "i"), ("groups_per_split", "i"))
FINISH_PARAMS = (("partial", "p"), ("output_perm", "p"), ("bias", "p"), ("y", "p"),
                 ("M", "i"), ("N", "i"), ("ldy", "i"), ("splits", "i"))
DEQUANT_PARAMS = (("qweight", "p"), ("meta", "p"), ("row_info", "p"), ("scales", "p"),
                  ("dest_rows", "p"), ("w", "p"), ("row_begin", "i"), ("row_end", "i"),
                  ("N", "i"), ("K", "i"), ("ldw", "i"), ("group_size", "i"), ("n_groups", "i"),
                  ("groups_per_block", "i"))
MMA_PARAMS = (("x", "p"), ("kidx", "p"), ("qweight", "p"), ("tile_meta", "p"), ("kb_info", "p"),
              ("scales", "p"), ("out_row", "p"), ("bias", "p"), ("partial", "p"),
              ("counters", "p"), ("y", "p"), ("M", "i"), ("ldx", "i"), ("ldy", "i"),
              ("n_tiles", "i"), ("n_kb", "i"), ("kb_per_split", "i"), ("zchunks", "i"))
MMA_DEQUANT_PARAMS = (("qweight", "p"), ("tile_meta", "p"), ("kb_info", "p"), ("scales", "p"),
                      ("out_row", "p"), ("w", "p"), ("ldw", "i"), ("tile_begin", "i"),
                      ("tile_end", "i"), ("n_kb", "i"), ("kb_per_block", "i"))
MMA_GATHER_PARAMS = (("x", "p"), ("kidx", "p"), ("xr", "p"), ("M", "i"), ("ldx", "i"),
                     ("padded_cols", "i"))


def lut_kernel(dtype: torch.dtype, batch_tile: int) -> str:
    return f"sfmp_lut_{DTYPE_TAGS[dtype]}_m{batch_tile}"


def finish_kernel(dtype: torch.dtype) -> str:
    return f"sfmp_finish_{DTYPE_TAGS[dtype]}"


def dequant_kernel(dtype: torch.dtype) -> str:
    return f"sfmp_dequant_{DTYPE_TAGS[dtype]}"


@functools.cache
def kernel_params() -> dict[str, tuple[tuple[str, str], ...]]:
    """Every entry point of kernels.cu and its parameter list (do not mutate: cached)."""
    table: dict[str, tuple[tuple[str, str], ...]] = {}
    for dtype in DTYPE_TAGS:
        for mb in BATCH_TILES:
            table[lut_kernel(dtype, mb)] = LUT_PARAMS
        table[finish_kernel(dtype)] = FINISH_PARAMS
        table[dequant_kernel(dtype)] = DEQUANT_PARAMS
    return table


def mma_kernel(dtype: torch.dtype, n_tiles: int) -> str:
    return f"sfmp_mma_{DTYPE_TAGS[dtype]}_n{n_tiles}"


def mma_dequant_kernel(dtype: torch.dtype) -> str:
    return f"sfmp_mma_dequant_{DTYPE_TAGS[dtype]}"


def mma_gather_kernel(dtype: torch.dtype) -> str:
    return f"sfmp_mma_gather_{DTYPE_TAGS[dtype]}"


@functools.cache
def mma_kernel_params() -> dict[str, tuple[tuple[str, str], ...]]:
    """Every entry point of mma_kernels.cu and its parameter list (do not mutate: cached)."""
    table: dict[str, tuple[tuple[str, str], ...]] = {}
    for dtype in DTYPE_TAGS:
        for nb in MMA_BATCH_TILES:
            table[mma_kernel(dtype, nb)] = MMA_PARAMS
        table[mma_dequant_kernel(dtype)] = MMA_DEQUANT_PARAMS
        table[mma_gather_kernel(dtype)] = MMA_GATHER_PARAMS
    return table


@functools.cache
def all_kernel_params() -> dict[str, tuple[tuple[str, str], ...]]:
    """Both modules' entry points (names are unique across them)."""
    return {**kernel_params(), **mma_kernel_params()}


def source_digest(extra: str = "", entry: Path = ENTRY_FILE,
                  headers: tuple[str, ...] = HEADERS) -> str:
    """Digest of an entry file and its headers (plus `extra`, e.g. build options)."""
    h = hashlib.sha256()
    for name in (entry.name, *headers):
        h.update((CUDA_DIR / name).read_bytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def read_source(entry: Path = ENTRY_FILE, headers: tuple[str, ...] = HEADERS) -> str:
    """The source CuPy compiles: the entry file plus a comment with the digest of its headers.

    CuPy's on-disk kernel cache is keyed by the source text and options only, so without the
    digest an edited header would silently load a stale binary."""
    return entry.read_text() + f"\n// sfmp sources digest {source_digest('', entry, headers)}\n"


def read_mma_source() -> str:
    return read_source(MMA_ENTRY_FILE, MMA_HEADERS)


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (cuda_fp16.h), or None if no toolkit is found."""
    candidates = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


def compile_options(extra_defines: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Options common to NVRTC (CuPy) and nvcc: language level, include path, defines."""
    opts = [f"--std={STD}", f"-I{CUDA_DIR}"]
    include = cuda_include_dir()
    if include is not None:
        opts.append(f"-I{include}")
    opts += [f"-D{d}" for d in DEFINES + extra_defines]
    return tuple(opts)


def nvcc_command(nvcc: str, output: Path, arch: str, mode: str = "cubin",
                 entry: Path = ENTRY_FILE) -> list[str]:
    """nvcc compiling an entry file to PTX or cubin for one architecture (the CI check)."""
    if mode not in ("ptx", "cubin"):
        raise ValueError(f"mode must be 'ptx' or 'cubin', got {mode!r}")
    verbose = ["-Xptxas", "-v"] if mode == "cubin" else []  # registers and spills per kernel
    return [nvcc, *compile_options(), f"-arch={arch}", f"--{mode}", *verbose, "-o", str(output),
            str(entry)]
