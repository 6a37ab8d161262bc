"""The plain-torch CPU path of sfmp::linear against the reference op (the oracle), and the op API.

Every test here runs with SFMP_CPU_KERNEL=torch, so the op takes the plain-torch backend (the
fallback of the compiled kernels, tested in test_cpu_native.py)."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY

from sfmp_serve.errors import FormatError, SFMPError
from sfmp_serve.ops import api, cpu_torch, cpu_torch_layout
from sfmp_serve.ops.reference import sfmp_linear_reference
from sfmp_serve.ops.runtime import LayerSpec
from tests.serving.packed import random_packed, sfmp_config

@pytest.fixture(autouse=True)
def plain_torch_backend(monkeypatch):
    monkeypatch.setenv("SFMP_CPU_KERNEL", "torch")


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (shard out_features, in_features, group_size, block_rows): ragged rows and groups,
# groups that are not whole words (40 = 1.25 words), fused shards of unequal height.
SHAPES = [
    ((70,), 100, 40, 16),
    ((96, 32, 32), 96, 32, 16),
    ((200, 200), 96, 32, 16),
    ((96,), 200, 32, 16),
    ((5,), 24, 8, 4),
    ((130,), 75, 64, 128),
]
BIT_MIXES = [(2, 3, 4), (2,), (3,), (4,), (1, 5, 6, 7, 8)]


def _layer(shapes, in_features, group_size, block_rows, bits, dtype, seed=0, name="layer"):
    gen = torch.Generator().manual_seed(seed)
    config = sfmp_config(group_size=group_size, block_rows=block_rows, bit_choices=bits,
                         act_dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    perm = torch.randperm(in_features, generator=gen)
    shards = tuple(random_packed(n, in_features, config, gen, perm) for n in shapes)
    names = tuple(f"{name}.s{i}" for i in range(len(shards)))
    for shard_name, shard in zip(names, shards):
        shard.validate(shard_name, config)
    return config, names, shards


def _reference(x, shards, config):
    """Float64 dequant oracle, concatenated over the shards (vLLM's fused order)."""
    return torch.cat([sfmp_linear_reference(x.double(), s, config, "dequant") for s in shards], -1)


def _rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", BIT_MIXES, ids=lambda b: "b" + "".join(map(str, b)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}r{s[3]}")
def test_matches_reference(shape, bits, dtype):
    config, names, shards = _layer(*shape, bits, dtype)
    handle = api.prepare_layer("test.layer", names, shards, config, dtype, "cpu")
    assert handle.backend == "cpu-torch"
    gen = torch.Generator().manual_seed(1)
    for m in (1, 2, 7, 33, cpu_torch.DENSE_MIN_M):  # decode, batched LUT-free GEMMs, dense prefill
        x = torch.randn(m, shape[1], generator=gen).to(dtype)
        y = api.linear(x, handle)
        assert y.dtype == dtype and y.shape == (m, handle.out_features)
        assert _rel_err(y, _reference(x, shards, config)) < TOLERANCE[dtype], m


def test_lut_reference_agrees_on_a_fused_layer():
    """The bit-serial (lut) formulation as a second, independent oracle."""
    config, names, shards = _layer((70, 40), 100, 40, 16, (2, 3, 4), torch.float32)
    handle = api.prepare_layer("test.lut", names, shards, config, torch.float32, "cpu")
    x = torch.randn(3, 100)
    ref = torch.cat([sfmp_linear_reference(x, s, config, "lut") for s in shards], -1)
    assert _rel_err(api.linear(x, handle), ref.double()) < 1e-5


def test_small_chunks_split_block_rows(monkeypatch):
    """Chunks smaller than a block-row: tiles split rows and chunks hold several tiles."""
    config, names, shards = _layer((150, 64), 96, 32, 64, (2, 3, 4), torch.float32)
    for m in (5, cpu_torch.DENSE_MIN_M + 3):  # per-group GEMMs, and dense tiles
        x = torch.randn(m, 96)
        reference = _reference(x, shards, config)
        for elems in (96 * 20, 96 * 70, 96 * 400):
            monkeypatch.setattr(cpu_torch_layout, "CHUNK_ELEMS", elems)
            handle = api.prepare_layer("test.chunks", names, shards, config, torch.float32,
                                       "cpu")
            assert _rel_err(api.linear(x, handle), reference) < 1e-5, (m, elems)


