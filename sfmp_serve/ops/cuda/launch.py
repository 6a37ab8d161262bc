"""Kernel launches as data: which entry point, grid, block, shared memory and arguments.

Building a launch is pure host logic, shared by the GPU runner (runtime.py, CuPy) and the host
emulator (emulator.py), so the CPU tests exercise exactly the launches the GPU would get.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sfmp_serve.ops.cuda import sources
from sfmp_serve.ops.cuda.plan import FINISH_THREADS, DequantPlan, LutPlan
from sfmp_serve.ops.cuda.repack import CudaLinear

Arg = torch.Tensor | int | None  # tensor (or None = null pointer) for "p", int for "i"


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int]
    smem_bytes: int
    args: tuple[Arg, ...]

    def check(self) -> None:
        """Arguments against the entry point's parameter list (kinds and count)."""
        params = sources.all_kernel_params()[self.kernel]
        if len(params) != len(self.args):
            raise ValueError(f"{self.kernel}: {len(self.args)} arguments for {len(params)} "
                             "parameters")
        for (name, kind), value in zip(params, self.args):
            ok = (value is None or isinstance(value, torch.Tensor)) if kind == "p" else (
                isinstance(value, int) and -2**31 <= value < 2**31)
            if not ok:
                raise ValueError(f"{self.kernel}: parameter {name} ({kind}) got {value!r}")


class KernelRunner(Protocol):
    """Executes launches: on the GPU (runtime.CupyRunner) or on the host (emulator)."""

    multiprocessors: int

    def launch(self, launch: Launch) -> None:
        ...


def lut_launch(x: torch.Tensor, state: CudaLinear, plan: LutPlan, y: torch.Tensor,
               partial: torch.Tensor | None) -> Launch:
    """x [M, K] (unit stride along K), y [M, N] original order; partial [splits, M, N] fp32
    when plan.splits > 1 (then y is written by the finish launch instead)."""
    m = x.shape[0]
    args = (x, state.input_perm, state.qweight, state.meta, state.row_info, state.scales,
            state.output_perm, state.bias, partial, y, m, state.out_features,
            state.in_features, x.stride(0), y.stride(0), state.group_size, state.n_groups,
            plan.groups_per_split)
    return Launch(sources.lut_kernel(state.dtype, plan.batch_tile), plan.grid,
                  (plan.threads, 1), plan.smem_bytes, args)


def finish_launch(partial: torch.Tensor, state: CudaLinear, y: torch.Tensor) -> Launch:
    splits, m, n = partial.shape
    blocks = -(-(m * n) // FINISH_THREADS)
    args = (partial, state.output_perm, state.bias, y, m, n, y.stride(0), splits)
    return Launch(sources.finish_kernel(state.dtype), (blocks, 1, 1), (FINISH_THREADS, 1), 0,
                  args)


def dequant_launch(state: CudaLinear, plan: DequantPlan, w: torch.Tensor, row_begin: int,
                   row_end: int) -> Launch:
    """Rows [row_begin, row_end) of the reordered weight into w: at w[output_perm[row]] when
    plan.whole (w then holds the weight in the original output order), else at
    w[row - row_begin]."""
    args = (state.qweight, state.meta, state.row_info, state.scales,
            state.output_perm if plan.whole else None, w, row_begin, row_end,
            state.out_features, state.in_features, w.stride(0), state.group_size,
            state.n_groups, plan.groups_per_block)
    return Launch(sources.dequant_kernel(state.dtype), plan.grid(row_end - row_begin,
                                                                 state.n_groups),
                  plan.threads, plan.smem_bytes, args)
