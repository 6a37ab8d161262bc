"""Shared by the GPU benchmarks (bench/kernels.py, bench/decode.py): random SFMP layers whose block
bits are allocated like the offline pipeline, CUDA-graph timing, and the copy-bandwidth floor.

Weights are random: kernel speed does not depend on their values, and the model hub is not
reachable. Bits come from offline.allocation.allocate (the pipeline's search-free allocator)
fed random block importances, so the bit mix per BPW is the one the pipeline would choose.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Mapping

import torch

from offline.allocation import allocate, block_sizes, default_choices
from sfmp_serve.format import LayerGeometry, PackedLinear, SFMPConfig

GROUP_SIZE = 128  # the reference's block shape
BLOCK_ROWS = 512
ACT_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def code_bits(bpw: float, group_size: int = GROUP_SIZE) -> float:
    """Average code bits for a bits-per-weight figure: fp16 alpha + beta per group cost
    32 / group_size bits (0.25 at 128), as in the reference's naming (w3.25 = 3.5 BPW)."""
    return bpw - 32 / group_size


def allocate_bits(geometries: Mapping[str, LayerGeometry], bpw: float,
                  seed: int = 0) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """Block bits for every layer from one global ranking of random (log-normal) importances."""
    gen = torch.Generator().manual_seed(seed)
    target = code_bits(bpw)
    choices = default_choices(target, 3)
    importance = {name: torch.randn(g.n_block_rows, g.n_groups, generator=gen,
                                    dtype=torch.float64).exp()
                  for name, g in geometries.items()}
    sizes = {name: block_sizes(g) for name, g in geometries.items()}
    alloc = allocate(importance, sizes, target, choices, warn=False)
    return alloc.block_bits, choices


def sfmp_config(choices: tuple[int, ...], dtype: torch.dtype,
                modules: tuple[str, ...] = ("layer",)) -> SFMPConfig:
    return SFMPConfig(group_size=GROUP_SIZE, block_rows=BLOCK_ROWS, bit_choices=choices,
                      avg_bits=float(sum(choices)) / len(choices), bits_per_weight=0.0,
                      act_dtype=ACT_NAMES[dtype], quantized_modules=modules, input_groups=())


def random_packed(geo: LayerGeometry, block_bits: torch.Tensor, dtype: torch.dtype,
                  device: torch.device | str, seed: int = 0,
                  input_perm: torch.Tensor | None = None) -> PackedLinear:
    """A valid PackedLinear with random plane words, generated on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    offsets, total = geo.offsets(block_bits)
    qweight = torch.randint(-2**31, 2**31, (total,), generator=gen, dtype=torch.int64,
                            device=device).to(torch.int32)
    # |w| stays small: a 32-layer random model must not overflow fp16.
    alpha = (torch.rand(geo.out_features, geo.n_groups, generator=gen, device=device)
             * 2e-3 + 1e-4).to(dtype)
    beta = (torch.randn(geo.out_features, geo.n_groups, generator=gen, device=device)
            * 1e-3).to(dtype)
    cpu = torch.Generator().manual_seed(seed)
    if input_perm is None:
        input_perm = torch.randperm(geo.in_features, generator=cpu)
    return PackedLinear(qweight=qweight, alpha=alpha, beta=beta, block_bits=block_bits,
                        block_offsets=offsets.to(torch.int32),
                        input_perm=input_perm.to(torch.int32),
                        output_perm=torch.randperm(geo.out_features, generator=cpu).to(
                            torch.int32))


def replicas_for(bytes_per_copy: int, min_copies: int = 2) -> int:
    """Copies of a weight to rotate through so that together they exceed twice the L2 cache:
    every call then reads its weight from DRAM, as in a real model."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(min_copies, math.ceil(2 * l2 / max(bytes_per_copy, 1)))


