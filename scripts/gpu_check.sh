#!/usr/bin/env bash
# The whole GPU check of the SFMP CUDA kernels in one device call: build, test, sanitize, time.
#
#   scripts/gpu_check.sh [STAGE...]      stages: env compile test sanitize kernels decode
#                                        (default: these six, in that order; each independent)
#                                        and, on request only, profile (Nsight Compute, M=1)
# Writes every log and result under $OUT (default ./gpu_out). Exit status: non-zero if any
# stage failed; later stages still run.
#
# The GPU machine has torch, CuPy, nvcc, compute-sanitizer and python3 but may lack the small
# pure-Python packages sfmp_serve imports (safetensors, prometheus_client, pytest). Prepare them
# here first and carry the folder along (build/ is git-ignored):
#   .venv/bin/python -m pip install --target build/gpu_deps safetensors prometheus_client \
#       pytest pluggy iniconfig packaging
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
[ ${#stages[@]} -eq 0 ] && stages=(env compile test sanitize kernels decode)
status=0

run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures, never stop the script
  local name="$1"; shift
  local start=$SECONDS
  echo "== $name: $*" >&2
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s" >&2
  tail -n 5 "$OUT/$name.log" >&2
  [ "$rc" -ne 0 ] && status=1
  return 0
}

for stage in "${stages[@]}"; do
  case "$stage" in
    env)
      run env bash -c "nvidia-smi; nvcc --version; $PY -c 'import torch, cupy; \
print(torch.__version__, torch.version.cuda, cupy.__version__, torch.cuda.get_device_name())'"
      ;;
    compile)  # nvcc + NVRTC for sm_80/sm_90, then CuPy's own compile and load on this GPU
      run compile $PY -m pytest -q -p no:cacheprovider tests/ops/test_cuda_compile.py
      run load $PY -c "from sfmp_serve.ops.cuda.runtime import runner_for; \
r = runner_for('cuda'); print('loaded', len(r._kernels), 'kernels;', r.multiprocessors, 'SMs')"
      ;;
    test)  # GPU tests against the reference, plus the CPU-side tests of the same code
      run test $PY -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/junit.xml" \
        tests/ops/test_cuda_kernels.py tests/ops/test_cuda_plan.py tests/ops/test_cuda_emulated.py
      ;;
    sanitize)  # every path once under memcheck (device memory) and racecheck (shared memory)
      for tool in memcheck racecheck; do
        run "sanitize_$tool" compute-sanitizer --tool "$tool" --error-exitcode 3 \
          --target-processes all $PY -m tests.ops.cuda_paths
      done
      ;;
    kernels)
      run kernels $PY bench/kernels.py --json "$OUT/kernels.json"
      ;;
    decode)
      run decode $PY bench/decode.py --json "$OUT/decode.json"
      ;;
    profile)  # the LUT GEMV at 4096 x 4096, 3.5 BPW: where its time goes
      run profile ncu --kernel-name regex:sfmp_lut --launch-skip 20 --launch-count 3 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        $PY bench/kernels.py --dtypes float16 --bpw 3.5 --m 1
      ;;
    *) echo "error: unknown stage '$stage' (env compile test sanitize kernels decode profile)" >&2
       exit 2 ;;
  esac
done
echo "results in $OUT (exit $status)" >&2
exit "$status"
