"""The SFMP op on the CPU against a dense bf16 matmul, side by side, on real model shapes.

    .venv/bin/python bench/cpu_op.py [--threads 1,2] [--m 1,2,4,8,16,64,256,2048] \\
        [--shapes smollm2,llama8b] [--repeats 3] [--json bench/results/cpu_op.json]

Random SFMP layers at 3.5 bits per weight (3.25 average code bits: a quarter of the blocks
4-bit, the rest 3-bit; bf16 alpha/beta per 512 x 128 block row-group), bf16 activations. Each
measurement interleaves the two ops call by call over copies of the weights that together
exceed the caches (--working-set-mib), so both stream from memory as in a real decode step,
and takes the median of many calls; the whole sweep is repeated and the median of the repeats
reported (min..max beside it). The machine's single-pass read bandwidth is measured in the
same run, and the load average is printed: the numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests/

from sfmp_serve.bitplanes import bcq_scales, pack_linear  # noqa: E402
from sfmp_serve.format import LayerGeometry, PackedLinear  # noqa: E402
from sfmp_serve.ops import cpu_native  # noqa: E402
from sfmp_serve.ops.runtime import fuse_shards  # noqa: E402
from tests.serving.packed import sfmp_config  # noqa: E402

# (in_features, out_features) of the linears (vLLM fuses q/k/v and gate/up into one call).
SHAPES = {
    "smollm2": [(576, 960), (576, 576), (576, 3072), (1536, 576)],  # qkv, o, gate_up, down
    "llama8b": [(4096, 4096), (4096, 14336), (14336, 4096)],
}


def random_layer(out_features: int, in_features: int, code_bits: float,
                 gen: torch.Generator) -> PackedLinear:
    """An SFMP layer whose blocks are floor/ceil(code_bits) bits, in the right proportion."""
    config = sfmp_config(group_size=128, block_rows=512, bit_choices=(3, 4),
                         act_dtype="bfloat16")
    geo = LayerGeometry(out_features, in_features, 128, 512)
    n_blocks = geo.n_block_rows * geo.n_groups
    high = round((code_bits - 3) * n_blocks)
    bits = torch.full((n_blocks,), 3, dtype=torch.uint8)
    bits[torch.randperm(n_blocks, generator=gen)[:high]] = 4
    block_bits = bits.view(geo.n_block_rows, geo.n_groups)
    row_bits = block_bits.to(torch.int64).repeat_interleave(geo.rows(), 0)
    col_group = torch.arange(geo.n_groups).repeat_interleave(geo.cols())
    levels = 2 ** row_bits[:, col_group] - 1
    codes = (torch.rand(out_features, in_features, generator=gen) * (levels + 1)).floor()
    qweight, offsets = pack_linear(codes.clamp(max=levels).to(torch.uint8), block_bits, geo)
    scale = torch.rand(out_features, geo.n_groups, generator=gen) * 0.02 + 0.005
    zero = (torch.rand(out_features, geo.n_groups, generator=gen) * (2 ** row_bits - 1)).round()
    alpha, beta = bcq_scales(scale, zero, row_bits)
    packed = PackedLinear(qweight, alpha.bfloat16(), beta.bfloat16(), block_bits, offsets,
                          torch.randperm(in_features, generator=gen).to(torch.int32),
                          torch.randperm(out_features, generator=gen).to(torch.int32))
    packed.validate("bench", config)
    return packed, config


def read_bandwidth_gbs(mib: int = 1024, reps: int = 7) -> float:
    """Single-pass read bandwidth (GB/s): median time of summing a buffer far beyond the caches."""
    data = torch.ones(mib << 18, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def interleaved(fns: dict, calls: int) -> dict[str, float]:
    """Median seconds per call of each fn, called in turn (so all see the same machine state)."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up (first-use allocations)
    for _ in range(calls):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def rotating(fn, items):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(items)
        return fn(items[state["i"]])
    return call


