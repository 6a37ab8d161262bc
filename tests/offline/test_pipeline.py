"""The orchestrator: stage timings, pluggable methods, cheap checks before expensive stages."""

import pytest
import torch

from offline import pipeline
from offline.pipeline import QuantizeOptions, quantize_model
from offline.quantizers.base import LinearContext
from offline.quantizers.rtn import RTNQuantizer
from sfmp_serve.errors import SFMPError

FAST = dict(group_size=32, block_rows=16, nsamples=2, seqlen=16)


def test_result_and_stage_times(tiny_llama):
    result = quantize_model(tiny_llama, QuantizeOptions(bits=3.5, budget_gb=None, **FAST))
    assert list(result.stage_seconds) == [s for s in pipeline.STAGES]
    assert all(t >= 0 for t in result.stage_seconds.values())
    assert set(result.packed) == set(result.config.quantized_modules)
    assert "model.embed_tokens.weight" in result.extra_tensors
    assert not any(k.endswith("_proj.weight") for k in result.extra_tensors)
    assert abs(result.config.avg_bits - 3.5) <= 0.01


class RecordingQuantizer(RTNQuantizer):
    """A plug-in method: RTN codes, but it asks for per-linear context."""

    name = "recording"
    method_args = {"flavour": "test"}

    def __init__(self, inputs):
        self.inputs = inputs
        self.contexts = []

    def linear_context(self, name):
        self.contexts.append(name)
        return LinearContext(inputs=torch.zeros(1, 1))


def test_methods_plug_in_through_the_registry(tiny_llama, monkeypatch):
    made = []

    def factory(inputs):
        made.append(RecordingQuantizer(inputs))
        return made[-1]

    monkeypatch.setitem(pipeline.METHODS, "recording", factory)
    result = quantize_model(tiny_llama, QuantizeOptions(bits=3, budget_gb=None,
                                                        method="recording", **FAST))
    quantizer = made[0]
    assert quantizer.inputs.tokens.shape == (2, 16)
    assert set(quantizer.inputs.orders) == set(quantizer.inputs.loaded.linears)
    assert quantizer.contexts == list(quantizer.inputs.loaded.linears)
    assert result.config.method == "recording"
    assert result.config.method_args["flavour"] == "test"


def test_budget_is_checked_before_calibration(tiny_llama, monkeypatch):
    def expensive(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(pipeline, "calibration_tokens", expensive)
    with pytest.raises(SFMPError, match="too small"):
        quantize_model(tiny_llama, QuantizeOptions(bits=None, budget_gb=1e-6, **FAST))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3, budget_gb=1.0), "exactly one"),
    (dict(bits=None, budget_gb=None), "exactly one"),
    (dict(bits=None, budget_gb=-1.0), "must be positive"),
    (dict(bits=None, budget_gb=1.0, levels=3, bit_choices=(2, 4)), "--levels=3"),
    (dict(bits=3, budget_gb=None, nsamples=0), "--nsamples=0"),
])
def test_options_are_validated_without_a_model(kwargs, match):
    with pytest.raises(SFMPError, match=match):
        QuantizeOptions(**kwargs).validate()
