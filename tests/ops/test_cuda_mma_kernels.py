"""The tensor-core kernels (mma_kernels.cu) on a GPU against the reference op.

Skipped without a GPU or CuPy. Fresh random layers; every bit mix of {2, 3, 4} and the other
widths; ragged rows, inputs, groups (not whole k16 steps) and block-rows (not whole tiles);
M in {1, 2, 3, 8, 16, 33, 64, 128, 2048} (the mma kernel up to 128, dequant + cuBLAS above);
fp16 and bf16; fused shards through the op with SFMP_CUDA_KERNELS=mma; split-K and direct
stores; CUDA-graph capture and replay; determinism. Outputs start as NaN, so anything left
unwritten fails. Run: scripts/gpu_check.sh (or pytest -m gpu tests/ops/test_cuda_mma_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

from sfmp_serve.ops.cuda.mma_linear import mma_dequant_matmul, mma_gemm, mma_linear
from sfmp_serve.ops.cuda.mma_plan import plan_mma
from sfmp_serve.ops.cuda.mma_repack import repack_mma_linear
from sfmp_serve.ops.cuda.runtime import runner_for
from tests.ops.cuda_cases import (BIT_MIXES, TOLERANCE, make_layer, nan_like, random_x,
                                  rel_err)

pytestmark = pytest.mark.gpu
pytest.importorskip("cupy")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

DTYPES = (torch.float16, torch.bfloat16)
MS = (1, 2, 3, 8, 16, 33, 64, 128, 2048)
# (out, in, group_size, block_rows): tiny ragged; groups of 40 and 24-row blocks; the reference
# block shape with ragged edges; 256-input groups
SHAPES = ((80, 200, 32, 16), (50, 130, 40, 24), (1000, 1100, 128, 512), (100, 520, 256, 32))


@pytest.fixture(scope="module")
def runner():
    r = runner_for("cuda")
    r.load_mma()
    return r


def _layer_on_gpu(n, k, bits, dtype, gs, br, seed=0, bias=False):
    layer = make_layer(n, k, bits, dtype, group_size=gs, block_rows=br, seed=seed, bias=bias)
    return layer, repack_mma_linear(layer.packed, layer.config, device="cuda")


def _check(y, layer, x, dtype, what):
    torch.cuda.synchronize()
    assert not torch.isnan(y).any(), f"{what}: outputs left unwritten"
    err = rel_err(y, layer.reference(x))
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BIT_MIXES + ((1, 8), (5, 6, 7)))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_reference(runner, shape, bits, dtype):
    n, k, gs, br = shape
    layer, state = _layer_on_gpu(n, k, bits, dtype, gs, br, seed=sum(bits), bias=n > 60)
    x = random_x(max(MS), k, dtype, seed=11, device="cuda")
    for m in MS:
        out = nan_like((m, n), dtype, device="cuda")
        y = mma_linear(x[:m], state, runner, out=out)
        assert y.data_ptr() == out.data_ptr()
        _check(y, layer, x[:m], dtype, f"M={m}")
    assert not state.counters.any(), "split-K tickets must be zero after every launch"


@pytest.mark.parametrize("dtype", DTYPES)
def test_both_paths_at_every_batch_size(runner, dtype):
    # mma_linear picks one path per M; each must be right at any M (the threshold is tuned).
    layer, state = _layer_on_gpu(600, 300, (2, 3, 4), dtype, 128, 512, seed=7, bias=True)
    x = random_x(300, 300, dtype, seed=5, device="cuda")
    paths = {"mma": mma_gemm, "dequant-whole": mma_dequant_matmul,
             "dequant-chunked": lambda x, s, y, r: mma_dequant_matmul(x, s, y, r, 64 * 384 * 2)}
    for name, path in paths.items():
        for m in (1, 3, 8, 16, 33, 64, 65, 128, 129, 300):
            y = nan_like((m, 600), dtype, device="cuda")
            path(x[:m], state, y, runner)
            _check(y, layer, x[:m], dtype, f"{name} M={m}")


@pytest.mark.parametrize("sms", [1, None])
def test_split_k_and_direct_store_agree_with_the_reference(runner, sms):
    layer, state = _layer_on_gpu(1000, 1100, (2, 3, 4), torch.float16, 128, 512, seed=4,
                                 bias=True)
    real = runner.multiprocessors
    runner.multiprocessors = sms or real
    try:
        for m in (1, 16, 64, 128):
            splits = plan_mma(m, state.n_tiles, state.n_kblocks, runner.multiprocessors).splits
            assert (splits == 1) == (sms == 1)
            x = random_x(m, 1100, torch.float16, seed=m, device="cuda")
            y = nan_like((m, 1000), torch.float16, device="cuda")
            mma_gemm(x, state, y, runner)
            _check(y, layer, x, torch.float16, f"M={m} splits={splits}")
            assert not state.counters.any()
    finally:
        runner.multiprocessors = real


@pytest.mark.parametrize("n,k,dtype", [(4096, 4096, torch.float16), (4096, 4096, torch.bfloat16),
                                       (6144, 4096, torch.bfloat16),
                                       (4096, 14336, torch.float16)])
def test_llama_8b_shapes(runner, n, k, dtype):
    layer, state = _layer_on_gpu(n, k, (2, 3, 4), dtype, 128, 512)
    x = random_x(2048, k, dtype, seed=2, device="cuda")
    for m in (1, 16, 64, 128, 2048):
        _check(mma_linear(x[:m], state, runner), layer, x[:m], dtype, f"M={m}")


def test_results_are_deterministic(runner):
    layer, state = _layer_on_gpu(1000, 1100, (2, 3, 4), torch.bfloat16, 128, 512)
    for m in (1, 16, 64, 128):
        x = random_x(m, 1100, torch.bfloat16, device="cuda")
        first = mma_linear(x, state, runner)
        for _ in range(3):
            assert torch.equal(mma_linear(x, state, runner), first)


def test_row_strided_input(runner):
    layer, state = _layer_on_gpu(80, 200, (2, 3, 4), torch.bfloat16, 32, 16)
    wide = nan_like((8, 256), torch.bfloat16, device="cuda")
    wide[:, :200] = random_x(8, 200, torch.bfloat16, device="cuda")
    x = wide[:, :200]
    _check(mma_linear(x, state, runner), layer, x, torch.bfloat16, "strided x")


@pytest.mark.parametrize("m", [1, 8, 64, 128, 2048])
def test_cuda_graph_replay_with_new_inputs_equals_eager(runner, m):
    dtype = torch.float16
    layer, state = _layer_on_gpu(1000, 1100, (2, 3, 4), dtype, 128, 512, bias=True)
    static_x = random_x(m, 1100, dtype, seed=1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        mma_linear(static_x, state, runner)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = mma_linear(static_x, state, runner)
    for seed in (2, 3):
        static_x.copy_(random_x(m, 1100, dtype, seed=seed, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        eager = mma_linear(static_x, state, runner)
        if m <= 128:
            assert torch.equal(static_y, eager)
        else:  # cuBLAS may pick another algorithm inside a capture
            torch.testing.assert_close(static_y, eager, rtol=1e-3, atol=1e-3)
        _check(static_y, layer, static_x, dtype, f"graph M={m}")
    assert not state.counters.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_layer_through_the_op_and_torch_compile(runner, dtype, monkeypatch):
    from sfmp_serve.ops import api
    monkeypatch.setenv("SFMP_CUDA_KERNELS", "mma")
    perm = torch.randperm(1100, generator=torch.Generator().manual_seed(3))
    layers = [make_layer(n, 1100, (2, 3, 4), dtype, group_size=128, block_rows=512, seed=n,
                         input_perm=perm) for n in (1000, 200, 200)]
    handle = api.prepare_layer("test.mma.qkv_proj", ("q", "k", "v"),
                               tuple(layer.packed for layer in layers), layers[0].config,
                               dtype, "cuda")
    assert handle.backend == "cuda-mma"

    def forward(x):
        return api.linear(x, handle) * 2

    compiled = torch.compile(forward, fullgraph=True)
    try:
        for m in (1, 5, 64, 300):
            x = random_x(m, 1100, dtype, seed=m, device="cuda")
            ref = torch.cat([layer.reference(x) for layer in layers], dim=1)
            eager = api.linear(x, handle)
            assert rel_err(eager, ref) < TOLERANCE[dtype]
            assert torch.equal(compiled(x), eager * 2)
    finally:
        api.release_layer(handle.name)
