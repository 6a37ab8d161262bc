"""SFMP CUDA kernels vs cuBLAS at Llama-3.1-8B linear shapes, with memory-bandwidth floors.

For every shape (in -> out), BPW, batch M and kernel family (--kernels): the SFMP op and a
dense cuBLAS matmul in the same dtype, each timed as the median over CUDA graph replays (CUDA
events), rotating over enough weight copies to exceed twice the L2 cache. Families: "lut" (LUT
GEMM for M <= plan.LUT_MAX_M, dequant + cuBLAS above; the default backend) and "mma" (the
tensor-core kernel for M <= mma_plan.MMA_MAX_M, L2-chunked dequant + cuBLAS above; opt-in).
floor = bytes that must move (packed weight + tables + x + y) / measured bandwidth: "of copy"
against the D2D copy bandwidth (read + write), "of read" against the read bandwidth (a sum over
1 GiB); 1.0 = as fast as the bytes can be moved.

    python bench/kernels.py [--kernels lut,mma] [--dtypes float16,bfloat16] [--bpw 3.5]
                            [--m 1,16,64,128,2048] [--shapes 4096x4096,4096x28672]
                            [--paths] [--json OUT.json]

--paths also times every path of each family forced, whatever the dispatch would pick: LUT
GEMM and dequant + cuBLAS (M <= 16), and mma GEMM, whole-matrix and L2-chunked dequant + cuBLAS
(every M): what LUT_MAX_M, MMA_MAX_M and the prefill scratch are chosen from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from gpu_common import (BLOCK_ROWS, GROUP_SIZE, allocate_bits, copy_bandwidth, random_mma,
                        random_packed, read_bandwidth, replicas_for, sfmp_config, time_calls)
from sfmp_serve.format import LayerGeometry
from sfmp_serve.ops.cuda import cuda_linear, mma_linear
from sfmp_serve.ops.cuda.linear import dequant_matmul, lut_gemm
from sfmp_serve.ops.cuda.mma_linear import mma_dequant_matmul, mma_gemm, scratch_bytes_for
from sfmp_serve.ops.cuda.mma_repack import MmaLinear
from sfmp_serve.ops.cuda.repack import CudaLinear, repack
from sfmp_serve.ops.cuda.runtime import runner_for
from sfmp_serve.ops.cuda.sources import BATCH_TILES

SHAPES = ((4096, 4096), (4096, 6144), (4096, 28672), (14336, 4096))  # in -> out
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FAMILIES = ("lut", "mma")
CALLS_PER_GRAPH = 16
WHOLE_SCRATCH = 1 << 40  # forces the whole-matrix dequant (rows in original order, no gather)


def _sfmp_layers(family: str, k: int, n: int, bpw: float, dtype: torch.dtype):
    geo = LayerGeometry(n, k, GROUP_SIZE, BLOCK_ROWS)
    bits, choices = allocate_bits({"layer": geo}, bpw)
    config = sfmp_config(choices, dtype)

    def make(seed: int):
        if family == "mma":
            return random_mma(geo, bits["layer"], dtype, "cuda", seed=seed)
        return repack(random_packed(geo, bits["layer"], dtype, "cuda", seed=seed), config)

    first = make(0)
    copies = [first] + [make(i) for i in range(1, replicas_for(first.nbytes))]
    avg = float((bits["layer"].double() * geo.rows()[:, None] * geo.cols()[None, :]).sum()
                / (n * k))
    return copies, avg


def _kernel_bytes(state: CudaLinear | MmaLinear) -> int:
    """What the kernel must read per call besides x: words, scales, tables, permutations."""
    if isinstance(state, MmaLinear):
        tensors = (state.qweight, state.scales, state.tile_meta, state.kb_info, state.kidx,
                   state.out_row)
    else:
        tensors = (state.qweight, state.scales, state.meta, state.row_info, state.input_perm,
                   state.output_perm)
    return sum(t.numel() * t.element_size() for t in tensors)


def _time_path(path: Callable, xs: list[torch.Tensor], layers: list) -> float:
    """Median us of path(x, layer, y, runner) (a forced path), rotating inputs and weights."""
    runner = runner_for("cuda")
    m, n = xs[0].shape[0], layers[0].out_features
    ys = [torch.empty(m, n, dtype=xs[0].dtype, device="cuda") for _ in range(2)]
    return time_calls([lambda i=i: path(xs[i % len(xs)], layers[i % len(layers)], ys[i % 2],
                                        runner) for i in range(CALLS_PER_GRAPH)])


def _forced_paths(family: str, m: int) -> dict[str, Callable]:
    if family == "lut":
        return ({"lut_us": lut_gemm, "dequant_us": dequant_matmul} if m <= BATCH_TILES[-1]
                else {})  # the LUT path beyond its largest tile: too slow to matter
    paths = {"mma_us": mma_gemm,
             "dequant_l2_us": lambda x, s, y, r: mma_dequant_matmul(x, s, y, r),
             "dequant_whole_us": lambda x, s, y, r: mma_dequant_matmul(x, s, y, r,
                                                                       WHOLE_SCRATCH)}
    if m > 512:  # the mma kernel loops over 128-row slices: only interesting up to a few
        del paths["mma_us"]
    return paths


def _measure(family: str, k: int, n: int, m: int, dtype: torch.dtype, layers: list,
             dense: list[torch.Tensor], bandwidth: dict[str, float], paths: bool) -> dict:
    xs = [torch.randn(m, k, device="cuda").to(dtype) for _ in range(max(len(layers),
                                                                         len(dense)))]
    op = mma_linear if family == "mma" else cuda_linear
    sfmp_us = time_calls([lambda i=i: op(xs[i % len(xs)], layers[i % len(layers)])
                          for i in range(CALLS_PER_GRAPH)])
    dense_us = time_calls([lambda i=i: torch.matmul(xs[i % len(xs)], dense[i % len(dense)].t())
                           for i in range(CALLS_PER_GRAPH)])
    moved = _kernel_bytes(layers[0]) + (m * k + m * n) * torch.finfo(dtype).bits // 8
    copy_floor = moved / bandwidth["copy"] * 1e6
    read_floor = moved / bandwidth["read"] * 1e6
    row = dict(sfmp_us=sfmp_us, cublas_us=dense_us, speedup=dense_us / sfmp_us,
               floor_us=copy_floor, of_copy=copy_floor / sfmp_us, of_read=read_floor / sfmp_us)
    if paths:
        row.update({name: _time_path(path, xs, layers)
                    for name, path in _forced_paths(family, m).items()})
    return row


def run(args: argparse.Namespace) -> tuple[dict[str, float], list[dict]]:
    runner = runner_for("cuda")  # compile/load the kernels before timing anything
    if "mma" in args.kernels:
        runner.load_mma()
    bandwidth = dict(copy=copy_bandwidth(), read=read_bandwidth())
    print(f"{torch.cuda.get_device_name()}: D2D copy bandwidth {bandwidth['copy'] / 1e9:.0f} "
          f"GB/s (read + write), read bandwidth {bandwidth['read'] / 1e9:.0f} GB/s, prefill "
          f"scratch {scratch_bytes_for(torch.device('cuda')) >> 20} MiB\n")
    print(HEADER)
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for k, n in args.shapes:
            dense = [torch.randn(n, k, device="cuda").to(dtype)
                     for _ in range(replicas_for(n * k * 2, min_copies=1))]
            for bpw in args.bpw:
                for family in args.kernels:
                    layers, avg_bits = _sfmp_layers(family, k, n, bpw, dtype)
                    for m in args.m:
                        rows.append(dict(dtype=dtype_name, shape=f"{k}->{n}", bpw=bpw,
                                         code_bits=round(avg_bits, 3), m=m, kernels=family,
                                         **_measure(family, k, n, m, dtype, layers, dense,
                                                    bandwidth, args.paths)))
                        print(_row(rows[-1]), flush=True)
                        _save(args, bandwidth, rows)  # a capped run keeps what it measured
                    del layers
                    torch.cuda.empty_cache()
            del dense
            torch.cuda.empty_cache()
    return bandwidth, rows


HEADER = ("| dtype | in->out | BPW | code bits | kernels | M | SFMP us | cuBLAS us | speedup "
          "| floor us | of copy | of read |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    line = (f"| {r['dtype']} | {r['shape']} | {r['bpw']} | {r['code_bits']} | {r['kernels']} | "
            f"{r['m']} | {r['sfmp_us']:.1f} | {r['cublas_us']:.1f} | {r['speedup']:.2f}x | "
            f"{r['floor_us']:.1f} | {r['of_copy']:.2f} | {r['of_read']:.2f} |")
    forced = [f"{name[:-3]} {r[name]:.1f} us" for name in r if name.endswith("_us")
              and name not in ("sfmp_us", "cublas_us", "floor_us")]
    return line + (f" {', '.join(forced)} |" if forced else "")


def _save(args: argparse.Namespace, bandwidth: dict[str, float], rows: list[dict]) -> None:
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                             copy_bandwidth=bandwidth["copy"],
                                             read_bandwidth=bandwidth["read"], rows=rows),
                                        indent=1))


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="lut,mma",
                        type=lambda s: [f for f in s.split(",") if f])
    parser.add_argument("--dtypes", default="float16,bfloat16",
                        type=lambda s: [d for d in s.split(",") if d])
    parser.add_argument("--bpw", default="3.5", type=lambda s: [float(v) for v in s.split(",")])
    parser.add_argument("--m", default="1,16,64,128,2048",
                        type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES),
                        type=_shapes, help="in x out, comma-separated")
    parser.add_argument("--paths", action="store_true",
                        help="also time every path of each family forced, at every M")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        print(f"error: --dtypes {unknown}: expected float16 and/or bfloat16", file=sys.stderr)
        return 2
    bad = [f for f in args.kernels if f not in FAMILIES]
    if bad:
        print(f"error: --kernels {bad}: expected lut and/or mma", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
