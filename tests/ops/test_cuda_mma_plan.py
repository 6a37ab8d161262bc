"""Host-side logic of the tensor-core family on the CPU: planning, launches, backend choice."""

from __future__ import annotations

import math

import pytest
import torch

from sfmp_serve.errors import SFMPError
from sfmp_serve.ops.cuda import mma_plan as P
from sfmp_serve.ops.cuda import sources
from sfmp_serve.ops.cuda.mma_linear import mma_dequant_launch, mma_gather_launch, mma_launch
from sfmp_serve.ops.cuda.mma_repack import WARPS_PER_CTA, repack_mma_linear
from sfmp_serve.ops.runtime import LayerSpec
from tests.ops.cuda_cases import make_layer

LLAMA_8B = [(4096, 4096), (1024, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 16, 17, 33, 64, 65, 128])
@pytest.mark.parametrize("n,k", LLAMA_8B + [(80, 200), (7, 40)])
@pytest.mark.parametrize("sms", [1, 108, 132])
def test_mma_plan_covers_every_row_kblock_and_batch_row(m, n, k, sms):
    tiles, kblocks = math.ceil(n / 16), math.ceil(k / 128)
    plan = P.plan_mma(m, tiles, kblocks, sms)
    assert plan.nb in sources.MMA_BATCH_TILES and plan.zchunks <= P.MMA_MAX_ZCHUNKS
    assert plan.rows >= m > plan.rows - 8 * plan.nb  # no z-chunk without a batch row
    assert plan.row_blocks * WARPS_PER_CTA >= tiles > (plan.row_blocks - 1) * WARPS_PER_CTA
    assert (plan.splits - 1) * plan.kb_per_split < kblocks <= plan.splits * plan.kb_per_split
    assert plan.smem_bytes <= 48 << 10  # no opt-in to more dynamic shared memory needed
    if sms >= 108 and kblocks >= 32:  # big GPUs get at least one block per SM
        assert plan.grid[0] * plan.grid[1] >= sms


def test_mma_plan_refuses_what_one_launch_cannot_hold():
    with pytest.raises(ValueError):
        P.plan_mma(129, 10, 10, 132)
    with pytest.raises(ValueError):
        P.plan_mma(0, 10, 10, 132)


@pytest.mark.parametrize("n,k", LLAMA_8B)
def test_dequant_plan_chunks_fit_half_an_h100_l2(n, k):
    scratch = 25 << 20
    plan = P.plan_mma_dequant(n, math.ceil(n / 16), k, scratch)
    chunks = plan.chunks(math.ceil(n / 16))
    assert chunks[0][0] == 0 and chunks[-1][1] == math.ceil(n / 16)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert plan.whole == (n * k * 2 <= scratch)
    if not plan.whole:
        assert plan.chunk_tiles * 16 * k * 2 <= scratch
        assert plan.chunk_tiles % WARPS_PER_CTA == 0  # chunks of whole thread blocks


def test_launches_match_the_entry_points():
    layer = make_layer(80, 200, (2, 3, 4), torch.bfloat16, bias=True)
    state = repack_mma_linear(layer.packed, layer.config)
    x = torch.zeros(3, 200, dtype=torch.bfloat16)
    y = torch.zeros(3, 80, dtype=torch.bfloat16)
    plan = P.plan_mma(3, state.n_tiles, state.n_kblocks, 132)
    launch = mma_launch(x, state, plan, y, torch.zeros(1))
    launch.check()
    assert launch.kernel == "sfmp_mma_bf16_n1" and launch.smem_bytes == P.mma_smem_bytes(1)
    dplan = P.plan_mma_dequant(80, state.n_tiles, state.padded_cols, 1 << 20)
    mma_dequant_launch(state, dplan, torch.zeros(80, state.padded_cols), 0,
                       state.n_tiles).check()
    mma_gather_launch(x, state, torch.zeros(3, state.padded_cols)).check()
    assert set(sources.mma_kernel_params()).isdisjoint(sources.kernel_params())


def _spec(device_type="cuda", dtype=torch.float16):
    return LayerSpec("l", 64, (32,), 32, 16, (2, 3), dtype, device_type)


def test_mma_backend_is_opt_in_and_names_the_switch(monkeypatch):
    from sfmp_serve.ops import api
    from sfmp_serve.ops.cuda import CudaBackend, CudaMmaBackend
    backends = api.backends_for("cuda")
    assert [type(b) for b in backends][:2] == [CudaMmaBackend, CudaBackend]  # mma asked first
    monkeypatch.delenv("SFMP_CUDA_KERNELS", raising=False)
    ok, why = CudaMmaBackend().can_implement(_spec())
    assert not ok and "SFMP_CUDA_KERNELS=mma" in why
    monkeypatch.setenv("SFMP_CUDA_KERNELS", "mma")
    ok, why = CudaMmaBackend().can_implement(_spec("cpu"))
    assert (ok, why) == (False, "runs on CUDA devices only, not on cpu")
    if not torch.cuda.is_available():
        assert CudaMmaBackend().can_implement(_spec()) == (
            False, "no CUDA device is visible to torch")
    monkeypatch.setenv("SFMP_CUDA_KERNELS", "tensorcores")
    with pytest.raises(SFMPError, match="SFMP_CUDA_KERNELS"):
        CudaMmaBackend().can_implement(_spec())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_path_of_mma_linear_on_the_model_runner(dtype):
    # The host side of mma_linear.py end to end, kernels executed by the numpy model: 128-row
    # slices, z-chunks, splits, the prefill gather, whole and chunked dequant, y's gather, bias.
    from sfmp_serve.ops.cuda.mma_linear import mma_dequant_matmul, mma_gemm, mma_linear
    from sfmp_serve.ops.cuda.mma_model import ModelRunner
    from tests.ops.cuda_cases import TOLERANCE, nan_like, random_x, rel_err
    layer = make_layer(100, 300, (2, 3, 8), dtype, group_size=128, block_rows=40, bias=True)
    state = repack_mma_linear(layer.packed, layer.config)
    x = random_x(300, 300, dtype)
    runner = ModelRunner(multiprocessors=8)
    paths = {"dispatch": lambda x, s, y, r: mma_linear(x, s, r, out=y), "mma": mma_gemm,
             "dequant-whole": mma_dequant_matmul,
             "dequant-chunked": lambda x, s, y, r: mma_dequant_matmul(x, s, y, r, 64 * 384 * 2)}
    for name, path in paths.items():
        for m in (1, 9, 65, 129, 300):
            y = nan_like((m, 100), dtype)
            path(x[:m], state, y, runner)
            assert not torch.isnan(y).any(), f"{name} M={m}: outputs left unwritten"
            assert rel_err(y, layer.reference(x[:m])) < TOLERANCE[dtype], f"{name} M={m}"
    tag = "f16" if dtype == torch.float16 else "bf16"
    assert {launch.kernel for launch in runner.launches} == {
        f"sfmp_mma_{tag}_n1", f"sfmp_mma_{tag}_n2", f"sfmp_mma_{tag}_n8",
        f"sfmp_mma_dequant_{tag}", f"sfmp_mma_gather_{tag}"}
    assert any(launch.grid[1] > 1 for launch in runner.launches)  # split-K was planned
