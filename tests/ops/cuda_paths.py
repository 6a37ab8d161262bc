"""Run every CUDA code path once and check it against the reference (for compute-sanitizer).

    python -m tests.ops.cuda_paths            # from the repository root, on a GPU machine

Paths: the LUT kernel for every batch tile (MB = 1, 2, 4, 8, 16), with split-K + the finish
kernel and with the direct store (one split), and dequant + cuBLAS (whole matrix and chunked),
each forced at every M; fp16 and bf16. Small
shapes keep the sanitizer's slowdown bearable. Exit status 1 on a wrong result.
"""

from __future__ import annotations

import sys

import torch

from sfmp_serve.ops.cuda.linear import dequant_matmul, lut_gemm
from sfmp_serve.ops.cuda.plan import plan_lut
from sfmp_serve.ops.cuda.repack import repack
from sfmp_serve.ops.cuda.runtime import runner_for
from tests.ops.cuda_cases import TOLERANCE, make_layer, nan_like, random_x, rel_err

PATH_MS = (1, 2, 3, 8, 16, 40)
PATHS = {"lut": lut_gemm, "dequant": dequant_matmul,
         "dequant-chunked": lambda x, s, y, r: dequant_matmul(x, s, y, r, 256 * 296 * 2)}


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
    bad = run_paths()
    for line in bad:
        print(f"FAILED {line}", file=sys.stderr)
    sys.exit(1 if bad else 0)
