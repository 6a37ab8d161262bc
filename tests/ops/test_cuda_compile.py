"""The CUDA sources compile, with nvcc and with NVRTC (what CuPy uses), for sm_80 and sm_90.

Exactly the file and options the CuPy loader uses (sfmp_serve/ops/cuda/sources.py). No GPU is
needed: nvcc and NVRTC are compilers. Skipped cleanly where they are absent.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import site
import subprocess
from pathlib import Path

import pytest

from sfmp_serve.ops.cuda import sources

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
PTX_TYPES = {"p": ".u64", "i": ".u32"}


def _compile(tmp_path: Path, arch: str, mode: str) -> subprocess.CompletedProcess:
    out = tmp_path / f"kernels_{arch}.{mode}"
    done = subprocess.run(sources.nvcc_command(NVCC, out, arch, mode), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0
    return done


def _ptx_entries(ptx: str) -> dict[str, list[str]]:
    """Entry name -> PTX types of its parameters, in order."""
    entries = {}
    for match in re.finditer(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx):
        entries[match.group(1)] = re.findall(r"\.param\s+(\.\w+)", match.group(2))
    return entries


@needs_nvcc
@pytest.mark.parametrize("arch", sources.ARCHS)
def test_ptx_has_every_entry_point_with_the_python_signature(tmp_path, arch):
    _compile(tmp_path, arch, "ptx")
    entries = _ptx_entries((tmp_path / f"kernels_{arch}.ptx").read_text())
    expected = sources.kernel_params()
    assert set(entries) == set(expected)
    for name, params in expected.items():
        assert entries[name] == [PTX_TYPES[kind] for _, kind in params], name


@needs_nvcc
@pytest.mark.parametrize("arch", sources.ARCHS)
def test_cubin_builds_without_local_memory_arrays(tmp_path, arch):
    done = _compile(tmp_path, arch, "cubin")
    report = done.stdout + done.stderr
    compiled = re.findall(r"Compiling entry function '(\w+)'", report)
    assert set(compiled) == set(sources.kernel_params())
    # A stack frame means a per-thread array left registers (dynamic indexing): slow.
    frames = [int(n) for n in re.findall(r"(\d+) bytes stack frame", report)]
    assert frames and max(frames) == 0, report


# --------------------------------------------------------------------------------------------
# NVRTC: the runtime compiler CuPy's RawModule calls
# --------------------------------------------------------------------------------------------
def _find_nvrtc() -> str | None:
    patterns = [os.environ.get("SFMP_NVRTC_LIB", "")]
    include = sources.cuda_include_dir()
    if include is not None:
        patterns += [str(include.parent / "lib64" / "libnvrtc.so*")]
    for root in site.getsitepackages() + [os.environ.get("SFMP_NVRTC_DIR", "")]:
        patterns += [f"{root}/nvidia/cu13/lib/libnvrtc.so*",
                     f"{root}/nvidia/cuda_nvrtc/lib/libnvrtc.so*"]
    for pattern in patterns:
        hits = sorted(p for p in glob.glob(pattern) if pattern and "builtins" not in p
                      and ".alt." not in p)
        if hits:
            return hits[0]
    return None


def _nvrtc_compile(lib_path: str, source: str, options: list[str]) -> tuple[int, str]:
    # libnvrtc dlopens its builtins library by name: load it first from the same directory.
    for builtins in glob.glob(str(Path(lib_path).parent / "libnvrtc-builtins.so.*")):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(lib_path)
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None,
                                None)
    assert rc == 0, f"nvrtcCreateProgram: {rc}"
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")


@pytest.mark.parametrize("arch", sources.ARCHS)
def test_nvrtc_compiles_the_cupy_source(arch):
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (set SFMP_NVRTC_LIB, or pip install nvidia-cuda-nvrtc)")
    if sources.cuda_include_dir() is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h) for NVRTC")
    options = [*sources.compile_options(), f"--gpu-architecture={arch}"]
    rc, log = _nvrtc_compile(lib, sources.read_source(), options)
    assert rc == 0, log
