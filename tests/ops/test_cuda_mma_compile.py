"""The tensor-core kernels (mma_kernels.cu) compile for sm_80 and sm_90 as the design requires.

nvcc with the loader's options: every entry point with the Python signature, the mma.sync
m16n8k16 instruction in the PTX of every GEMM, 0 bytes of stack and spills (ptxas -v), and in
the SASS (cuobjdump) HMMA in every GEMM (one per bit-width x k16 step x n8 tile) and no
local-memory access in any kernel; NVRTC (what CuPy uses) compiles the same source. No GPU is
needed; skipped cleanly where nvcc, cuobjdump or libnvrtc are absent.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
from pathlib import Path

import pytest

from sfmp_serve.ops.cuda import sources
from tests.ops.test_cuda_compile import PTX_TYPES, _find_nvrtc, _nvrtc_compile, _ptx_entries

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
GEMMS = {sources.mma_kernel(d, nb): nb for d in sources.DTYPE_TAGS for nb in sources.MMA_BATCH_TILES}
BIT_WIDTHS, STEPS_PER_KBLOCK = 8, 8  # switch (bits) cases; k16 steps of a 128-input k-block
MAX_REGISTERS_SMALL_BATCH = 128  # the design's budget for NB <= 4 (4 blocks of 128 threads/SM)


def find_cuobjdump() -> str | None:
    """cuobjdump next to an nvdisasm (it needs one): PATH, the toolkit, or a pip package."""
    dirs = [str(Path(p).parent) for p in (shutil.which("cuobjdump"),) if p]
    if NVCC:
        dirs.append(str(Path(NVCC).resolve().parent))
    for root in site.getsitepackages():
        dirs += [f"{root}/nvidia/cu13/bin", f"{root}/nvidia/cuda_cuobjdump/bin",
                 f"{root}/triton/backends/nvidia/bin"]
    for d in dirs:
        tool = Path(d) / "cuobjdump"
        if tool.is_file() and ((Path(d) / "nvdisasm").is_file() or shutil.which("nvdisasm")):
            return str(tool)
    return None


def _compile(tmp_path: Path, arch: str, mode: str) -> tuple[Path, str]:
    out = tmp_path / f"mma_{arch}.{mode}"
    cmd = sources.nvcc_command(NVCC, out, arch, mode, entry=sources.MMA_ENTRY_FILE)
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out, done.stdout + done.stderr


def ptxas_report(report: str) -> dict[str, dict[str, int]]:
    """Entry -> stack, spill stores, spill loads, registers, from `ptxas -v`."""
    table = {}
    pattern = (r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill "
               r"stores, (\d+) bytes spill loads\s*\n\s*ptxas info\s*: Used (\d+) registers")
    for m in re.finditer(pattern, report, re.S):
        table[m.group(1)] = dict(stack=int(m.group(2)), spill_stores=int(m.group(3)),
                                 spill_loads=int(m.group(4)), registers=int(m.group(5)))
    return table


def sass_counts(sass: str) -> dict[str, dict[str, int]]:
    """Function -> number of HMMA and of local-memory (LDL/STL) instructions in its SASS."""
    counts: dict[str, dict[str, int]] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            current = counts.setdefault(m.group(1), dict(hmma=0, local=0))
        elif current is not None:
            current["hmma"] += bool(re.search(r"\bHMMA\.", line))
            current["local"] += bool(re.search(r"\b(LDL|STL)\b", line))
    return counts


@needs_nvcc
@pytest.mark.parametrize("arch", sources.ARCHS)
def test_ptx_has_every_entry_point_and_the_mma_instruction(tmp_path, arch):
    out, _ = _compile(tmp_path, arch, "ptx")
    ptx = out.read_text()
    entries = _ptx_entries(ptx)
    expected = sources.mma_kernel_params()
    assert set(entries) == set(expected)
    for name, params in expected.items():
        assert entries[name] == [PTX_TYPES[kind] for _, kind in params], name
    bodies = re.split(r"\.entry\s+", ptx)[1:]
    for body in bodies:
        name = body.split("(", 1)[0].strip()
        if name in GEMMS:
            assert "mma.sync.aligned.m16n8k16.row.col.f32" in body, name
            assert "ldmatrix.sync.aligned" in body and "lop3.b32" in body, name
    assert ".local" not in ptx


@needs_nvcc
@pytest.mark.parametrize("arch", sources.ARCHS)
def test_cubin_has_no_spills_and_hmma_in_every_gemm(tmp_path, arch):
    cubin, report = _compile(tmp_path, arch, "cubin")
    table = ptxas_report(report)
    assert set(table) == set(sources.mma_kernel_params()), report
    for name, row in table.items():
        assert row["stack"] == row["spill_stores"] == row["spill_loads"] == 0, (name, row)
        if GEMMS.get(name, 0) <= 4:
            assert row["registers"] <= MAX_REGISTERS_SMALL_BATCH, (name, row)
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump (with nvdisasm) not found: SASS not checked")
    env = dict(os.environ, PATH=f"{Path(cuobjdump).parent}:{os.environ.get('PATH', '')}")
    done = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    counts = sass_counts(done.stdout)
    assert set(counts) == set(sources.mma_kernel_params())
    for name, c in counts.items():
        assert c["local"] == 0, (name, c)
        expected = BIT_WIDTHS * STEPS_PER_KBLOCK * GEMMS[name] if name in GEMMS else 0
        assert c["hmma"] == expected, (name, c)


@pytest.mark.parametrize("arch", sources.ARCHS)
def test_nvrtc_compiles_the_mma_source(arch):
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (set SFMP_NVRTC_LIB, or pip install nvidia-cuda-nvrtc)")
    if sources.cuda_include_dir() is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h) for NVRTC")
    options = [*sources.compile_options(), f"--gpu-architecture={arch}"]
    rc, log = _nvrtc_compile(lib, sources.read_mma_source(), options)
    assert rc == 0, log
