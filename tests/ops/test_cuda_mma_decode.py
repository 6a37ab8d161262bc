"""The C++ decode helpers of the tensor-core kernels (mma_decode.cuh), built for the host.

The same source the kernels compile (lop3 immediates and masks, rotations, the 0x6400 / 0x4300
magic numbers, the bf16 8-bit split) decodes repacked plane words on the CPU; the result must
be, bit for bit, the fp16/bf16 value of every code of the reference (and of the numpy model).
Needs nvcc (to build the host library); skipped without it.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from sfmp_serve.bitplanes import unpack_codes
from sfmp_serve.ops.cuda import mma_model as model
from sfmp_serve.ops.cuda.mma_repack import (CHUNK_COLS, LANES, TILE_ROWS, _plane_words,
                                            repack_mma_linear)
from tests.ops.cuda_cases import make_layer

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def host():
    from sfmp_serve.ops.cuda.emulator import MmaDecodeHost
    return MmaDecodeHost()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_host_decode_gives_every_code_bit_exactly(host, dtype, bits):
    rng = np.random.default_rng(100 + bits)
    codes = rng.integers(0, 2**bits, (4, TILE_ROWS, CHUNK_COLS)).astype(np.uint8)
    codes[0] = 2**bits - 1  # the largest code everywhere (bf16, 8 bits: through the exponent)
    codes[1] = 0
    words = _plane_words(codes, bits)  # [bits, tiles, 32]
    for tile in range(codes.shape[0]):
        w = torch.from_numpy(words[:, tile].view(np.int32).copy())
        got = host.decode_chunk(w, bits, dtype)
        expected = torch.from_numpy(codes[tile].astype(np.float32)).to(dtype)
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))  # same bits
        modelled = model.decode_chunk(words[:, tile:tile + 1], bits, dtype)[0]
        assert np.array_equal(got.to(torch.float64).numpy(), modelled)


def test_host_decode_refuses_widths_outside_the_format(host):
    with pytest.raises(ValueError, match="1..8"):
        host.decode_chunk(torch.zeros(9, 32, dtype=torch.int32), 9, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_decode_of_a_repacked_layer_gives_the_reference_codes(host, dtype):
    # Every (tile, chunk) of a mixed 2/3/4/8-bit layer with ragged rows, groups and blocks.
    layer = make_layer(50, 300, (2, 3, 4, 8), dtype, group_size=96, block_rows=40, seed=3)
    state = repack_mma_linear(layer.packed, layer.config)
    words = state.qweight.numpy().view(np.uint32)
    meta, kb_info = state.tile_meta.numpy(), state.kb_info.numpy()
    decoded = np.zeros((state.padded_rows, state.padded_cols))
    for tile in range(state.n_tiles):
        for kb, (kp, nch, _, _) in enumerate(kb_info.tolist()):
            offset, bits = meta[tile, kb]
            block = words[offset:offset + bits * LANES * nch].reshape(bits, LANES, nch)
            for c in range(nch):
                w = torch.from_numpy(block[:, :, c].view(np.int32).copy())
                col = kp + c * CHUNK_COLS
                decoded[tile * 16:(tile + 1) * 16, col:col + CHUNK_COLS] = host.decode_chunk(
                    w, int(bits), dtype).to(torch.float64).numpy()
    assert np.array_equal(decoded, model.rebuild_codes(state))
    geo = layer.packed.geometry(layer.config)
    canonical = unpack_codes(layer.packed.qweight, layer.packed.block_bits,
                             layer.packed.block_offsets, geo).numpy()
    rows = state.gather_index.numpy()[layer.packed.output_perm.numpy()]
    kidx = state.kidx.numpy()
    kp_of_input = np.empty(layer.packed.in_features, dtype=np.int64)
    kp_of_input[kidx[kidx >= 0]] = np.nonzero(kidx >= 0)[0]
    cols = kp_of_input[layer.packed.input_perm.numpy()]
    assert np.array_equal(decoded[rows[:, None], cols[None, :]], canonical.astype(np.float64))
