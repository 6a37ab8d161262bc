"""--salience-cache: one Fisher pass serves every bit-width, and never a different calibration."""

import pytest
import torch

from offline import pipeline
from offline.pipeline import QuantizeOptions, quantize_model
from sfmp_serve.errors import SFMPError

FAST = dict(method="rtn", group_size=32, block_rows=16, nsamples=2, seqlen=16)


def test_second_run_reuses_the_salience(tiny_llama, tmp_path, monkeypatch):
    cache = tmp_path / "fisher.safetensors"
    first = quantize_model(tiny_llama, QuantizeOptions(bits=3.25, budget_gb=None,
                                                       salience_cache=str(cache), **FAST))
    assert cache.is_file()

    def no_backward(*args, **kwargs):
        raise AssertionError("salience recomputed although it was cached")

    monkeypatch.setattr(pipeline, "fisher_diagonal", no_backward)
    again = quantize_model(tiny_llama, QuantizeOptions(bits=3.25, budget_gb=None,
                                                       salience_cache=str(cache), **FAST))
    for name, packed in first.packed.items():
        for field in ("qweight", "block_bits", "input_perm", "output_perm", "alpha"):
            assert torch.equal(getattr(packed, field), getattr(again.packed[name], field))
    other = quantize_model(tiny_llama, QuantizeOptions(bits=2.5, budget_gb=None,
                                                       salience_cache=str(cache), **FAST))
    assert abs(other.config.avg_bits - 2.5) <= 0.01


def test_cache_from_another_calibration_is_refused(tiny_llama, tmp_path):
    cache = tmp_path / "fisher.safetensors"
    quantize_model(tiny_llama, QuantizeOptions(bits=3, budget_gb=None,
                                               salience_cache=str(cache), **FAST))
    with pytest.raises(SFMPError, match="salience-cache"):
        quantize_model(tiny_llama, QuantizeOptions(bits=3, budget_gb=None, seed=7,
                                                   salience_cache=str(cache), **FAST))
