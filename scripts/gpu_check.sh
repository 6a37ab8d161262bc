#!/usr/bin/env bash
# The whole GPU check of the SFMP CUDA kernels in one device call: build, test, sanitize, time.
#
#   scripts/gpu_check.sh [STAGE...]   stages: env compile test sanitize kernels decode test_lut
#                                     (default: these seven, in that order; each independent)
#                                     on request only: nvcc (the CPU CI's compile tests),
#                                     racecheck, sanitize_lut, profile (Nsight Compute, M=1)
# Writes every log and result under $OUT (default ./gpu_out). Exit status: non-zero if any
# stage failed; later stages still run. Every step has a time cap (CAP_<step> seconds in the
# environment overrides the table below); the default stages' caps add up to 560 s, so one
# device call of 600 s holds them. The benchmarks write their JSON after every row, so a capped
# benchmark still leaves what it measured.
#
# The GPU machine has torch, CuPy, nvcc, compute-sanitizer and python3 but may lack the small
# pure-Python packages sfmp_serve imports (safetensors, prometheus_client, pytest). Prepare them
# here first and carry the folder along (build/ is git-ignored):
#   .venv/bin/python -m pip install --target build/gpu_deps safetensors prometheus_client \
#       pytest pluggy iniconfig packaging pytest-timeout
# then run this script with carry=["build/gpu_deps"]. It is put on PYTHONPATH if present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEPS="${SFMP_GPU_DEPS:-$PWD/build/gpu_deps}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$DEPS" ] && export PYTHONPATH="$PYTHONPATH:$DEPS"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env compile test sanitize kernels decode test_lut)
status=0
declare -A CAP=([env]=20 [compile]=50 [load]=50 [test]=110 [sanitize_mma]=70 [kernels]=100
                [decode]=100 [test_lut]=60 [nvcc]=120 [racecheck_mma]=120 [sanitize_lut]=120
                [racecheck_lut]=120 [profile]=180)

run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures, never stop the script
  local name="$1"; shift
  local cap="${CAP[$name]:-120}"
  local var="CAP_$name"
  cap="${!var:-$cap}"
  local start=$SECONDS
  echo "== $name (cap ${cap}s): $*" >&2
  timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s" >&2
  tail -n 5 "$OUT/$name.log" >&2
  [ "$rc" -ne 0 ] && status=1
  return 0
}

PYTEST=($PY -m pytest -q -p no:cacheprovider -rs)
for stage in "${stages[@]}"; do
  case "$stage" in
    env)
      run env bash -c "nvidia-smi; nvcc --version; $PY -c 'import torch, cupy, numpy; \
print(torch.__version__, torch.version.cuda, cupy.__version__, numpy.__version__, \
torch.cuda.get_device_name())'"
      ;;
    compile)  # NVRTC (what CuPy uses) for sm_80/sm_90, then CuPy's own compile + load here
      run compile "${PYTEST[@]}" -k nvrtc tests/ops/test_cuda_compile.py \
        tests/ops/test_cuda_mma_compile.py
      run load $PY -c "
import json, torch
from sfmp_serve.ops.cuda.runtime import runner_for
r = runner_for('cuda'); r.load_mma()
attrs = r.kernel_attributes()
json.dump(attrs, open('$OUT/kernel_attributes.json', 'w'), indent=1)
for name, a in sorted(attrs.items()): print(name, a)
bad = [n for n, a in attrs.items() if a['local_bytes']]
print('loaded', len(attrs), 'kernels;', r.multiprocessors, 'SMs; local memory in', bad)
raise SystemExit(1 if bad else 0)"
      ;;
    nvcc)  # what the CPU CI already checks: nvcc, 0 spills, HMMA in the SASS
      run nvcc "${PYTEST[@]}" tests/ops/test_cuda_compile.py tests/ops/test_cuda_mma_compile.py
      ;;
    test)  # the tensor-core family on the GPU against the reference, plus its CPU side
      run test "${PYTEST[@]}" --junitxml="$OUT/junit.xml" tests/ops/test_cuda_mma_kernels.py \
        tests/ops/test_cuda_mma_plan.py tests/ops/test_cuda_mma_layout.py
      ;;
    test_lut)  # the LUT family (verified before; its loader and launches changed a little)
      run test_lut "${PYTEST[@]}" --junitxml="$OUT/junit_lut.xml" tests/ops/test_cuda_kernels.py \
        tests/ops/test_cuda_plan.py
      ;;
    sanitize)  # every tensor-core path once under memcheck (device memory)
      run sanitize_mma compute-sanitizer --tool memcheck --error-exitcode 3 \
        --target-processes all $PY -m tests.ops.cuda_paths mma
      ;;
    racecheck)  # shared memory races of the tensor-core kernels
      run racecheck_mma compute-sanitizer --tool racecheck --error-exitcode 3 \
        --target-processes all $PY -m tests.ops.cuda_paths mma
      ;;
    sanitize_lut)  # the LUT family (verified before; unchanged kernels)
      for tool in memcheck racecheck; do
        run "$([ $tool = memcheck ] && echo sanitize_lut || echo racecheck_lut)" \
          compute-sanitizer --tool "$tool" --error-exitcode 3 --target-processes all \
          $PY -m tests.ops.cuda_paths lut
      done
      ;;
    kernels)  # both families side by side with cuBLAS, 3.5 BPW, Llama-3.1-8B shapes
      run kernels $PY bench/kernels.py --kernels lut,mma --bpw 3.5 --m 1,16,64,128,2048 \
        --paths --json "$OUT/kernels.json"
      ;;
    decode)
      run decode $PY bench/decode.py --kernels lut,mma --bpw 3.5 --batch 1,8,16 \
        --json "$OUT/decode.json"
      ;;
    profile)  # the mma GEMV at 4096 -> 28672, 3.5 BPW: where its time goes
      run profile ncu --kernel-name regex:sfmp_mma --launch-skip 20 --launch-count 3 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section ComputeWorkloadAnalysis $PY bench/kernels.py --kernels mma --dtypes float16 \
        --bpw 3.5 --m 1 --shapes 4096x28672
      ;;
    *) echo "error: unknown stage '$stage' (env compile nvcc test test_lut sanitize" \
            "racecheck sanitize_lut kernels decode profile)" >&2
       exit 2 ;;
  esac
done
echo "results in $OUT (exit $status)" >&2
exit "$status"
