import logging

import pytest
import torch

from offline.quantizers.base import LinearContext, row_group_bits
from offline.quantizers.blockwise import dequantize_codes
from offline.quantizers.gptq import (GPTQQuantizer, gptq_quantize, hessian_from_inputs,
                                     inverse_cholesky)
from offline.quantizers.rtn import RTNQuantizer
from sfmp_serve.errors import SFMPError
from sfmp_serve.format import LayerGeometry
from tests.offline_methods.plans import correlated_inputs

N, K = 40, 200  # ragged: 200 = 6 x 32 + 8 inputs, 40 = 2 x 16 + 8 rows
GEO = LayerGeometry(N, K, 32, 16)


def mixed_bits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([2, 3, 4], dtype=torch.uint8)[
        torch.randint(3, (GEO.n_block_rows, GEO.n_groups), generator=g)]


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float(((x @ (w - wq).t()) ** 2).mean())


def assert_codes_honour_bits(q, bits: torch.Tensor) -> None:
    maxq = (2 ** row_group_bits(bits, GEO)).repeat_interleave(GEO.cols(), dim=1) - 1
    assert q.codes.shape == (N, K)
    assert (q.codes.to(torch.int64) <= maxq).all()
    zmax = 2 ** row_group_bits(bits, GEO) - 1
    assert ((q.zero >= 0) & (q.zero <= zmax) & (q.zero == q.zero.round())).all()
    assert (q.scale > 0).all()


def test_gptq_beats_rtn_on_a_known_hessian_and_honours_block_bits():
    torch.manual_seed(0)
    w = torch.randn(N, K)
    x = correlated_inputs(4096, K)
    bits = mixed_bits()
    q_gptq = GPTQQuantizer(clip="minmax").quantize(w, bits, GEO, LinearContext(inputs=x))
    q_rtn = RTNQuantizer().quantize(w, bits, GEO, LinearContext())
    assert_codes_honour_bits(q_gptq, bits)
    assert_codes_honour_bits(q_rtn, bits)
    err_gptq = output_error(x, w, dequantize_codes(q_gptq, GEO))
    err_rtn = output_error(x, w, dequantize_codes(q_rtn, GEO))
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_fisher_clipped_gptq_beats_rtn_and_needs_the_fisher():
    torch.manual_seed(0)
    w, x, bits = torch.randn(N, K), correlated_inputs(4096, K), mixed_bits()
    fisher = torch.rand(N, K) ** 3
    quantizer = GPTQQuantizer()  # clip=fisher is the default
    with pytest.raises(SFMPError, match="method gptq with clip=fisher needs the Fisher "
                                        "diagonal of layers.0.w"):
        quantizer.quantize(w, bits, GEO, LinearContext(inputs=x, name="layers.0.w"))
    quantizer.fisher = {"layers.0.w": fisher}
    q = quantizer.quantize(w, bits, GEO, LinearContext(inputs=x, name="layers.0.w"))
    assert_codes_honour_bits(q, bits)
    plain = GPTQQuantizer(clip="minmax").quantize(w, bits, GEO, LinearContext(inputs=x))
    assert not torch.equal(q.scale, plain.scale)  # some groups were clipped
    q_rtn = RTNQuantizer().quantize(w, bits, GEO, LinearContext())
    err = output_error(x, w, dequantize_codes(q, GEO))
    assert err < 0.8 * output_error(x, w, dequantize_codes(q_rtn, GEO))


def test_gptq_with_a_diagonal_hessian_is_rtn():
    # No correlation between inputs -> no error feedback: GPTQ must reduce to min-max RTN.
    torch.manual_seed(1)
    w = torch.randn(N, K)
    bits = mixed_bits(1)
    h = torch.diag(torch.rand(K) + 0.5)
    q = gptq_quantize(w, bits, GEO, h)
    ref = RTNQuantizer().quantize(w, bits, GEO, LinearContext())
    assert torch.equal(q.codes, ref.codes)
    torch.testing.assert_close(q.scale, ref.scale)
    assert torch.equal(q.zero, ref.zero)


def test_hessian_is_two_xtx_over_n():
    x = torch.randn(50, 7, dtype=torch.float64)
    torch.testing.assert_close(hessian_from_inputs(x), (2 * x.t() @ x / 50).float())


def test_dead_inputs_get_zero_weight_and_no_error():
    torch.manual_seed(3)
    w = torch.randn(N, K)
    x = correlated_inputs(1024, K)
    x[:, 5] = 0.0
    q = GPTQQuantizer(clip="minmax").quantize(w, mixed_bits(), GEO, LinearContext(inputs=x))
    deq = dequantize_codes(q, GEO)
    assert torch.isfinite(deq).all()
    assert (deq[:, 5] == 0).all()


def test_too_few_calibration_tokens_is_a_user_error():
    w = torch.randn(N, K)
    with pytest.raises(SFMPError, match=r"100 tokens for 200 columns.*--nsamples"):
        GPTQQuantizer().quantize(w, mixed_bits(), GEO, LinearContext(inputs=torch.randn(100, K)))


def test_missing_inputs_is_a_user_error():
    with pytest.raises(SFMPError, match="needs calibration inputs"):
        GPTQQuantizer().quantize(torch.randn(N, K), mixed_bits(), GEO, LinearContext())


def test_non_pd_hessian_retries_damping_then_succeeds(caplog):
    h = torch.eye(64)
    h[-1, -1] = -0.05  # mean diag ~0.98: damping 0.0098 fails, x10 (0.098) succeeds
    with caplog.at_level(logging.WARNING, logger="offline.quantizers.gptq"):
        u = inverse_cholesky(h, percdamp=0.01, retries=3)
    assert len([r for r in caplog.records if "retrying" in r.message]) == 1
    assert torch.isfinite(u).all()


def test_hopeless_hessian_is_a_user_error(caplog):
    with caplog.at_level(logging.WARNING, logger="offline.quantizers.gptq"):
        with pytest.raises(SFMPError, match="not positive definite"):
            inverse_cholesky(-torch.eye(16), percdamp=0.01, retries=2)
    assert len([r for r in caplog.records if "retrying" in r.message]) == 2
