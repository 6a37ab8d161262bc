"""y = x @ W^T (+ bias) on CUDA with the tensor-core family, from a prepared MmaLinear.

- M <= MMA_MAX_M: the mma kernel (gather of x, decode, mma, split-K reduction by the last block
  of each row block, scatter and bias): one launch, plus its fp32 partials when split.
- M > MMA_MAX_M: x through kidx into the padded input order (one gather launch), then per chunk
  of rows a dequantize launch from the same words into a scratch of about half the L2 cache and
  one cuBLAS matmul; a chunked weight writes y in the padded row order and one index_select
  takes it to the original order. A weight that fits the scratch is written in the original
  row order and one addmm writes y and the bias.
Every buffer is allocated by torch on the current stream and the kernels are loaded at prepare
time, so the whole call can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

import torch

from sfmp_serve.ops.cuda import sources
from sfmp_serve.ops.cuda.launch import KernelRunner, Launch
from sfmp_serve.ops.cuda.mma_plan import (GATHER_THREADS, MMA_MAX_M, MMA_MAX_ZCHUNKS,
                                          MMA_THREADS, MmaDequantPlan, MmaPlan, plan_mma,
                                          plan_mma_dequant)
from sfmp_serve.ops.cuda.mma_repack import MmaLinear, TILE_ROWS

SCRATCH_ENV = "SFMP_MMA_SCRATCH_MB"  # overrides the prefill scratch (default: half the L2)
DEFAULT_L2_BYTES = 50 << 20  # H100's, when the device does not say


def scratch_bytes_for(device: torch.device) -> int:
    """Prefill scratch budget: half the L2 cache, so a chunk is still there for cuBLAS."""
    override = os.environ.get(SCRATCH_ENV)
    if override:
        return int(float(override) * (1 << 20))
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    return l2 // 2


def mma_launch(x: torch.Tensor, state: MmaLinear, plan: MmaPlan, y: torch.Tensor,
               partial: torch.Tensor | None) -> Launch:
    args = (x, state.kidx, state.qweight, state.tile_meta, state.kb_info, state.scales,
            state.out_row, state.bias, partial, state.counters, y, x.shape[0], x.stride(0),
            y.stride(0), state.n_tiles, state.n_kblocks, plan.kb_per_split, plan.zchunks)
    return Launch(sources.mma_kernel(state.dtype, plan.nb), plan.grid, (MMA_THREADS, 1),
                  plan.smem_bytes, args)


def mma_dequant_launch(state: MmaLinear, plan: MmaDequantPlan, w: torch.Tensor, tile_begin: int,
                       tile_end: int) -> Launch:
    args = (state.qweight, state.tile_meta, state.kb_info, state.scales,
            state.out_row if plan.whole else None, w, w.stride(0), tile_begin, tile_end,
            state.n_kblocks, plan.kb_per_block)
    return Launch(sources.mma_dequant_kernel(state.dtype),
                  plan.grid(tile_end - tile_begin, state.n_kblocks), (MMA_THREADS, 1), 0, args)


def mma_gather_launch(x: torch.Tensor, state: MmaLinear, xr: torch.Tensor) -> Launch:
    total = x.shape[0] * state.padded_cols
    args = (x, state.kidx, xr, x.shape[0], x.stride(0), state.padded_cols)
    return Launch(sources.mma_gather_kernel(state.dtype), (-(-total // GATHER_THREADS), 1, 1),
                  (GATHER_THREADS, 1), 0, args)


def mma_linear(x: torch.Tensor, state: MmaLinear, runner: KernelRunner | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] in state.dtype -> y [..., out_features]; `out` as in cuda_linear."""
    if x.shape[-1] != state.in_features or x.dtype != state.dtype:
        raise ValueError(f"mma_linear: x is {tuple(x.shape)} {x.dtype}, the layer takes "
                         f"[..., {state.in_features}] {state.dtype}")
    lead = x.shape[:-1]
    if out is not None and (out.shape != (*lead, state.out_features) or out.dtype != x.dtype
                            or not out.is_contiguous()):
        raise ValueError(f"mma_linear: out is {tuple(out.shape)} {out.dtype}, expected a "
                         f"contiguous {(*lead, state.out_features)} {x.dtype} tensor")
    if runner is None:
        from sfmp_serve.ops.cuda.runtime import runner_for
        runner = runner_for(x.device)
    x2 = x.reshape(-1, state.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = (out.view(m, state.out_features) if out is not None else
         torch.empty(m, state.out_features, dtype=state.dtype, device=x.device))
    if m == 0:
        return y.view(*lead, state.out_features)
    if m <= MMA_MAX_M:
        mma_gemm(x2, state, y, runner)
    else:
        mma_dequant_matmul(x2, state, y, runner)
    return y.view(*lead, state.out_features)


def mma_gemm(x: torch.Tensor, state: MmaLinear, y: torch.Tensor, runner: KernelRunner) -> None:
    """The tensor-core path for any M (slices of 128 rows): x [M, K] with unit stride along K,
    y [M, N] row-major with unit stride along N. Public for tests and benchmarks."""
    rows = MMA_MAX_ZCHUNKS * 64
    for m0 in range(0, x.shape[0], rows):
        xs, ys = x[m0:m0 + rows], y[m0:m0 + rows]
        plan = plan_mma(xs.shape[0], state.n_tiles, state.n_kblocks, runner.multiprocessors)
        partial = None
        if plan.splits > 1:
            partial = torch.empty(plan.splits, plan.grid[0], 4 * TILE_ROWS, 8 * plan.nb,
                                  dtype=torch.float32, device=x.device)
        runner.launch(mma_launch(xs, state, plan, ys, partial))


def mma_dequant_matmul(x: torch.Tensor, state: MmaLinear, y: torch.Tensor, runner: KernelRunner,
                       scratch_bytes: int | None = None) -> None:
    """The prefill path for any M (same arguments as mma_gemm; y contiguous)."""
    if scratch_bytes is None:
        scratch_bytes = (scratch_bytes_for(x.device) if x.device.type == "cuda"
                         else DEFAULT_L2_BYTES // 2)
    plan = plan_mma_dequant(state.out_features, state.n_tiles, state.padded_cols, scratch_bytes)
    m = x.shape[0]
    xr = torch.empty(m, state.padded_cols, dtype=state.dtype, device=x.device)
    runner.launch(mma_gather_launch(x, state, xr))
    if plan.whole:  # rows land in the original output order: the matmul writes y
        w = torch.empty(state.out_features, state.padded_cols, dtype=state.dtype,
                        device=x.device)
        runner.launch(mma_dequant_launch(state, plan, w, 0, state.n_tiles))
        if state.bias is not None:
            torch.addmm(state.bias, xr, w.t(), out=y)
        else:
            torch.mm(xr, w.t(), out=y)
        return
    w = torch.empty(plan.chunk_tiles * TILE_ROWS, state.padded_cols, dtype=state.dtype,
                    device=x.device)
    y_pad = torch.empty(m, state.padded_rows, dtype=state.dtype, device=x.device)
    for t0, t1 in plan.chunks(state.n_tiles):
        runner.launch(mma_dequant_launch(state, plan, w, t0, t1))
        rows = (t1 - t0) * TILE_ROWS
        # y_pad[:, rows of the chunk] has a leading dimension of padded_rows: cuBLAS writes it
        torch.mm(xr, w[:rows].t(), out=y_pad[:, t0 * TILE_ROWS:t1 * TILE_ROWS])
    torch.index_select(y_pad, 1, state.gather_index, out=y)
    if state.bias is not None:
        y.add_(state.bias)
