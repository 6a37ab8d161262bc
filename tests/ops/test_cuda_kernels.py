"""The CUDA kernels on a GPU against the reference op (skipped without a GPU or CuPy).

Fresh random layers and inputs; every bit mix of {2, 3, 4}; widths that are not multiples of
128 or 512; M from 1 (LUT GEMV) to 2048 (dequant + cuBLAS); fp16 and bf16. Outputs start as
NaN, so anything left unwritten fails. Also: CUDA-graph capture and replay with new inputs,
torch.compile through the sfmp::linear op, the op registry picking this backend, determinism.
Run: scripts/gpu_check.sh (or pytest -m gpu tests/ops/test_cuda_kernels.py on a GPU machine).
"""

from __future__ import annotations

import pytest
import torch

from sfmp_serve.ops.cuda.linear import cuda_linear, dequant_matmul, lut_gemm
from sfmp_serve.ops.cuda.plan import LUT_MAX_M
from sfmp_serve.ops.cuda.runtime import runner_for
from sfmp_serve.ops.cuda.repack import repack
from tests.ops.cuda_cases import (BIT_MIXES, TOLERANCE, make_layer, nan_like, random_x,
                                  rel_err)

pytestmark = pytest.mark.gpu
pytest.importorskip("cupy")

DTYPES = (torch.float16, torch.bfloat16)
MS = (1, 2, 4, 8, 16, 64, 2048)
# (out, in, group_size, block_rows): tiny ragged, odd widths at the reference block shape
SHAPES = ((80, 200, 32, 16), (1000, 1100, 128, 512))


def _layer_on_gpu(n, k, bits, dtype, gs, br, seed=0, bias=False):
    layer = make_layer(n, k, bits, dtype, group_size=gs, block_rows=br, seed=seed, bias=bias)
    return layer, repack(layer.packed, layer.config, device="cuda")


def _check_all_ms(layer, state, dtype, ms=MS):
    x = random_x(max(ms), layer.packed.in_features, dtype, seed=11, device="cuda")
    for m in ms:
        out = nan_like((m, layer.packed.out_features), dtype, device="cuda")
        y = cuda_linear(x[:m], state, out=out)
        torch.cuda.synchronize()
        assert not torch.isnan(y).any(), f"M={m}: outputs left unwritten"
        err = rel_err(y, layer.reference(x[:m]))
        assert err < TOLERANCE[dtype], f"M={m}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BIT_MIXES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_reference(shape, bits, dtype):
    n, k, gs, br = shape
    layer, state = _layer_on_gpu(n, k, bits, dtype, gs, br, seed=sum(bits), bias=n > 100)
    _check_all_ms(layer, state, dtype)


@pytest.mark.parametrize("n,k,dtype", [(4096, 4096, torch.float16), (4096, 4096, torch.bfloat16),
                                       (1024, 4096, torch.float16),
                                       (4096, 14336, torch.float16)])
def test_llama_8b_shapes(n, k, dtype):
    layer, state = _layer_on_gpu(n, k, (2, 3, 4), dtype, 128, 512)
    _check_all_ms(layer, state, dtype, ms=(1, 8, 16, 2048))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + ((512, 1024, 128, 512),))  # last: 16-byte stores
def test_both_paths_at_every_batch_size(shape, dtype):
    # cuda_linear picks one path per M; each must be right at any M (the threshold is tuned).
    n, k, gs, br = shape
    layer, state = _layer_on_gpu(n, k, (2, 3, 4), dtype, gs, br, seed=7, bias=True)
    x = random_x(64, k, dtype, seed=5, device="cuda")
    for path in (lut_gemm, dequant_matmul):
        for m in (1, 3, 5, 8, 16, 64):
            y = nan_like((m, n), dtype, device="cuda")
            path(x[:m], state, y, runner_for("cuda"))
            torch.cuda.synchronize()
            assert not torch.isnan(y).any(), f"{path.__name__} M={m}: outputs left unwritten"
            err = rel_err(y, layer.reference(x[:m]))
            assert err < TOLERANCE[dtype], f"{path.__name__} M={m}: relative error {err:.2e}"


def test_chunked_dequant_path():
    # A scratch smaller than the weight: chunks of reordered rows, then the gather of y.
    layer, state = _layer_on_gpu(1000, 1024, (2, 3, 4), torch.float16, 128, 512, bias=True)
    x = random_x(40, 1024, torch.float16, device="cuda")
    y = nan_like((40, 1000), torch.float16, device="cuda")
    dequant_matmul(x, state, y, runner_for("cuda"), scratch_bytes=300 * 1024 * 2)
    assert rel_err(y, layer.reference(x)) < TOLERANCE[torch.float16]


def test_results_are_deterministic():
    layer, state = _layer_on_gpu(1000, 1100, (2, 3, 4), torch.float16, 128, 512)
    for m in (1, 16):
        x = random_x(m, 1100, torch.float16, device="cuda")
        assert torch.equal(cuda_linear(x, state), cuda_linear(x, state))


def test_row_strided_input():
    layer, state = _layer_on_gpu(80, 200, (2, 3, 4), torch.bfloat16, 32, 16)
    wide = nan_like((8, 256), torch.bfloat16, device="cuda")
    wide[:, :200] = random_x(8, 200, torch.bfloat16, device="cuda")
    x = wide[:, :200]
    assert rel_err(cuda_linear(x, state), layer.reference(x)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 8, 64])
def test_cuda_graph_replay_with_new_inputs_equals_eager(m):
    dtype = torch.float16
    layer, state = _layer_on_gpu(1000, 1100, (2, 3, 4), dtype, 128, 512)
    static_x = random_x(m, 1100, dtype, seed=1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture (allocator, kernels loaded)
        cuda_linear(static_x, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = cuda_linear(static_x, state)
    for seed in (2, 3):
        static_x.copy_(random_x(m, 1100, dtype, seed=seed, device="cuda"))
        graph.replay()
        eager = cuda_linear(static_x.clone(), state)
        torch.cuda.synchronize()
        if m <= LUT_MAX_M:  # our kernels only: same launches, bit-identical
            assert torch.equal(static_y, eager)
        else:  # cuBLAS may pick another algorithm inside a capture
            torch.testing.assert_close(static_y, eager, rtol=1e-3, atol=1e-3)
        assert rel_err(static_y, layer.reference(static_x)) < TOLERANCE[dtype]


def _qkv_layer(dtype):
    from sfmp_serve.ops import api
    perm = torch.randperm(1100, generator=torch.Generator().manual_seed(3))
    layers = [make_layer(n, 1100, (2, 3, 4), dtype, group_size=128, block_rows=512, seed=n,
                         input_perm=perm) for n in (1000, 200, 200)]
    handle = api.prepare_layer("test.qkv_proj", ("q", "k", "v"),
                               tuple(layer.packed for layer in layers), layers[0].config,
                               dtype, "cuda")
    return layers, handle


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_layer_through_the_op_and_torch_compile(dtype):
    from sfmp_serve.ops import api
    layers, handle = _qkv_layer(dtype)
    assert handle.backend == "cuda-lut"

    def forward(x):
        return api.linear(x, handle) * 2

    compiled = torch.compile(forward, fullgraph=True)
    for m in (1, 5, 64):
        x = random_x(m, 1100, dtype, seed=m, device="cuda")
        ref = torch.cat([layer.reference(x) for layer in layers], dim=1)
        eager = api.linear(x, handle)
        assert rel_err(eager, ref) < TOLERANCE[dtype]
        assert torch.equal(compiled(x), eager * 2)
    api.release_layer(handle.name)
