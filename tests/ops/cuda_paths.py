"""Run every CUDA code path once and check it against the reference (for compute-sanitizer).

    python -m tests.ops.cuda_paths [lut] [mma]   # from the repository root, on a GPU machine

Paths of the LUT family: the LUT kernel for every batch tile (MB = 1, 2, 4, 8, 16), with split-K
+ the finish kernel and with the direct store (one split), and dequant + cuBLAS (whole matrix
and chunked). Of the tensor-core family: the mma kernel for every NB (1, 2, 4, 8) and two
z-chunks, split (tickets) and direct store, and its gather + dequant + cuBLAS (whole and
chunked). Each forced at every M; fp16 and bf16; both families unless named. Small shapes keep
the sanitizer's slowdown bearable. Exit status 1 on a wrong result.
"""

from __future__ import annotations

import sys

import torch

from sfmp_serve.ops.cuda.linear import dequant_matmul, lut_gemm
from sfmp_serve.ops.cuda.mma_linear import mma_dequant_matmul, mma_gemm
from sfmp_serve.ops.cuda.mma_plan import plan_mma
from sfmp_serve.ops.cuda.mma_repack import repack_mma_linear
from sfmp_serve.ops.cuda.plan import plan_lut
from sfmp_serve.ops.cuda.repack import repack
from sfmp_serve.ops.cuda.runtime import runner_for
from tests.ops.cuda_cases import TOLERANCE, make_layer, nan_like, random_x, rel_err

PATH_MS = (1, 2, 3, 8, 16, 40)
PATHS = {"lut": lut_gemm, "dequant": dequant_matmul,
         "dequant-chunked": lambda x, s, y, r: dequant_matmul(x, s, y, r, 256 * 296 * 2)}
MMA_MS = (1, 3, 8, 16, 33, 40, 65, 128, 200)
MMA_PATHS = {"mma": mma_gemm, "mma-dequant": lambda x, s, y, r: mma_dequant_matmul(x, s, y, r),
             "mma-dequant-chunked": lambda x, s, y, r: mma_dequant_matmul(x, s, y, r,
                                                                           64 * 384 * 2)}


def run_mma_paths() -> list[str]:
    failures = []
    runner = runner_for("cuda")
    runner.load_mma()
    for dtype in (torch.float16, torch.bfloat16):
        # 600 rows (ragged 512-row blocks), 296 inputs (a ragged 40-input group), all 2/3/4/8
        layer = make_layer(600, 296, (2, 3, 4, 8), dtype, group_size=128, block_rows=512,
                           bias=True)
        state = repack_mma_linear(layer.packed, layer.config, device="cuda")
        x = random_x(max(MMA_MS), 296, dtype, device="cuda")
        real_sms = runner.multiprocessors
        for sms in (real_sms, 1):  # planning for 1 SM gives one split: the direct store
            runner.multiprocessors = sms
            try:
                for m in MMA_MS:
                    for name, path in MMA_PATHS.items():
                        y = nan_like((m, 600), dtype, "cuda")
                        path(x[:m], state, y, runner)
                        torch.cuda.synchronize()
                        err = rel_err(y, layer.reference(x[:m]))
                        splits = plan_mma(min(m, 128), state.n_tiles, state.n_kblocks,
                                          sms).splits
                        line = f"{dtype} {name} M={m} splits={splits}: rel err {err:.2e}"
                        print(line, flush=True)
                        if torch.isnan(y).any() or not err < TOLERANCE[dtype]:
                            failures.append(line)
                if state.counters.any():
                    failures.append(f"{dtype}: split-K tickets not reset")
            finally:
                runner.multiprocessors = real_sms
    return failures


def run_paths() -> list[str]:
    failures = []
    runner = runner_for("cuda")
    for dtype in (torch.float16, torch.bfloat16):
        layer = make_layer(600, 296, (2, 3, 4), dtype, group_size=128, block_rows=512,
                           bias=True)
        state = repack(layer.packed, layer.config, device="cuda")
        x = random_x(max(PATH_MS), 296, dtype, device="cuda")
        real_sms = runner.multiprocessors
        for sms in (real_sms, 1):  # planning for 1 SM gives one split: the direct store
            runner.multiprocessors = sms
            try:
                for m in PATH_MS:
                    for name, path in PATHS.items():
                        y = nan_like((m, 600), dtype, "cuda")
                        path(x[:m], state, y, runner)
                        torch.cuda.synchronize()
                        err = rel_err(y, layer.reference(x[:m]))
                        splits = plan_lut(m, 600, state.n_groups, sms).splits
                        line = f"{dtype} {name} M={m} splits={splits}: rel err {err:.2e}"
                        print(line, flush=True)
                        if torch.isnan(y).any() or not err < TOLERANCE[dtype]:
                            failures.append(line)
            finally:
                runner.multiprocessors = real_sms
    return failures


if __name__ == "__main__":
    families = sys.argv[1:] or ["lut", "mma"]
    bad = (run_paths() if "lut" in families else []) + (
        run_mma_paths() if "mma" in families else [])
    for line in bad:
        print(f"FAILED {line}", file=sys.stderr)
    sys.exit(1 if bad else 0)
