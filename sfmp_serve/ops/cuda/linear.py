"""y = x @ W^T (+ bias) on CUDA from a prepared CudaLinear, dispatching on the batch size.

- M <= LUT_MAX_M: the LUT kernel (gather, LUT GEMM, scatter and bias in one launch), plus a
  fixed-order split-K finish launch when the groups are split across blocks.
- M > LUT_MAX_M: x[:, input_perm] once (torch), then a dequantize launch into a scratch matrix
  and one cuBLAS matmul. When the whole weight fits the scratch (plan.py), its rows are written
  in the original output order and one addmm writes y and the bias. Otherwise, per chunk of
  rows, a dequantize launch and a matmul writing its columns of y_reordered; finally
  y = y_reordered[:, output_index] (+ bias). Only one chunk of dequantized rows exists at a time.
Every output buffer is allocated by torch on the current stream, so the whole call can be
captured in a CUDA graph (the kernels are compiled at load, never during capture).
"""

from __future__ import annotations

import torch

from sfmp_serve.ops.cuda.launch import (KernelRunner, dequant_launch, finish_launch,
                                        lut_launch)
from sfmp_serve.ops.cuda.plan import DEQUANT_SCRATCH_BYTES, LUT_MAX_M, plan_dequant, plan_lut
from sfmp_serve.ops.cuda.repack import CudaLinear


def cuda_linear(x: torch.Tensor, state: CudaLinear, runner: KernelRunner | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] in state.dtype -> y [..., out_features] in state.dtype.

    `out`, if given, is a contiguous [..., out_features] tensor that receives y (every element
    is written); `runner` defaults to the CuPy runner of x's device."""
    if x.shape[-1] != state.in_features or x.dtype != state.dtype:
        raise ValueError(f"cuda_linear: x is {tuple(x.shape)} {x.dtype}, the layer takes "
                         f"[..., {state.in_features}] {state.dtype}")
    lead = x.shape[:-1]
    if out is not None and (out.shape != (*lead, state.out_features) or out.dtype != x.dtype
                            or not out.is_contiguous()):
        raise ValueError(f"cuda_linear: out is {tuple(out.shape)} {out.dtype}, expected a "
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
    if m <= LUT_MAX_M:
        lut_gemm(x2, state, y, runner)
    else:
        dequant_matmul(x2, state, y, runner)
    return y.view(*lead, state.out_features)


def lut_gemm(x: torch.Tensor, state: CudaLinear, y: torch.Tensor,
             runner: KernelRunner) -> None:
    """The small-batch path for any M: x [M, K] (unit stride along K) -> y [M, N] (row-major,
    unit stride along N). cuda_linear picks it for M <= LUT_MAX_M; public for benchmarks."""
    plan = plan_lut(x.shape[0], state.out_features, state.n_groups, runner.multiprocessors)
    partial = None
    if plan.splits > 1:
        partial = torch.empty(plan.splits, x.shape[0], state.out_features,
                              dtype=torch.float32, device=x.device)
    runner.launch(lut_launch(x, state, plan, y, partial))
    if partial is not None:
        runner.launch(finish_launch(partial, state, y))


def dequant_matmul(x: torch.Tensor, state: CudaLinear, y: torch.Tensor,
                   runner: KernelRunner, scratch_bytes: int = DEQUANT_SCRATCH_BYTES) -> None:
    """The large-batch path for any M (same arguments as lut_gemm; y contiguous)."""
    plan = plan_dequant(state.out_features, state.in_features, state.group_size,
                        y.element_size(), scratch_bytes)
    x_r = x.index_select(1, state.input_index)
    scratch = torch.empty(plan.chunk_rows, state.in_features, dtype=state.dtype,
                          device=x.device)
    if plan.whole:  # rows land in the original output order: the matmul writes y
        runner.launch(dequant_launch(state, plan, scratch, 0, state.out_features))
        if state.bias is not None:
            torch.addmm(state.bias, x_r, scratch.t(), out=y)
        else:
            torch.mm(x_r, scratch.t(), out=y)
        return
    y_r = torch.empty_like(y)
    for begin, end in plan.chunks(state.out_features):
        runner.launch(dequant_launch(state, plan, scratch, begin, end))
        # y_r[:, begin:end] has a leading dimension of N: cuBLAS writes it in place.
        torch.mm(x_r, scratch[:end - begin].t(), out=y_r[:, begin:end])
    torch.index_select(y_r, 1, state.output_index, out=y)
    if state.bias is not None:
        y.add_(state.bias)
