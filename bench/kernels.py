"""SFMP CUDA kernels vs cuBLAS at Llama-3.1-8B linear shapes, with a memory-bandwidth floor.

For every shape (in -> out), BPW and batch M: the SFMP op (LUT GEMM for M <= plan.LUT_MAX_M,
dequant + cuBLAS above) and a dense cuBLAS matmul in the same dtype, each timed as the median
over CUDA graph replays (CUDA events), rotating over enough weight copies to exceed twice the
L2 cache. floor = bytes that must move (packed weight + tables + x + y) / measured D2D copy
bandwidth; "of floor" = floor / measured time (1.0 = as fast as the bytes can be read).

    python bench/kernels.py [--dtypes float16,bfloat16] [--bpw 2.5,3.0,3.5,4.0]
                            [--m 1,2,4,8,16,64,2048] [--shapes 4096x4096,4096x28672]
                            [--paths] [--json OUT.json]

--paths also times both paths (LUT GEMM, dequant + cuBLAS) at every M <= 16, whatever cuda_linear
would pick: what plan.LUT_MAX_M is chosen from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gpu_common import (BLOCK_ROWS, GROUP_SIZE, allocate_bits, copy_bandwidth, random_packed,
                        replicas_for, sfmp_config, time_calls)
from sfmp_serve.format import LayerGeometry
from sfmp_serve.ops.cuda import cuda_linear
from sfmp_serve.ops.cuda.linear import dequant_matmul, lut_gemm
from sfmp_serve.ops.cuda.repack import CudaLinear, repack
from sfmp_serve.ops.cuda.runtime import runner_for
from sfmp_serve.ops.cuda.sources import BATCH_TILES

SHAPES = ((4096, 4096), (4096, 1024), (4096, 6144), (4096, 28672), (14336, 4096))  # in -> out
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
CALLS_PER_GRAPH = 16


def _sfmp_layers(k: int, n: int, bpw: float, dtype: torch.dtype):
    geo = LayerGeometry(n, k, GROUP_SIZE, BLOCK_ROWS)
    bits, choices = allocate_bits({"layer": geo}, bpw)
    config = sfmp_config(choices, dtype)
    first = repack(random_packed(geo, bits["layer"], dtype, "cuda"), config)
    copies = [first] + [repack(random_packed(geo, bits["layer"], dtype, "cuda", seed=i), config)
                        for i in range(1, replicas_for(first.nbytes))]
    avg = float((bits["layer"].double() * geo.rows()[:, None] * geo.cols()[None, :]).sum()
                / (n * k))
    return copies, avg


def _kernel_bytes(state: CudaLinear) -> int:
    """What the LUT kernel must read per call besides x: words, scales, tables, permutations."""
    tensors = (state.qweight, state.scales, state.meta, state.row_info, state.input_perm,
               state.output_perm)
    return sum(t.numel() * t.element_size() for t in tensors)


def _path_us(path, xs: list[torch.Tensor], layers: list[CudaLinear]) -> float:
    """Median us of one path (linear.lut_gemm or linear.dequant_matmul), forced."""
    runner = runner_for("cuda")
    m, n = xs[0].shape[0], layers[0].out_features
    ys = [torch.empty(m, n, dtype=xs[0].dtype, device="cuda") for _ in range(2)]
    return time_calls([lambda i=i: path(xs[i % len(xs)], layers[i % len(layers)], ys[i % 2],
                                        runner) for i in range(CALLS_PER_GRAPH)])


def _measure(k: int, n: int, m: int, dtype: torch.dtype, layers: list[CudaLinear],
             dense: list[torch.Tensor], bandwidth: float,
             paths: bool) -> tuple[float, float, float, dict]:
    xs = [torch.randn(m, k, device="cuda").to(dtype) for _ in range(max(len(layers),
                                                                         len(dense)))]
    sfmp_us = time_calls([lambda i=i: cuda_linear(xs[i % len(xs)], layers[i % len(layers)])
                          for i in range(CALLS_PER_GRAPH)])
    dense_us = time_calls([lambda i=i: torch.matmul(xs[i % len(xs)], dense[i % len(dense)].t())
                           for i in range(CALLS_PER_GRAPH)])
    io = (m * k + m * n) * torch.finfo(dtype).bits // 8
    floor_us = (_kernel_bytes(layers[0]) + io) / bandwidth * 1e6
    forced = {}
    if paths and m <= BATCH_TILES[-1]:  # the LUT path beyond its largest tile: too slow
        forced = dict(lut_us=_path_us(lut_gemm, xs, layers),
                      dequant_us=_path_us(dequant_matmul, xs, layers))
    return sfmp_us, dense_us, floor_us, forced


def run(args: argparse.Namespace) -> tuple[float, list[dict]]:
    runner_for("cuda")  # compile/load the kernels before timing anything
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: D2D copy bandwidth {bandwidth / 1e9:.0f} GB/s "
          f"(read + write)\n")
    print(HEADER)
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for k, n in args.shapes:
            dense_bytes = n * k * 2
            dense = [torch.randn(n, k, device="cuda").to(dtype)
                     for _ in range(replicas_for(dense_bytes, min_copies=1))]
            for bpw in args.bpw:
                layers, avg_bits = _sfmp_layers(k, n, bpw, dtype)
                for m in args.m:
                    sfmp_us, dense_us, floor_us, forced = _measure(
                        k, n, m, dtype, layers, dense, bandwidth, args.paths)
                    rows.append(dict(dtype=dtype_name, shape=f"{k}->{n}", bpw=bpw,
                                     code_bits=round(avg_bits, 3), m=m, sfmp_us=sfmp_us,
                                     cublas_us=dense_us, floor_us=floor_us,
                                     of_floor=floor_us / sfmp_us,
                                     speedup=dense_us / sfmp_us, **forced))
                    print(_row(rows[-1]), flush=True)
                del layers
            del dense
            torch.cuda.empty_cache()
    return bandwidth, rows


HEADER = ("| dtype | in->out | BPW | code bits | M | SFMP us | cuBLAS us | speedup | floor us "
          "| of floor |\n|---|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    line = (f"| {r['dtype']} | {r['shape']} | {r['bpw']} | {r['code_bits']} | {r['m']} | "
            f"{r['sfmp_us']:.1f} | {r['cublas_us']:.1f} | {r['speedup']:.2f}x | "
            f"{r['floor_us']:.1f} | {r['of_floor']:.2f} |")
    if "lut_us" in r:  # --paths
        line += f" LUT {r['lut_us']:.1f} us, dequant+cuBLAS {r['dequant_us']:.1f} us |"
    return line


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float16,bfloat16",
                        type=lambda s: [d for d in s.split(",") if d])
    parser.add_argument("--bpw", default="2.5,3.0,3.5,4.0",
                        type=lambda s: [float(v) for v in s.split(",")])
    parser.add_argument("--m", default="1,2,4,8,16,64,2048",
                        type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES),
                        type=_shapes, help="in x out, comma-separated")
    parser.add_argument("--paths", action="store_true",
                        help="also time the LUT and the dequant path forced, at every M")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        print(f"error: --dtypes {unknown}: expected float16 and/or bfloat16", file=sys.stderr)
        return 2
    bandwidth, rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                             copy_bandwidth=bandwidth, rows=rows),
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
