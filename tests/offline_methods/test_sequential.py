import pytest
import torch
from transformers import AutoModelForCausalLM

from offline.quantizers.awq import AWQQuantizer
from offline.quantizers.base import LinearContext
from offline.quantizers.blockwise import dequantize_codes
from offline.quantizers.gptq import GPTQQuantizer
from offline.quantizers.rtn import RTNQuantizer
from offline.sequential import quantize_sequential
from offline.streaming import load_skeleton
from offline.targets import find_targets
from sfmp_serve.arch import arch_for
from sfmp_serve.errors import SFMPError
from tests.offline_methods.plans import random_plans


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def calib(n: int = 4, seqlen: int = 48) -> torch.Tensor:
    return torch.randint(3, 384, (n, seqlen), generator=torch.Generator().manual_seed(0))


def targets_of(model):
    return find_targets(model, arch_for(model.config.model_type))


def rebuild(path, spec, plans, result):
    """A fresh model with only what an exporter gets: codes + changed tensors."""
    model = load(path)
    state = model.state_dict()
    for name, value in result.tensors.items():
        state[name].copy_(value)
    for name, codes in result.codes.items():
        plan = plans[name]
        state[f"{name}.weight"].copy_(plan.restore(dequantize_codes(codes, plan.geometry)))
    return model


@pytest.mark.parametrize("method", ["gptq", "gptq-fisher-clip", "awq"])
def test_codes_and_changed_tensors_reproduce_the_quantized_model(tiny_qwen3, method):
    model = load(tiny_qwen3)
    spec = arch_for(model.config.model_type)
    plans = random_plans(model, spec)
    ids = calib()
    quantizer = {"gptq": lambda: GPTQQuantizer(clip="minmax"), "awq": AWQQuantizer,
                 "gptq-fisher-clip": GPTQQuantizer}[method]()
    if quantizer.needs_fisher:  # what the pipeline hands it: a Fisher diagonal per target
        gen = torch.Generator().manual_seed(0)
        quantizer.fisher = {n: torch.rand(model.get_submodule(n).weight.shape, generator=gen)
                            for n in plans}
    result = quantize_sequential(model, targets_of(model), plans, quantizer, ids, batch_size=2)
    assert set(result.codes) == set(plans)
    with torch.no_grad():
        torch.testing.assert_close(rebuild(tiny_qwen3, spec, plans, result)(ids).logits,
                                   model(ids).logits)
        fp = load(tiny_qwen3)(ids).logits
        assert not torch.allclose(model(ids).logits, fp)  # it did quantize


def test_streaming_from_safetensors_matches_in_memory(tiny_llama):
    model = load(tiny_llama)
    spec = arch_for(model.config.model_type)
    plans = random_plans(model, spec, seed=3)
    ids = calib()
    in_memory = quantize_sequential(model, targets_of(model), plans, AWQQuantizer(), ids,
                                    batch_size=2)
    skeleton, source = load_skeleton(tiny_llama, spec)
    assert all(p.is_meta for p in skeleton.model.layers.parameters())
    streamed = quantize_sequential(skeleton, targets_of(skeleton), plans, AWQQuantizer(), ids,
                                   batch_size=2, source=source)
    for name, codes in in_memory.codes.items():
        assert torch.equal(codes.codes, streamed.codes[name].codes), name
        torch.testing.assert_close(codes.scale, streamed.codes[name].scale)
    assert in_memory.tensors.keys() == streamed.tensors.keys()
    for name, value in in_memory.tensors.items():
        torch.testing.assert_close(value, streamed.tensors[name])
    # one layer at a time: every streamed layer was dropped again
    assert all(p.is_meta for p in skeleton.model.layers.parameters())


def test_rtn_needs_no_calibration_and_equals_per_linear_rtn(tiny_llama):
    model = load(tiny_llama)
    spec = arch_for(model.config.model_type)
    plans = random_plans(model, spec, seed=4)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in plans}
    result = quantize_sequential(model, targets_of(model), plans, RTNQuantizer(), None)
    for name, plan in plans.items():
        ref = RTNQuantizer().quantize(plan.reorder(weights[name]), plan.block_bits,
                                      plan.geometry, LinearContext())
        assert torch.equal(result.codes[name].codes, ref.codes)
    assert result.tensors == {}


def test_gptq_with_too_little_calibration_names_the_layer(tiny_llama):
    model = load(tiny_llama)
    spec = arch_for(model.config.model_type)
    with pytest.raises(SFMPError, match=r"layer model\.layers\.0\.self_attn\.q_proj: .*"
                                        r"16 tokens for 96 columns"):
        quantize_sequential(model, targets_of(model), random_plans(model, spec), GPTQQuantizer(),
                            calib(1, 16))


def test_calibrated_method_without_data_is_a_user_error(tiny_llama):
    model = load(tiny_llama)
    spec = arch_for(model.config.model_type)
    with pytest.raises(SFMPError, match="needs calibration data"):
        quantize_sequential(model, targets_of(model), random_plans(model, spec),
                            GPTQQuantizer(), None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_a_user_error(tiny_llama):
    model = load(tiny_llama)
    spec = arch_for(model.config.model_type)
    with pytest.raises(SFMPError, match="--device.cuda: no CUDA device"):
        quantize_sequential(model, targets_of(model), random_plans(model, spec),
                            GPTQQuantizer(), calib(), device="cuda")