def test_bias_leading_dims_and_fp16():
    config, names, shards = _layer((40,), 64, 32, 16, (3, 4), torch.float32)
    handle = api.prepare_layer("test.bias", names, shards, config, torch.float16, "cpu")
    x = torch.randn(2, 3, 64).half()
    bias = torch.randn(40).half()
    y = api.linear(x, handle, bias)
    ref = _reference(x.reshape(6, 64), shards, config) + bias.double()
    assert y.shape == (2, 3, 40) and y.dtype == torch.float16
    assert _rel_err(y.reshape(6, 40), ref) < 2e-3


def test_shards_must_share_the_input_order():
    config, names, shards = _layer((32, 32), 64, 32, 16, (2, 4), torch.float32)
    shards[1].input_perm = torch.randperm(64).to(torch.int32)
    with pytest.raises(FormatError, match=r"layer test\.perm: tensor layer\.s1\.input_perm"):
        api.prepare_layer("test.perm", names, shards, config, torch.float32, "cpu")


def test_resident_bytes_are_packed():
    """Per weight: the planes (avg bits), scales and tables, far below a dense fp32 copy."""
    config, names, shards = _layer((512,), 512, 128, 256, (2, 4), torch.float32)
    handle = api.prepare_layer("test.bytes", names, shards, config, torch.float32, "cpu")
    planes = shards[0].qweight.numel() * 4
    scales = 2 * 512 * 4 * 4  # 2 alpha and alpha + beta, float32 per (row, group)
    gathers = 8 * (512 + 512)  # input and output index
    assert planes + scales + gathers <= handle.nbytes < planes + scales + gathers + 1024
    assert handle.nbytes < 512 * 512 * 4 / 6


def _calls(path):
    return REGISTRY.get_sample_value("sfmp_op_calls_total", {"path": path}) or 0.0


def test_metrics_count_decode_and_prefill_calls():
    config, names, shards = _layer((32,), 64, 32, 16, (2, 3), torch.float32)
    handle = api.prepare_layer("test.metrics", names, shards, config, torch.float32, "cpu")
    before = {p: _calls(p) for p in ("decode", "prefill")}
    api.linear(torch.randn(api.DECODE_MAX_M, 64), handle)
    api.linear(torch.randn(api.DECODE_MAX_M + 1, 64), handle)
    api.linear(torch.randn(1, 64), handle)
    assert _calls("decode") - before["decode"] == 2
    assert _calls("prefill") - before["prefill"] == 1
    assert REGISTRY.get_sample_value("sfmp_op_seconds_count", {"path": "prefill"}) >= 1
    assert REGISTRY.get_sample_value("sfmp_quantized_weight_bytes") >= handle.nbytes


def test_op_traces_under_torch_compile():
    """Fake impl + opaque op: dynamic-shape compilation matches eager and passes opcheck."""
    config, names, shards = _layer((48, 16), 64, 32, 16, (2, 3, 4), torch.float32)
    handle = api.prepare_layer("test.compile", names, shards, config, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.sfmp.linear.default, (torch.randn(3, 64), handle.name, 64),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda x: api.linear(x, handle) * 2, backend="aot_eager",
                             fullgraph=True, dynamic=True)
    for m in (1, 5, 40):
        x = torch.randn(m, 64)
        torch.testing.assert_close(compiled(x), api.linear(x, handle) * 2)


def test_unprepared_layer_and_missing_backend_are_clear_errors():
    with pytest.raises(SFMPError, match="layer nowhere: not prepared"):
        torch.ops.sfmp.linear(torch.randn(1, 8), "nowhere", 4)
    spec = LayerSpec("test.meta", 8, (4,), 8, 4, (2,), torch.float32, "meta")
    with pytest.raises(SFMPError, match="layer test.meta: no SFMP backend for device 'meta'"):
        api.select_backend(spec)
    spec = LayerSpec("test.cuda", 8, (4,), 8, 4, (2,), torch.float32, "cuda")
    assert not cpu_torch.TorchCpuBackend().can_implement(spec)[0]