def measure_shape(in_f: int, out_f: int, ms: list[int], args, gen) -> list[dict]:
    packed, config = random_layer(out_f, in_f, args.code_bits, gen)
    fused = fuse_shards("bench", ("bench",), (packed,), config, torch.bfloat16, "cpu")
    working_set = args.working_set_mib << 20
    first = cpu_native.prepare(fused)
    sfmp = [first] + [cpu_native.prepare(fused)
                      for _ in range(max(1, working_set // first.nbytes) - 1)]
    dense = [torch.randn(out_f, in_f, generator=gen).bfloat16()
             for _ in range(max(1, working_set // (out_f * in_f * 2)))]
    rows = []
    for m in ms:
        x = torch.randn(m, in_f, generator=gen).bfloat16()
        calls = args.calls if m <= 64 else max(5, args.calls // 8)
        t = interleaved({"sfmp": rotating(lambda s: cpu_native.apply(x, s), sfmp),
                         "dense": rotating(lambda w: torch.nn.functional.linear(x, w), dense)},
                        calls)
        rows.append({"in": in_f, "out": out_f, "m": m, "sfmp_us": t["sfmp"] * 1e6,
                     "dense_us": t["dense"] * 1e6, "sfmp_bytes": first.nbytes,
                     "dense_bytes": out_f * in_f * 2})
    return rows


def summarize(runs: list[list[dict]], bandwidth: float) -> list[dict]:
    """Median over repeats of each (shape, M), with the spread of the speedup."""
    out = []
    for cells in zip(*runs):
        speedups = [c["dense_us"] / c["sfmp_us"] for c in cells]
        row = dict(cells[0])
        row["sfmp_us"] = statistics.median(c["sfmp_us"] for c in cells)
        row["dense_us"] = statistics.median(c["dense_us"] for c in cells)
        row["speedup"] = statistics.median(speedups)
        row["speedup_min"], row["speedup_max"] = min(speedups), max(speedups)
        row["sfmp_gbs"] = row["sfmp_bytes"] / row["sfmp_us"] / 1e3
        row["sfmp_of_read_bw"] = row["sfmp_gbs"] / bandwidth
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1", help="comma-separated torch thread counts")
    parser.add_argument("--m", default="1,2,4,8,16,32,64,128,256,2048")
    parser.add_argument("--shapes", default="smollm2,llama8b")
    parser.add_argument("--code-bits", type=float, default=3.25,
                        help="average code bits (3.25 + bf16 scales = 3.5 bits per weight)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=40, help="calls per op and measurement")
    parser.add_argument("--working-set-mib", type=int, default=1024,
                        help="weights rotated through per op, beyond the caches")
    parser.add_argument("--isa", default=None, help="force one kernel ISA (default: the best)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    kernels = cpu_native.kernels()
    if args.isa:
        kernels.set_isa(args.isa)
    ms = [int(v) for v in args.m.split(",")]
    shapes = [s for name in args.shapes.split(",") for s in SHAPES[name]]
    report = {"isa": kernels.get_isa(), "load_before": os.getloadavg(), "results": {}}
    for threads in (int(v) for v in args.threads.split(",")):
        torch.set_num_threads(threads)
        bandwidth = read_bandwidth_gbs()
        gen = torch.Generator().manual_seed(0)
        runs = [[row for in_f, out_f in shapes for row in measure_shape(in_f, out_f, ms, args, gen)]
                for _ in range(args.repeats)]
        rows = summarize(runs, bandwidth)
        report["results"][threads] = {"read_bw_gbs": bandwidth, "rows": rows}
        print(f"\nthreads={threads} isa={kernels.get_isa()} read bandwidth {bandwidth:.1f} GB/s "
              f"load average {os.getloadavg()[0]:.2f}\n")
        print("| in->out | M | SFMP us | dense bf16 us | speedup (min..max) | SFMP GB/s | of read BW |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['in']}->{r['out']} | {r['m']} | {r['sfmp_us']:.0f} | {r['dense_us']:.0f} "
                  f"| {r['speedup']:.2f}x ({r['speedup_min']:.2f}..{r['speedup_max']:.2f}) | "
                  f"{r['sfmp_gbs']:.1f} | {r['sfmp_of_read_bw']:.0%} |", flush=True)
    report["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
