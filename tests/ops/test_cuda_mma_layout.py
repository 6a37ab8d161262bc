"""The tensor-core layout on the CPU: repack (mma_repack.py) and its numpy model (mma_model.py).

The model decodes the repacked words through the m16n8k16 A-fragment map with the kernels' own
integer steps (lop3 truth tables, rotations, magic numbers); the rebuilt codes and weights must
equal the reference op's bit for bit: every bit-width 1..8, ragged rows, inputs and groups
(groups that are not whole words or k16 steps), block-rows that are not multiples of 16, fused
shards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sfmp_serve.bitplanes import unpack_codes
from sfmp_serve.ops.cuda import mma_model as model
from sfmp_serve.ops.cuda.mma_repack import (CHUNK_COLS, LANES, TILE_ROWS, plane_sources,
                                            repack_mma, repack_mma_linear)
from sfmp_serve.ops.reference import dequantize
from sfmp_serve.ops.runtime import fuse_shards
from tests.ops.cuda_cases import BIT_MIXES, make_layer, random_x

DTYPES = (torch.float16, torch.bfloat16)
ALL_WIDTHS = BIT_MIXES + ((1,), (1, 8), (5, 6, 7), (8,))
# (out, in, group_size, block_rows): tiny ragged; groups of 40 (not a k16 multiple) and 24-row
# blocks (not a tile multiple); the reference block shape with ragged edges; 256-input groups
GEOMETRIES = ((80, 200, 32, 16), (50, 130, 40, 24), (600, 300, 128, 512), (40, 520, 256, 32))


@pytest.mark.parametrize("period", [4, 8])
def test_every_plane_bit_has_one_source_and_every_code_one_slot(period):
    rows, cols = plane_sources(period)
    for p in range(8):
        pairs = set(zip(rows[p].ravel().tolist(), cols[p].ravel().tolist(),
                        np.repeat(np.arange(LANES), 32).tolist()))
        assert len(pairs) == LANES * 32  # 32 lanes x 32 bits, all distinct
    # each lane covers 2 rows x 16 inputs of the tile; together the lanes cover 16 x 64 once
    covered = {(int(r), int(c)) for r, c in zip(rows[0].ravel(), cols[0].ravel())}
    assert covered == {(r, c) for r in range(TILE_ROWS) for c in range(CHUNK_COLS)}


def test_lop3_model_matches_its_truth_table_definition():
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32) for _ in range(3))
    assert np.array_equal(model.lop3(a, b, c, model.LOP3_SELECT), (a & c) | (b & ~c))
    assert np.array_equal(model.lop3(a, b, c, model.LOP3_MASK_OR), (a & b) | c)
    assert np.array_equal(model.lop3(a, b, c, 0x96), a ^ b ^ c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_decode_gives_every_code_exactly(dtype, bits):
    # Every code value in every slot: random codes on 3 tiles, plus all-ones (the largest code).
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, (3, TILE_ROWS, CHUNK_COLS)).astype(np.uint8)
    codes[2] = 2**bits - 1
    from sfmp_serve.ops.cuda.mma_repack import _plane_words
    decoded = model.decode_chunk(_plane_words(codes, bits), bits, dtype)
    assert np.array_equal(decoded, codes.astype(np.float64))


def _check_rebuild(layers, state, config):
    codes = model.rebuild_codes(state)
    out_row, kidx = state.out_row.numpy(), state.kidx.numpy()
    # padding decodes to code 0 everywhere; real positions are the canonical codes
    padded_cols = kidx < 0
    assert not codes[:, padded_cols].any() and not codes[out_row < 0].any()
    w = model.rebuild_weight(state)
    expected = torch.cat([dequantize(layer.packed, config, torch.float64) for layer in layers])
    assert torch.equal(w, expected)  # bit-exact, float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", ALL_WIDTHS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_rebuilt_weight_equals_the_reference_bit_exactly(geometry, bits, dtype):
    n, k, gs, br = geometry
    layer = make_layer(n, k, bits, dtype, group_size=gs, block_rows=br, seed=sum(bits) + n,
                       bias=True)
    state = repack_mma_linear(layer.packed, layer.config)
    assert state.padded_rows % TILE_ROWS == 0 and state.padded_cols % CHUNK_COLS == 0
    assert set(np.unique(state.tile_meta[..., 1].numpy()).tolist()) <= set(bits)
    _check_rebuild([layer], state, layer.config)
    codes = model.rebuild_codes(state)
    geo = layer.packed.geometry(layer.config)
    canonical = unpack_codes(layer.packed.qweight, layer.packed.block_bits,
                             layer.packed.block_offsets, geo).numpy()
    # reordered coordinates: padded row of reordered row i, padded column of reordered input j
    rows = state.gather_index.numpy()[layer.packed.output_perm.numpy()]
    kp_of_input = np.full(k, -1)
    kp_of_input[state.kidx.numpy()[state.kidx.numpy() >= 0]] = np.nonzero(
        state.kidx.numpy() >= 0)[0]
    cols = kp_of_input[layer.packed.input_perm.numpy()]
    assert np.array_equal(codes[rows[:, None], cols[None, :]], canonical.astype(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_shards_with_ragged_block_rows(dtype):
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(5))
    layers = [make_layer(n, 200, (2, 3, 4), dtype, group_size=128, block_rows=48, seed=n,
                         input_perm=perm) for n in (100, 36, 36)]
    shards = tuple(layer.packed for layer in layers)
    fused = fuse_shards("qkv", ("q", "k", "v"), shards, layers[0].config, dtype, "cpu")
    state = repack_mma(fused.shards, fused.config, fused.output_gather, dtype, "cpu")
    # 100 rows = 48 + 48 + 4: three block-rows padded to 48, 48, 16; 36 = 36 -> 48, twice
    assert state.padded_rows == 48 + 48 + 16 + 48 + 48
    _check_rebuild(layers, state, layers[0].config)
    x = random_x(5, 200, dtype)
    ref = torch.cat([layer.reference(x) for layer in layers], dim=1)
    assert torch.allclose(model.model_linear(x, state), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_kernel_algorithm_model_equals_the_reference(geometry):
    # Per k-block sum(q x), then 2 alpha acc + (beta - alpha (2^b - 1)) sum(x): exact algebra.
    n, k, gs, br = geometry
    layer = make_layer(n, k, (2, 3, 4), torch.bfloat16, group_size=gs, block_rows=br, bias=True)
    state = repack_mma_linear(layer.packed, layer.config)
    x = random_x(7, k, torch.bfloat16)
    assert torch.allclose(model.model_linear(x, state), layer.reference(x), rtol=1e-10,
                          atol=1e-10)


def test_scales_are_the_checkpoint_values_in_fragment_order():
    layer = make_layer(48, 256, (3, 4), torch.float16, group_size=128, block_rows=16)
    state = repack_mma_linear(layer.packed, layer.config)
    sc = state.scales  # [tile, kb, g, half, (alpha, beta)]
    assert sc.shape == (3, 2, 8, 2, 2) and sc.dtype == torch.float16
    rows = state.out_row.numpy()
    inv = np.argsort(layer.packed.output_perm.numpy())  # original output -> reordered row
    for tile in range(3):
        for g in range(8):
            for half in range(2):
                reordered = inv[rows[tile * 16 + 8 * half + g]]
                for kb in range(2):
                    assert sc[tile, kb, g, half, 0] == layer.packed.alpha[reordered, kb]
                    assert sc[tile, kb, g, half, 1] == layer.packed.beta[reordered, kb]


def test_repacked_size_is_the_stored_size_plus_padding_only():
    # 512-row blocks and 128-input groups (the reference's): no padding at all.
    layer = make_layer(1024, 512, (2, 3, 4), torch.float16, group_size=128, block_rows=512)
    state = repack_mma_linear(layer.packed, layer.config)
    assert state.qweight.numel() == layer.packed.qweight.numel()
    assert state.padded_rows == 1024 and state.padded_cols == 512
    assert state.counters.numel() == 2 * (1024 // 64) and not state.counters.any()