def time_calls(calls: list[Callable[[], object]], replays: int = 20,
               warmup: int = 3) -> float:
    """Median microseconds per call: `calls` captured once in a CUDA graph, replayed `replays`
    times, each replay timed with CUDA events (no Python launch overhead in the numbers)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, replays: int = 10) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_calls([lambda: dst.copy_(src)], replays=replays)
    return 2 * nbytes / (us * 1e-6)


def random_mma(geo: LayerGeometry, block_bits: torch.Tensor, dtype: torch.dtype,
               device: torch.device | str, seed: int = 0):
    """A valid MmaLinear (the tensor-core layout) with random words, built on `device`.

    What mma_repack.repack_mma would produce from a random checkpoint, without its CPU work:
    the words are random anyway, and a 32-layer model at 8B shapes repacks in minutes."""
    from sfmp_serve.ops.cuda.mma_repack import LANES, TILE_ROWS, WARPS_PER_CTA, MmaLinear, k_space
    ks = k_space(geo.in_features, geo.group_size)
    rows = geo.rows().tolist()
    tiles_per_block = [math.ceil(r / TILE_ROWS) for r in rows]
    tile_block = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(tiles_per_block))
    tile_bits = block_bits.to(torch.int64)[tile_block][:, torch.from_numpy(ks.kb_info[:, 2])]
    chunks = torch.from_numpy(ks.kb_info[:, 1])
    sizes = (tile_bits * LANES * chunks[None, :]).flatten()
    offsets = (torch.cumsum(sizes, 0) - sizes).view(tile_bits.shape)
    padded_of_row = torch.cat([start * TILE_ROWS + torch.arange(r) for start, r in
                               zip([0] + list(torch.cumsum(torch.tensor(tiles_per_block), 0)[:-1]),
                                   rows)])
    n_pad = sum(tiles_per_block) * TILE_ROWS
    cpu = torch.Generator().manual_seed(seed)
    perm_out = torch.randperm(geo.out_features, generator=cpu)
    out_row = torch.full((n_pad,), -1, dtype=torch.int64)
    out_row[padded_of_row[perm_out]] = torch.arange(geo.out_features)
    kidx = torch.full((ks.padded_cols,), -1, dtype=torch.int64)
    kidx[torch.from_numpy(ks.col_to_kp)] = torch.randperm(geo.in_features, generator=cpu)
    gen = torch.Generator(device=device).manual_seed(seed)
    n_tiles, n_kb = tile_bits.shape
    scales = torch.rand(n_tiles, n_kb, 8, 2, 2, generator=gen, device=device) * 2e-3
    scales[..., 1] -= 1e-3  # |w| small and centred: 32 random layers must not overflow fp16
    qweight = torch.randint(-2**31, 2**31, (int(sizes.sum()),), generator=gen,
                            dtype=torch.int64, device=device).to(torch.int32)
    row_blocks = math.ceil(n_tiles / WARPS_PER_CTA)
    return MmaLinear(
        qweight=qweight, tile_meta=torch.stack([offsets, tile_bits], -1).to(device, torch.int32),
        kb_info=torch.from_numpy(ks.kb_info).to(device, torch.int32),
        kidx=kidx.to(device, torch.int32), scales=scales.to(dtype),
        out_row=out_row.to(device, torch.int32),
        gather_index=padded_of_row[perm_out].to(device),
        counters=torch.zeros(2 * row_blocks, dtype=torch.int32, device=device), bias=None,
        out_features=geo.out_features, in_features=geo.in_features,
        group_size=geo.group_size, dtype=dtype)


def read_bandwidth(nbytes: int = 1 << 30, replays: int = 10) -> float:
    """Measured device read bandwidth in bytes/s: a sum over a buffer far beyond the L2."""
    src = torch.ones(nbytes // 4, dtype=torch.int32, device="cuda")
    out = torch.empty((), dtype=torch.int64, device="cuda")
    us = time_calls([lambda: torch.sum(src, out=out)], replays=replays)
    return nbytes / (us * 1e-6)
