"""Host-side logic of the CUDA path on the CPU: launch planning, runtime repack, launch checks."""

from __future__ import annotations

import math

import pytest
import torch

from sfmp_serve.bitplanes import unpack_codes
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import WORD_BITS
from sfmp_serve.ops.cuda import plan as P
from sfmp_serve.ops.cuda import sources
from sfmp_serve.ops.cuda.launch import Launch, lut_launch
from sfmp_serve.ops.cuda.repack import CudaLinear, repack, repack_shards
from sfmp_serve.ops.runtime import compose_output_gather
from tests.ops.cuda_cases import make_layer

LLAMA_8B = [(4096, 4096), (1024, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("n,k", LLAMA_8B + [(80, 200), (7, 40)])
@pytest.mark.parametrize("sms", [1, 108, 132])
def test_lut_plan_covers_every_row_group_and_batch_row(m, n, k, sms):
    groups = math.ceil(k / 128)
    plan = P.plan_lut(m, n, groups, sms)
    assert plan.batch_tile >= m and plan.batch_tile in sources.BATCH_TILES
    assert plan.row_tiles * plan.threads >= n > (plan.row_tiles - 1) * plan.threads
    assert plan.threads <= P.LUT_THREADS
    # every split has at least one group, together exactly all groups
    assert (plan.splits - 1) * plan.groups_per_split < groups <= plan.splits * plan.groups_per_split
    assert plan.batch_chunks * plan.batch_tile >= m
    assert plan.smem_bytes <= 64 << 10
    if sms >= 108 and groups >= 16:  # big GPUs get at least one block per SM
        assert plan.row_tiles * plan.splits * plan.batch_chunks >= sms


def test_lut_tables_fit_the_documented_shared_memory():
    assert [P.lut_smem_bytes(mb) >> 10 for mb in sources.BATCH_TILES] == [16, 32, 32, 32, 64]


@pytest.mark.parametrize("n,k", LLAMA_8B + [(80, 200), (33, 7)])
@pytest.mark.parametrize("group_size", [32, 128, 256])
def test_dequant_plan_chunks_cover_rows_within_the_scratch_budget(n, k, group_size):
    plan = P.plan_dequant(n, k, group_size, 2)
    chunks = plan.chunks(n)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert plan.chunk_rows * k * 2 <= max(P.DEQUANT_SCRATCH_BYTES,
                                          P.DEQUANT_TILE_ROWS * k * 2)
    words = math.ceil(min(group_size, k) / WORD_BITS)
    groups = math.ceil(k / min(group_size, k))
    # every group in exactly one grid column; about 64 outputs (8 per word) per thread
    assert (plan.group_tiles - 1) * plan.groups_per_block < groups
    assert groups <= plan.group_tiles * plan.groups_per_block
    assert plan.groups_per_block == 1 or plan.groups_per_block * words * 8 <= 64
    assert plan.threads[0] * plan.threads[1] <= 256 and plan.smem_bytes == 0
    rows = chunks[0][1] - chunks[0][0]
    assert plan.grid(rows, groups)[0] * P.DEQUANT_TILE_ROWS >= rows
    assert plan.whole == (len(chunks) == 1)


def test_every_llama_8b_linear_dequantizes_in_one_chunk():
    # One chunk writes y directly; chunks need a gather of y afterwards (linear.py).
    for n, k in LLAMA_8B:
        assert P.plan_dequant(n, k, 128, 2).whole


def _codes_by_kernel_addressing(state: CudaLinear) -> torch.Tensor:
    """Codes [N, K] read from the repacked state with the kernels' address arithmetic
    (common.cuh: row_ref, block_ref, plane_word), in plain torch."""
    n, k, gs = state.out_features, state.in_features, state.group_size
    codes = torch.zeros(n, k, dtype=torch.int64)
    q = state.qweight.to(torch.int64) & 0xFFFFFFFF
    for row in range(n):
        block_row, local, rows, _ = state.row_info[row].tolist()
        for g in range(state.n_groups):
            offset, bits = state.meta[block_row, g].tolist()
            cols = min(gs, k - g * gs)
            words = math.ceil(cols / WORD_BITS)
            for i in range(bits):
                idx = offset + (i * words + torch.arange(words)) * rows + local
                planes = (q[idx][:, None] >> torch.arange(WORD_BITS)) & 1
                codes[row, g * gs:g * gs + cols] |= planes.flatten()[:cols] << i
    return codes


def test_repack_addressing_reads_back_the_canonical_codes_and_scales():
    layer = make_layer(45, 77, (2, 3, 4), torch.float16, group_size=32, block_rows=16,
                       bias=True)
    packed, config = layer.packed, layer.config
    state = repack(packed, config)
    geo = packed.geometry(config)
    expected = unpack_codes(packed.qweight, packed.block_bits, packed.block_offsets, geo)
    assert torch.equal(_codes_by_kernel_addressing(state), expected.to(torch.int64))
    assert torch.equal(state.scales[..., 0], packed.alpha.t())
    assert torch.equal(state.scales[..., 1], packed.beta.t())
    assert torch.equal(state.output_perm, packed.output_perm)
    assert torch.equal(state.output_index[packed.output_perm.long()], torch.arange(45))
    assert torch.equal(state.input_index, packed.input_perm.long())
    assert state.bias is not None and torch.equal(state.bias, packed.bias)
    assert state.nbytes > packed.qweight.numel() * 4


def test_repack_stacks_fused_shards_with_ragged_block_rows():
    # q/k/v-like shards sharing one input order; 40 and 24 rows leave ragged block-rows inside.
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shards = [make_layer(n, 64, (2, 3, 4), torch.bfloat16, block_rows=16, seed=s,
                         input_perm=perm).packed for s, n in enumerate((40, 24, 24))]
    config = make_layer(8, 64, (2, 3, 4), torch.bfloat16, block_rows=16).config
    gather, _ = compose_output_gather(tuple(shards))
    state = repack_shards(shards, config, gather, torch.bfloat16, "cpu")
    assert state.out_features == 88 and state.meta.shape == (3 + 2 + 2, 2, 2)
    assert state.row_info[40].tolist() == [3, 0, 16, 0]  # first row of the second shard
    assert state.row_info[39].tolist() == [2, 7, 8, 0]  # last row of the first: ragged
    codes = _codes_by_kernel_addressing(state)
    start = 0
    for shard in shards:
        geo = shard.geometry(config)
        own = unpack_codes(shard.qweight, shard.block_bits, shard.block_offsets, geo)
        assert torch.equal(codes[start:start + shard.out_features], own.to(torch.int64))
        start += shard.out_features
    assert torch.equal(state.output_index, gather)


def test_repack_rejects_float32_activations():
    layer = make_layer(16, 32, (3,), torch.float16)
    with pytest.raises(SFMPError, match="float32"):
        repack(layer.packed, layer.config, dtype=torch.float32)


def test_launch_arguments_are_checked_against_the_entry_point():
    layer = make_layer(16, 32, (3,), torch.float16)
    state = repack(layer.packed, layer.config)
    x = torch.zeros(1, 32, dtype=torch.float16)
    y = torch.zeros(1, 16, dtype=torch.float16)
    launch = lut_launch(x, state, P.plan_lut(1, 16, 1, 1), y, None)
    launch.check()
    assert launch.kernel == "sfmp_lut_f16_m1" and launch.grid == (1, 1, 1)
    with pytest.raises(ValueError, match="arguments"):
        Launch(launch.kernel, launch.grid, launch.block, 0, launch.args[:-1]).check()
    with pytest.raises(ValueError, match="input_perm"):
        Launch(launch.kernel, launch.grid, launch.block, 0, (x, 3, *launch.args[2:])).check()


def test_backend_is_registered_and_says_why_it_cannot_run():
    from sfmp_serve.ops import api
    from sfmp_serve.ops.cuda import CudaBackend
    from sfmp_serve.ops.runtime import LayerSpec
    assert any(isinstance(b, CudaBackend) for b in api.backends_for("cuda"))

    def spec(dtype, device_type="cuda"):
        return LayerSpec("l", 64, (32,), 32, 16, (2, 3), dtype, device_type)

    backend = CudaBackend()
    assert backend.can_implement(spec(torch.float16, "cpu")) == (
        False, "runs on CUDA devices only, not on cpu")
    ok, why = backend.can_implement(spec(torch.float32))
    assert not ok and "float32" in why
    if not torch.cuda.is_available():
        assert backend.can_implement(spec(torch.bfloat16)) == (
            False, "no CUDA device is visible to torch")
