"""Build (once per machine) and load the compiled CPU kernels with torch's extension JIT.

The sources in csrc/ are compiled at first use with the machine's C++ compiler (vLLM's CPU
backend needs one already, for torch.compile). The build lives in a cache directory keyed by a
hash of the sources, the compiler flags and the torch version, so an upgrade rebuilds and
every later process only loads the shared library. Kernels pick their instruction set at run
time (kernel.h), so one build serves AVX-512 and AVX2 machines alike.

    SFMP_CACHE_DIR      cache root (default: $XDG_CACHE_HOME/sfmp-serve or ~/.cache/sfmp-serve)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from sfmp_serve.errors import SFMPError

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = ("binding.cpp", "kernel_amx.cpp", "kernel_avx512_bf16.cpp", "kernel_avx512.cpp",
           "kernel_avx2.cpp")
HEADERS = ("kernel.h", "avx512_impl.h")
# -fopenmp makes at::parallel_for run on torch's OpenMP threads (its intra-op setting); the
# symbols resolve to the libgomp torch already loaded.
CFLAGS = ("-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas")


def cache_root() -> Path:
    if os.environ.get("SFMP_CACHE_DIR"):
        return Path(os.environ["SFMP_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sfmp-serve"


def build_key() -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(platform.python_version().encode())
    return digest.hexdigest()[:16]


def unsupported_reason() -> str | None:
    """Why the kernels cannot be built here at all (None if they can be tried)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the compiled kernels are x86-64 only (this machine: {platform.machine()})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"no C++ compiler found ('{compiler}' is not on PATH; install g++ or set CXX)")
    return None


@functools.lru_cache(maxsize=None)
def load() -> ModuleType:
    """The compiled module (built on first use on this machine); SFMPError if it cannot be."""
    why = unsupported_reason()
    if why:
        raise SFMPError(f"cannot build the SFMP CPU kernels: {why}")
    from torch.utils.cpp_extension import load as load_extension

    key = build_key()
    build_dir = cache_root() / "cpu-kernels" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        logger.info("building the SFMP CPU kernels in %s (first use on this machine; "
                    "about a minute)", build_dir)
    try:
        return load_extension(name=f"sfmp_cpu_{key}",
                              sources=[str(SOURCE_DIR / s) for s in SOURCES],
                              extra_cflags=list(CFLAGS), build_directory=str(build_dir),
                              verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = next((line for line in lines if "error" in line.lower()
                      and not line.startswith("Error building")), lines[0] if lines else repr(e))
        raise SFMPError(f"cannot build the SFMP CPU kernels in {build_dir}: {first} "
                        "(a C++17 compiler with OpenMP is needed)") from e


def main() -> int:
    """`python -m sfmp_serve.ops.cpu_native.build`: build now (install scripts, images)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        module = load()
    except SFMPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"SFMP CPU kernels ready in {cache_root() / 'cpu-kernels' / build_key()}; "
          f"instruction sets on this CPU: {', '.join(module.isas()) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
