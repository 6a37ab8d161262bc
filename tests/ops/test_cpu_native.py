"""The compiled CPU kernels (ops/cpu_native) against the reference op, on every ISA this CPU runs.

The oracle is the float64 dequantized reference (ops/reference.py). Every kernel family is
reached by choosing the batch size: the vector gemv (M = 1, and every M on ISAs without AMX),
the AMX gemv (2 <= M < its dense threshold), the dequantize + GEMM prefill path, and each ISA
the CPU supports is forced in turn (amx, avx512_bf16, avx512, avx2).
"""

from __future__ import annotations

import logging

import pytest
import torch

from sfmp_serve.errors import SFMPError
from sfmp_serve.ops import api, cpu_native
from sfmp_serve.ops.cpu_native import build
from sfmp_serve.ops.reference import dequantize
from sfmp_serve.ops.runtime import fuse_shards
from tests.serving.packed import random_packed, sfmp_config

if build.unsupported_reason():
    pytest.skip(build.unsupported_reason(), allow_module_level=True)

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (shard out_features, in_features, group_size, block_rows): ragged block-rows and groups,
# groups that are not whole words (40 = 1.25 words) or pairs of AMX tiles (40, 24), fused
# shards of unequal height, block-rows that are not whole tiles of 16 rows (4, 24), an odd K.
SHAPES = [
    ((70,), 100, 40, 16),
    ((96, 32, 32), 96, 32, 16),
    ((200, 200), 96, 32, 24),
    ((5,), 24, 8, 4),
    ((130,), 75, 64, 128),
    ((48,), 520, 128, 32),
]
BIT_MIXES = [(2, 3, 4), (2,), (3,), (4,), (1, 5, 6, 7, 8)]
# Batch sizes: gemv chunk edges (8 vector rows, 16 AMX rows), and both sides of the dense switch.
M_VALUES = (1, 2, 3, 8, 9, 16, 17, 33)


def isas() -> list[str]:
    return cpu_native.kernels().isas()


@pytest.fixture(params=isas())
def isa(request):
    kernels = cpu_native.kernels()
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(isas()[0])


def _layer(shapes, in_features, group_size, block_rows, bits, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    config = sfmp_config(group_size=group_size, block_rows=block_rows, bit_choices=bits,
                         act_dtype=DTYPES[dtype])
    perm = torch.randperm(in_features, generator=gen)
    shards = tuple(random_packed(n, in_features, config, gen, perm) for n in shapes)
    fused = fuse_shards("test", tuple(f"s{i}" for i in range(len(shards))), shards, config,
                        dtype, "cpu")
    weight = torch.cat([dequantize(s, config, torch.float64) for s in shards])
    return fused, weight


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def test_this_machine_runs_the_kernels():
    assert isas(), "an x86-64 CPU without AVX2: the plain-torch path would serve"
    with pytest.raises(RuntimeError, match="ISA 'sse2' is not supported"):
        cpu_native.kernels().set_isa("sse2")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits", BIT_MIXES, ids=lambda b: "b" + "".join(map(str, b)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}r{s[3]}")
