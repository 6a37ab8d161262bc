"""Micro-benchmark of the CPU path of sfmp::linear on SmolLM2-135M shapes vs a dense matmul.

    .venv/bin/python bench/cpu_op.py [--threads 1] [--chunk-elems 524288] [--dense-min-m 256]

Random SFMP layers (block 512 x 128, bits {2,3,4} mixed), median of repeated calls. Prints a
markdown table; numbers are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests/

from sfmp_serve.ops import cpu, cpu_layout  # noqa: E402
from sfmp_serve.ops.runtime import fuse_shards  # noqa: E402
from tests.serving.packed import random_packed, sfmp_config  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (192, 576)]  # q/o, gate/up, down, k/v


def _time_us(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-elems", type=int, default=cpu_layout.CHUNK_ELEMS)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dense-min-m", type=int, default=cpu.DENSE_MIN_M,
                        help="rows from which chunks are dequantized to dense tiles (a huge "
                             "value times the per-group GEMMs at every M)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu_layout.CHUNK_ELEMS = args.chunk_elems
    cpu.DENSE_MIN_M = args.dense_min_m
    gen = torch.Generator().manual_seed(0)
    print(f"threads={args.threads} chunk_elems={args.chunk_elems} "
          f"dense_min_m={args.dense_min_m}\n")
    print("| dtype | out x in | M | sfmp us | dense us | sfmp/dense | resident bytes sfmp/dense |")
    print("|---|---|---|---|---|---|---|")
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        config = sfmp_config(group_size=128, block_rows=512, act_dtype=name)
        for n, k in SHAPES:
            packed = random_packed(n, k, config, gen)
            state = cpu.prepare(fuse_shards("bench", ("bench",), (packed,), config, dtype, "cpu"))
            dense = torch.randn(n, k).to(dtype)
            for m in (1, 64, 512, 2048):
                x = torch.randn(m, k).to(dtype)
                t_sfmp = _time_us(lambda: cpu.apply(x, state), args.reps)
                t_dense = _time_us(lambda: x @ dense.t(), args.reps)
                print(f"| {name} | {n}x{k} | {m} | {t_sfmp:.0f} | {t_dense:.0f} | "
                      f"{t_sfmp / t_dense:.1f} | {state.nbytes / (dense.numel() * 2):.3f} "
                      "(vs bf16) |")


if __name__ == "__main__":
    main()
