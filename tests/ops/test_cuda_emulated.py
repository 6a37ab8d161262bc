"""The CUDA kernels, run on the CPU by the host emulator, against the reference op.

Same kernels.cu, same launch planning and arguments as on a GPU (see emulator.py). Shared
memory, per-thread state and outputs start as NaN, so any value the kernels forget to compute
or write shows up. Needs nvcc (to build the emulator); skipped without it.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from sfmp_serve.ops.cuda import plan as P
from sfmp_serve.ops.cuda.launch import Launch, dequant_launch, lut_launch
from sfmp_serve.ops.cuda.linear import cuda_linear, dequant_matmul, lut_gemm
from sfmp_serve.ops.cuda.repack import repack, repack_shards
from sfmp_serve.ops.reference import dequantize
from sfmp_serve.ops.runtime import fuse_shards
from tests.ops.cuda_cases import (BIT_MIXES, TOLERANCE, make_layer, nan_like, random_x,
                                  rel_err)

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
DTYPES = (torch.float16, torch.bfloat16)
LUT_MS = (1, 2, 3, 4, 8, 16)
DEQUANT_MS = (17, 40)


@pytest.fixture(scope="module")
def runner():
    from sfmp_serve.ops.cuda.emulator import EmulatorRunner
    return EmulatorRunner(multiprocessors=8)


def _check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(y).any(), "an output was never written (still NaN)"
    assert rel_err(y, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BIT_MIXES + ((1, 8), (5, 6, 7)))  # and every other width
def test_every_path_matches_the_reference(runner, dtype, bits):
    # 80 x 200 with 32-input groups and 16-row blocks: ragged last group (8 inputs).
    layer = make_layer(80, 200, bits, dtype, seed=sum(bits))
    state = repack(layer.packed, layer.config)
    x = random_x(max(LUT_MS + DEQUANT_MS), 200, dtype)
    for m in LUT_MS + DEQUANT_MS:
        out = nan_like((m, 80), dtype)
        y = cuda_linear(x[:m], state, runner, out=out)
        assert y.data_ptr() == out.data_ptr()
        _check(y, layer.reference(x[:m]), dtype)
    for m in (8, 16):  # LUT tiles above LUT_MAX_M: reachable through lut_gemm only
        y = nan_like((m, 80), dtype)
        lut_gemm(x[:m], state, y, runner)
        _check(y, layer.reference(x[:m]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_realistic_block_shape_with_ragged_edges_and_bias(runner, dtype):
    # 128-input groups and 512-row blocks (the reference's), widths that are not multiples.
    layer = make_layer(600, 300, (2, 3, 4), dtype, group_size=128, block_rows=512, bias=True)
    state = repack(layer.packed, layer.config)
    x = random_x(33, 300, dtype)
    for m in (1, 5, 33):
        _check(cuda_linear(x[:m], state, runner), layer.reference(x[:m]), dtype)


@pytest.mark.parametrize("sms", [1, 64])
def test_split_k_and_direct_store_agree_with_the_reference(sms):
    from sfmp_serve.ops.cuda.emulator import EmulatorRunner
    layer = make_layer(300, 256, (2, 3, 4), torch.float16, seed=4)
    state = repack(layer.packed, layer.config)
    small = EmulatorRunner(multiprocessors=sms)
    x = random_x(2, 256, torch.float16)
    y = cuda_linear(x, state, small)
    splits = P.plan_lut(2, 300, state.n_groups, sms).splits
    assert (splits == 1) == (sms == 1)
    assert [launch.kernel for launch in small.launches] == (
        ["sfmp_lut_f16_m2"] if splits == 1 else ["sfmp_lut_f16_m2", "sfmp_finish_f16"])
    _check(y, layer.reference(x), torch.float16)


def test_results_are_deterministic(runner):
    layer = make_layer(80, 200, (2, 3, 4), torch.bfloat16)
    state = repack(layer.packed, layer.config)
    for m in (1, 4, 20):
        x = random_x(m, 200, torch.bfloat16, seed=m)
        assert torch.equal(cuda_linear(x, state, runner), cuda_linear(x, state, runner))


def test_empty_batch_launches_nothing(runner):
    layer = make_layer(16, 32, (3,), torch.float16)
    state = repack(layer.packed, layer.config)
    before = len(runner.launches)
    y = cuda_linear(torch.zeros(2, 0, 32, dtype=torch.float16), state, runner)
    assert y.shape == (2, 0, 16) and len(runner.launches) == before


def test_row_strided_input_reads_only_its_columns(runner):
    layer = make_layer(48, 72, (3, 4), torch.float16)
    state = repack(layer.packed, layer.config)
    wide = nan_like((4, 80), torch.float16)  # 8 NaN columns past the 72 real inputs
    wide[:, :72] = random_x(4, 72, torch.float16)
    for m in (1, 4):
        x = wide[:m, :72]
        _check(cuda_linear(x, state, runner), layer.reference(x), torch.float16)


def test_fused_shards_match_the_shards_concatenated(runner):
    dtype = torch.float16
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(5))
    layers = [make_layer(n, 96, (2, 3, 4), dtype, seed=n, input_perm=perm) for n in (40, 24, 24)]
    shards = tuple(layer.packed for layer in layers)
    fused = fuse_shards("qkv", ("q", "k", "v"), shards, layers[0].config, dtype, "cpu")
    state = repack_shards(fused.shards, fused.config, fused.output_gather, dtype, "cpu")
    x = random_x(20, 96, dtype)
    for m in (1, 3, 20):
        ref = torch.cat([layer.reference(x[:m]) for layer in layers], dim=1)
        _check(cuda_linear(x[:m], state, runner), ref, dtype)


def test_lut_kernel_writes_every_partial_and_the_dequant_kernel_every_weight(runner):
    dtype = torch.bfloat16
    layer = make_layer(80, 200, (2, 3, 4), dtype)
    state = repack(layer.packed, layer.config)
    plan = P.plan_lut(3, 80, state.n_groups, 8)
    assert plan.splits > 1
    partial = nan_like((plan.splits, 3, 80), torch.float32)
    runner.launch(lut_launch(random_x(3, 200, dtype), state, plan, nan_like((3, 80), dtype),
                             partial))
    assert not torch.isnan(partial).any()
    dplan = P.plan_dequant(80, 200, 32, 2, scratch_bytes=40 * 200 * 2)
    assert not dplan.whole
    w_ref = dequantize(layer.packed, layer.config, torch.float64, reordered=True)
    for begin, end in dplan.chunks(80):
        w = nan_like((dplan.chunk_rows, 200), dtype)
        runner.launch(dequant_launch(state, dplan, w, begin, end))
        assert not torch.isnan(w[:end - begin]).any()
        assert torch.isnan(w[end - begin:]).all()  # nothing past the chunk
        assert rel_err(w[:end - begin], w_ref[begin:end]) < TOLERANCE[dtype]
    whole = P.plan_dequant(80, 200, 32, 2)
    assert whole.whole
    w = nan_like((80, 200), dtype)
    runner.launch(dequant_launch(state, whole, w, 0, 80))
    # rows in the original output order: reordered row r is original output output_perm[r]
    assert rel_err(w[state.output_perm.long()], w_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_dequant_path_matches_the_reference(runner, dtype):
    # 600 rows in 64-row chunks (a scratch too small for the whole matrix), K=300: rows of
    # 600 bytes are not 16-byte multiples, so the kernel must fall back to scalar stores.
    layer = make_layer(600, 300, (2, 3, 4), dtype, group_size=128, block_rows=512, bias=True)
    state = repack(layer.packed, layer.config)
    x = random_x(20, 300, dtype)
    y = nan_like((20, 600), dtype)
    dequant_matmul(x, state, y, runner, scratch_bytes=64 * 300 * 2)
    _check(y, layer.reference(x), dtype)
    x = random_x(5, 304, dtype)  # 16-byte rows: the vector stores, chunked
    layer = make_layer(100, 304, (3, 4), dtype, group_size=32, block_rows=16, bias=False)
    state = repack(layer.packed, layer.config)
    y = nan_like((5, 100), dtype)
    dequant_matmul(x, state, y, runner, scratch_bytes=64 * 304 * 2)
    _check(y, layer.reference(x), dtype)
    y = nan_like((5, 100), dtype)
    lut_gemm(x, state, y, runner)  # either path serves any M
    _check(y, layer.reference(x), dtype)


def test_plan_and_kernel_agree_on_the_table_tile(runner):
    from sfmp_serve.ops.cuda.sources import BATCH_TILES
    for mb in BATCH_TILES:
        assert runner.lut_words_per_tile(mb) == P.words_per_tile(mb)


def test_emulator_reports_a_launch_with_too_little_shared_memory(runner):
    layer = make_layer(16, 128, (3,), torch.float16, group_size=128)  # tiles of 4 words
    state = repack(layer.packed, layer.config)
    x, y = random_x(1, 128, torch.float16), nan_like((1, 16), torch.float16)
    launch = lut_launch(x, state, P.plan_lut(1, 16, state.n_groups, 1), y, None)
    short = Launch(launch.kernel, launch.grid, launch.block, launch.smem_bytes // 2,
                   launch.args)
    with pytest.raises(RuntimeError, match="shared memory"):
        runner.launch(short)