def test_matches_reference(isa, shape, bits, dtype):
    fused, weight = _layer(*shape, bits, dtype)
    state = cpu_native.prepare(fused)
    gen = torch.Generator().manual_seed(1)
    for m in M_VALUES:
        x = torch.randn(m, shape[1], generator=gen).to(dtype)
        ref = x.double() @ weight.t()
        for dense_min_m in (-1, 1):  # the ISA's own switch, then dequantize + GEMM forced
            y = state.forward(x, dense_min_m)
            assert y.dtype == dtype and y.shape == (m, fused.spec.out_features)
            assert _rel_err(y, ref) < TOLERANCE[dtype], (m, dense_min_m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_batches_take_every_path(isa, dtype):
    """The gemv forced at M = 255 (AMX: one call of 255 rows) and 300 (AMX: 256 + 44 rows), and
    M = 512, past every ISA's switch to the dense path."""
    fused, weight = _layer((96, 40), 200, 64, 32, (2, 3, 4), dtype)
    state = cpu_native.prepare(fused)
    for m, dense_min_m in ((255, 1 << 30), (300, 1 << 30), (512, -1)):
        x = torch.randn(m, 200).to(dtype)
        assert _rel_err(state.forward(x, dense_min_m), x.double() @ weight.t()) < TOLERANCE[dtype]


def test_dense_weight_is_the_reference_weight(isa):
    fused, weight = _layer((70, 30), 100, 40, 16, (2, 3, 4), torch.float32)
    torch.testing.assert_close(cpu_native.prepare(fused).dense_weight().double(), weight,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nan_activations_give_nan_not_garbage(isa, dtype):
    """A NaN in x must reach every output as NaN (never rounded to Inf or a finite value)."""
    fused, _ = _layer((40,), 64, 32, 16, (3, 4), dtype)
    state = cpu_native.prepare(fused)
    for m, dense_min_m in ((1, -1), (4, -1), (4, 1)):
        x = torch.randn(m, 64).to(dtype)
        x[:, 7] = float("nan")
        assert torch.isnan(state.forward(x, dense_min_m)).all(), (m, dense_min_m)


def test_results_do_not_depend_on_the_thread_count():
    fused, _ = _layer((200, 64), 300, 64, 64, (2, 3, 4), torch.bfloat16)
    state = cpu_native.prepare(fused)
    x = torch.randn(16, 300).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = state.forward(x)
        torch.set_num_threads(2)
        two = state.forward(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_resident_bytes_stay_packed():
    """Planes at the average bit-width plus 16-bit scales: far below bf16."""
    fused, _ = _layer((512,), 512, 128, 256, (2, 4), torch.bfloat16)
    state = cpu_native.prepare(fused)
    planes = sum(s.qweight.numel() * 4 for s in fused.shards)
    scales = 2 * 512 * 4 * 2  # alpha, beta in bf16 per (row, group)
    assert planes + scales < state.nbytes < planes + scales + 32 * 1024
    assert state.nbytes < 512 * 512 * 2 / 3


def test_op_selects_the_native_backend_and_is_compilable():
    fused, weight = _layer((48, 16), 64, 32, 16, (2, 3, 4), torch.float32)
    handle = api.prepare_layer("test.native", ("s0", "s1"), fused.shards, fused.config,
                               torch.float32, "cpu")
    assert handle.backend == "cpu-native"
    torch.library.opcheck(torch.ops.sfmp.linear.default, (torch.randn(3, 64), handle.name, 64),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda x: api.linear(x, handle), backend="aot_eager",
                             fullgraph=True, dynamic=True)
    for m in (1, 5, 40):
        x = torch.randn(m, 64)
        assert _rel_err(compiled(x), x.double() @ weight.t()) < 1e-5


def test_unbuildable_kernels_fall_back_or_fail_by_mode(monkeypatch, caplog):
    """auto: one warning naming why, then the plain-torch path; native: a one-line error."""
    spec = _layer((16,), 32, 16, 16, (2,), torch.float32)[0].spec
    monkeypatch.setattr(cpu_native, "kernels", lambda: (_ for _ in ()).throw(
        SFMPError("cannot build the SFMP CPU kernels: no C++ compiler found")))
    backend = cpu_native.NativeCpuBackend()
    with caplog.at_level(logging.WARNING):
        ok, why = backend.can_implement(spec)
    assert not ok and "no C++ compiler" in why
    assert "using the plain-torch CPU path" in caplog.text
    assert api.select_backend(spec).name == "cpu-torch"
    monkeypatch.setenv("SFMP_CPU_KERNEL", "native")
    with pytest.raises(SFMPError, match=r"no C\+\+ compiler found"):
        backend.can_implement(spec)
    monkeypatch.setenv("SFMP_CPU_KERNEL", "fast")
    with pytest.raises(SFMPError, match="SFMP_CPU_KERNEL='fast': expected one of"):
        backend.can_implement(spec)


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-sfmp")
    assert "no C++ compiler found ('no-such-compiler-sfmp'" in build.unsupported_reason()
