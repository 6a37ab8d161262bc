"""The reference op (both formulations) against a dense matmul on the dequantized weight."""

import pytest
import torch

from sfmp_serve.ops.reference import dequantize, sfmp_linear_reference
from tests.offline.helpers import make_config, random_packed


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("mode", ["lut", "dequant"])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_matches_dense_matmul(mode, batch, bias):
    config = make_config()
    packed, _ = random_packed(45, 77, config, seed=batch, bias=bias)
    x = torch.randn(batch, 77, generator=torch.Generator().manual_seed(7))
    w = dequantize(packed, config, torch.float32)
    dense = x @ w.t() + (packed.bias if bias else 0)
    y = sfmp_linear_reference(x, packed, config, mode=mode)
    assert y.dtype == torch.float32 and y.shape == (batch, 45)
    assert rel_err(y, dense) < 1e-5


def test_dequantize_applies_both_permutations():
    config = make_config()
    packed, weight_r = random_packed(30, 50, config, seed=3)
    w = dequantize(packed, config, torch.float64)
    assert torch.allclose(dequantize(packed, config, torch.float64, reordered=True), weight_r,
                          atol=1e-6)
    # reordered row i, column j is original output output_perm[i], input input_perm[j]
    rows, cols = packed.output_perm.long(), packed.input_perm.long()
    assert torch.allclose(w[rows][:, cols], weight_r, atol=1e-6)


def test_leading_dims_and_half_precision_activations():
    config = make_config(act_dtype="bfloat16")
    packed, _ = random_packed(24, 40, config, seed=5)
    x = torch.randn(2, 3, 40).to(torch.bfloat16)
    y = sfmp_linear_reference(x, packed, config, mode="lut")
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 24)
    dense = x.float() @ dequantize(packed, config, torch.float32).t()
    assert rel_err(y, dense) < 1e-2  # bf16 output rounding only


def test_unknown_mode_is_rejected():
    config = make_config()
    packed, _ = random_packed(8, 16, config)
    with pytest.raises(ValueError, match="mode"):
        sfmp_linear_reference(torch.zeros(1, 16), packed, config, mode="fast")
