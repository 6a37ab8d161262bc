"""The orchestrator: stage timings, pluggable methods, cheap checks before expensive stages."""

from dataclasses import dataclass

import pytest

from offline import pipeline
from offline.pipeline import QuantizeOptions, quantize_model
from offline.quantizers import base
from offline.quantizers.rtn import RTNQuantizer
from sfmp_serve.errors import SFMPError

FAST = dict(group_size=32, block_rows=16, nsamples=2, seqlen=16)
RTN = dict(method="rtn", **FAST)  # 32 calibration tokens: too few for GPTQ, the default


def test_result_and_stage_times(tiny_llama):
    result = quantize_model(tiny_llama, QuantizeOptions(bits=3.5, budget_gb=None, **RTN))
    assert list(result.stage_seconds) == [s for s in pipeline.STAGES]
    assert all(t >= 0 for t in result.stage_seconds.values())
    assert set(result.packed) == set(result.config.quantized_modules)
    assert "model.embed_tokens.weight" in result.extra_tensors
    assert not any(k.endswith("_proj.weight") for k in result.extra_tensors)
    assert abs(result.config.avg_bits - 3.5) <= 0.01


@dataclass(frozen=True)
class RecordingConfig:
    flavour: str = "test"


class RecordingQuantizer(RTNQuantizer):
    """A plug-in method: RTN codes, calibrated, recording what the engine hands it."""

    name = "recording"
    needs_inputs = True
    Config = RecordingConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.prepared, self.contexts = [], []
        made.append(self)

    def prepare_layer(self, layer, spec, plans, inputs, layer_name=""):
        self.prepared.append((layer_name, sorted(inputs)))
        return []

    def quantize(self, weight, block_bits, geometry, context):
        self.contexts.append((context.name, tuple(context.inputs.shape)))
        return super().quantize(weight, block_bits, geometry, context)


made: list[RecordingQuantizer] = []


def test_a_method_is_one_registered_class(tiny_llama, monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    with pytest.raises(SFMPError, match=r"--method='recording': expected one of awq, gptq, rtn"):
        QuantizeOptions(bits=3, budget_gb=None, method="recording", **FAST).validate()
    base.register(RecordingQuantizer)
    made.clear()
    result = quantize_model(tiny_llama, QuantizeOptions(bits=3, budget_gb=None,
                                                        method="recording", **FAST))
    quantizer = made[-1]
    names = list(result.config.quantized_modules)
    # one engine: every layer prepared with every target's input, then every target quantized
    # on its (2 x 16 token) calibration inputs, in model order
    assert quantizer.prepared == [(f"model.layers.{i}", sorted(
        n.split(f"layers.{i}.")[1] for n in names if f"layers.{i}." in n)) for i in range(2)]
    assert [name for name, _ in quantizer.contexts] == names
    assert all(shape[0] == 2 * 16 for _, shape in quantizer.contexts)
    assert result.config.method == "recording"
    assert result.config.method_args["flavour"] == "test"
    assert result.config.calibration["nsamples"] == 2


def test_budget_is_checked_before_calibration(tiny_llama, monkeypatch):
    def expensive(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(pipeline, "calibration_tokens", expensive)
    with pytest.raises(SFMPError, match="too small"):
        quantize_model(tiny_llama, QuantizeOptions(bits=None, budget_gb=1e-6, **RTN))


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
